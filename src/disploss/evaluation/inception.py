"""Inception-v3 features the ADM way, from torch-fidelity's port of the TF 2015-12-05 Inception graph.

ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) feeds float NHWC images in [0, 255] to the
graph `classify_image_graph_def.pb`, which resizes them bilinearly (TF1, align_corners=False) to 299 x 299 and
maps them to (x - 128) / 128. torch-fidelity's FeatureExtractorInceptionV3 reproduces those two steps bit-exactly
on uint8 NCHW input and carries the graph's weights, converted tensor by tensor. From one forward pass we read:

- pool: `pool_3:0`, the 2048-d average pool; torch-fidelity's feature "2048". FID and precision/recall.
- spatial: `mixed_6/conv:0[..., :7]`, flattened. The TF 2015 graph names its Inception blocks mixed, mixed_1,
  mixed_2 (torchvision's Mixed_5b/5c/5d), mixed_3 (Mixed_6a), mixed_4 ... mixed_7 (Mixed_6b ... Mixed_6e), and
  inside a block `conv` is the first, 1x1 branch (`tower`, `tower_1`, `tower_2` are the others). So
  mixed_6/conv is torch-fidelity's `Mixed_6d.branch1x1` (its weight conversion maps "mixed_6/conv/conv2d_params"
  to "Mixed_6d.branch1x1.conv"). The TF node `mixed_6/conv` is the ReLU after conv + batch norm, which is what
  BasicConv2d returns, so a forward hook on that module sees the same tensor: (N, 192, 17, 17). ADM keeps the
  first 7 channels of the NHWC tensor and flattens (H, W, C) with C fastest: 17 * 17 * 7 = 2023 values. sFID.
- probs: ADM builds its softmax from the graph's `softmax/logits/MatMul` weight alone, softmax(pool_3 @ W),
  without the bias `softmax/biases`. That is torch-fidelity's "logits_unbiased" (1008 classes, the graph's
  1000 ImageNet classes plus 8 unused ones), not its "logits". Inception Score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np

from disploss.errors import ConfigError, MissingFileError, UsageError

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv, see the module docstring
SPATIAL_CHANNELS = 7
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_CLASSES = 1008

_OFFLINE_HINT = (
    "pass --inception-weights PATH (weights_path=PATH in Python) pointing at a local copy of "
    f"{WEIGHTS_URL.rsplit('/', 1)[1]}, torch-fidelity's port of the TF 2015-12-05 Inception-v3, downloaded on a "
    f"machine with network access from {WEIGHTS_URL}"
)


@dataclasses.dataclass(frozen=True)
class InceptionFeatures:
    """Per-image Inception outputs, row i belonging to image i.

    Attributes:
        pool: (N, 2048) float32 pool_3 features.
        spatial: (N, 2023) float32 first 7 channels of mixed_6/conv, NHWC-flattened.
        probs: (N, 1008) float64 softmax of the unbiased logits.
    """

    pool: np.ndarray
    spatial: np.ndarray
    probs: np.ndarray


def _check_weights_file(path: Path) -> None:
    import torch

    if not path.is_file():
        raise MissingFileError(f"Inception weights file {path} does not exist; {_OFFLINE_HINT}")
    # torch-fidelity loads the file with weights_only=False; make sure it is plain tensors before it does.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ConfigError(
            f"Inception weights file {path} is not a plain PyTorch state dict of tensors ({error}); {_OFFLINE_HINT}"
        ) from error


@contextlib.contextmanager
def _tf32_disabled(disable: bool):
    # Save and restore torch's global TF32 switches around a forward pass (they only act on CUDA).
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if disable:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionWeightsError(UsageError, RuntimeError):
    """The default Inception weights could not be downloaded (or read from torch hub's cache)."""


class InceptionFeatureExtractor:
    """The 2015-12-05 Inception-v3 with ADM's three read-outs (pool_3, mixed_6/conv[..., :7], softmax).

    Args:
        weights_path: local torch-fidelity weights file; None downloads them (or reuses torch hub's cache) the way
            torch-fidelity does.
        device: torch device to run on, e.g. "cpu" or "cuda".
        allow_tf32: let CUDA convolutions and matmuls use TF32. Off by default: PyTorch enables TF32 for cuDNN
            convolutions, which moved the features of a random-weight Inception on an H200 by up to 4e-3
            (spatial) and 8e-4 (pool) relative to CPU float32, against 5e-6 with TF32 off.
    """

    def __init__(
        self, weights_path: str | os.PathLike | None = None, device: str = "cpu", allow_tf32: bool = False
    ) -> None:
        import torch
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.device = torch.device(device)
        self.allow_tf32 = allow_tf32
        features_list = ["2048", "logits_unbiased"]
        if weights_path is not None:
            weights_path = Path(weights_path)
            _check_weights_file(weights_path)
            try:
                model = FeatureExtractorInceptionV3(
                    "inception-v3-compat", features_list, feature_extractor_weights_path=str(weights_path)
                )
            except RuntimeError as error:  # load_state_dict: missing, unexpected or mis-shaped tensors
                raise ConfigError(
                    f"Inception weights file {weights_path} does not match torch-fidelity's Inception-v3 ({error})"
                ) from error
        else:
            try:
                model = FeatureExtractorInceptionV3("inception-v3-compat", features_list)
            except OSError as error:  # urllib's URLError and HTTPError are OSErrors
                raise InceptionWeightsError(
                    f"could not download the Inception-v3 weights ({error}); {_OFFLINE_HINT}"
                ) from error
        self.model = model.to(self.device).eval()
        self._spatial: torch.Tensor | None = None
        self.model.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # output: ReLU(BN(conv)) of mixed_6/conv, (B, 192, 17, 17); keep ADM's first 7 channels in NHWC order.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)  # (B, 2023)

    def forward_batch(self, images):
        """Run one batch.

        Args:
            images: (B, H, W, 3) uint8 torch tensor or numpy array, any H, W (resized to 299 inside).

        Returns:
            pool (B, 2048) float32, spatial (B, 2023) float32, probs (B, 1008) float64, as torch tensors on the
            model's device.
        """
        import torch

        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(
                f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} of shape {tuple(images.shape)}"
            )
        x = images.to(self.device).permute(0, 3, 1, 2)  # (B, 3, H, W), torch-fidelity's layout
        self._spatial = None
        with torch.inference_mode(), _tf32_disabled(not self.allow_tf32):
            pool, logits = self.model(x)  # (B, 2048), (B, 1008)
            spatial, self._spatial = self._spatial, None
            probs = torch.softmax(logits.double(), dim=1)  # (B, 1008)
        return pool.float(), spatial.float(), probs

    def __call__(self, images: np.ndarray, batch_size: int = 64, progress: bool = True) -> InceptionFeatures:
        """Features of a whole image array, in batches, with a tqdm progress bar.

        Args:
            images: (N, H, W, 3) uint8 images, e.g. an ADM batch's `arr_0`.
            batch_size: images per forward pass.
            progress: show a progress bar.

        Returns:
            InceptionFeatures with N rows each.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            raise ConfigError("no images to compute Inception features of")
        pools, spatials, probs = [], [], []
        with tqdm(total=len(images), unit="img", desc="inception", disable=not progress) as bar:
            for start in range(0, len(images), batch_size):
                batch = np.ascontiguousarray(images[start : start + batch_size])
                pool, spatial, prob = self.forward_batch(batch)
                pools.append(pool.cpu().numpy())
                spatials.append(spatial.cpu().numpy())
                probs.append(prob.cpu().numpy())
                bar.update(len(batch))
        return InceptionFeatures(
            pool=np.concatenate(pools), spatial=np.concatenate(spatials), probs=np.concatenate(probs)
        )
