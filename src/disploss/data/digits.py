"""scikit-learn's bundled handwritten digits (no download): the dataset of the CPU demo and the experiments."""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from disploss.data.images import check_choice, uint8_to_unit
from disploss.errors import ConfigError

DigitsSplit = Literal["all", "train", "holdout"]
DIGITS_SPLITS = ("all", "train", "holdout")


@functools.lru_cache(maxsize=8)
def _digits_arrays_cached(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # optional dependency, bundled data (no download)

    digits = load_digits()
    img = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # B 1 8 8, in [0, 1]
    if image_size != img.shape[-1]:
        img = F.interpolate(
            img,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=image_size < img.shape[-1],
        )  # B 1 H W
    u8 = (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    x = u8.permute(0, 2, 3, 1).expand(-1, -1, -1, channels).contiguous()  # B H W C
    return x.numpy(), digits.target.astype(np.int64)


def digits_arrays(image_size: int = 16, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), resized and as uint8.

    The 0..16 intensities are scaled to [0, 1], resized bilinearly (antialiased when shrinking) to
    image_size, rounded to 0..255; the grey channel is replicated `channels` times. White digits on black.

    Args:
        image_size: output side H = W.
        channels: 1 or 3.
    Returns:
        (x uint8 (N, H, W, C), y int64 (N,) in 0..9), N = 1797; fresh arrays the caller may modify.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}")
    x, y = _digits_arrays_cached(int(image_size), int(channels))
    return x.copy(), y.copy()


def split_indices(n: int, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of range(n) into train and held-out indices.

    Args:
        n: number of items.
        holdout_fraction: share of items held out, in [0, 1); round(n * fraction) items.
        seed: seed of the permutation (numpy default_rng), the same split for the same (n, fraction, seed).
    Returns:
        (train indices, holdout indices), both sorted int64 arrays, disjoint, together range(n).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_fraction))
    return np.sort(perm[n_hold:]).astype(np.int64), np.sort(perm[:n_hold]).astype(np.int64)


class DigitsDataset(torch.utils.data.Dataset):
    """The bundled digits as a pixel-space dataset for the CPU demo.

    Args:
        image_size: side S.
        split: "all", "train" or "holdout" (see `split_indices`).
        holdout_fraction, seed: the split.
        channels: 3 (grey replicated, the default) or 1.
        flip: random horizontal flip (off by default: a mirrored digit is not a digit).
    Items:
        (x float32 (C, S, S) in [-1, 1], y int in 0..9).
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        split: DigitsSplit = "all",
        holdout_fraction: float = 0.2,
        seed: int = 0,
        channels: int = 3,
        flip: bool = False,
    ):
        check_choice("split", split, DIGITS_SPLITS)
        x, y = digits_arrays(image_size, channels)
        if split != "all":
            train, holdout = split_indices(len(y), holdout_fraction, seed)
            keep = train if split == "train" else holdout
            x, y = x[keep], y[keep]
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.split = split
        self.flip = bool(flip)
        self.x = uint8_to_unit(x)  # N C S S
        self.y = torch.from_numpy(y)
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.x[index]
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, int(self.y[index])
