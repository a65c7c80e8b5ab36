"""Cache the VAE posterior of every image of a dataset, for training on latents (`disploss extract-latents`).

For each image (ADM centre crop, as in training) the posterior mean and std of the image AND of its
horizontal flip are stored, so that `disploss.data.latents.LatentsDataset` reproduces the reference's
stochastic latents (random flip, then a posterior sample times 0.18215) without running the encoder.

Runs as one process or under torchrun: shard k (dataset indices [k * shard_size, (k + 1) * shard_size)) is
computed by rank k % world_size. Each shard is written atomically, so a restart with the same command skips
the finished shards; `manifest.json` is written last, by rank 0 after a barrier, once every shard exists.
The folder layout is in disploss.data.latents.

Storage: float32 by default, 64 KiB per 256 px image (84 GB for the 1.28M ImageNet training images);
--dtype float16 halves that but keeps only about 3 significant digits and flushes a std below 6e-8 to 0.
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disploss import distributed
from disploss.data import latents as fmt
from disploss.data.images import ALPHA_POLICIES, BAD_IMAGE_POLICIES, ImageFolderDataset
from disploss.errors import ConfigError
from disploss.options import at_least, check_options, option
from disploss.runtime import DEVICES

STORAGE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExtractConfig:
    """Every setting of `disploss extract-latents`."""

    data_path: str = option(help="ImageFolder-style dataset root (root/<class>/<image>)")
    vae: str = option(help="ema | mse (stabilityai/sd-vae-ft-*) | a folder holding a saved AutoencoderKL")
    out: str = option(help="cache folder (created; rerun the same command to resume)")
    image_size: int = option(256, "image side in pixels", check=at_least(1))
    num_classes: int = option(1000, "number of classes", check=at_least(1))
    batch_size: int = option(32, "images per encoder call (per process)", check=at_least(1))
    num_workers: int = option(4, "data loader workers", check=at_least(0))
    device: str | None = option(None, "cuda or cpu (default: cuda when available)", choices=(None, *DEVICES))
    shard_size: int = option(1024, "images per shard file", check=at_least(1))
    dtype: str = option("float32", "storage precision", choices=STORAGE_DTYPES)
    on_bad_image: str = option(
        "skip", "unreadable files: warn and use the next image, or stop", choices=BAD_IMAGE_POLICIES
    )
    alpha: str = option(
        "white",
        "transparent images: composite on white, or drop alpha (the reference's loader)",
        choices=ALPHA_POLICIES,
    )

    def __post_init__(self):
        check_options(self)


def _log(message: str) -> None:
    if distributed.is_main():
        print(f"[extract-latents] {message}", file=sys.stderr, flush=True)


def encode_pair(codec, x: torch.Tensor) -> torch.Tensor:
    """Posterior moments of images and of their horizontal flips.

    Args:
        codec: a `disploss.data.vae.LatentCodec`.
        x: images (B, 3, H, W) in [-1, 1].
    Returns:
        float32 (B, 2, 2, C, h, w) = [image, flipped] x [mean, std] on the codec's device.
    """
    b = x.shape[0]
    mean, std = codec.encode_moments(torch.cat([x, x.flip(-1)]))  # 2B C h w
    moments = torch.stack([mean, std], dim=1)  # 2B 2 C h w
    return torch.stack([moments[:b], moments[b:]], dim=1)  # B 2 2 C h w


def extract_latents(cfg: ExtractConfig, info: distributed.DistInfo) -> bool:
    """Extract the latents of this process's shards; True once the cache is complete.

    Raises:
        UsageError: a bad --out folder (another cache, not empty), a missing dataset or VAE.
    """
    from disploss.data.vae import load_vae
    from disploss.fileio import check_folder_creatable

    out = Path(cfg.out)
    # Before the VAE is loaded; every process stops if rank 0 cannot write there.
    distributed.on_every_rank(lambda: check_folder_creatable(out, "--out") if info.is_main else None)
    dataset = ImageFolderDataset(
        cfg.data_path, cfg.image_size, num_classes=cfg.num_classes, on_bad_image=cfg.on_bad_image, flip=False,
        alpha=cfg.alpha,
    )  # fmt: skip
    codec = load_vae(cfg.vae, info.device)
    latent_shape = codec.latent_shape(cfg.image_size)
    count = len(dataset)
    total = fmt.num_shards(count, cfg.shard_size)
    plan = {
        "format": fmt.LATENT_FORMAT, "version": fmt.LATENT_FORMAT_VERSION, "image_size": cfg.image_size,
        "vae": cfg.vae, "scale": codec.scale, "shift": codec.shift, "latent_shape": list(latent_shape),
        "downsample_factor": codec.downsample_factor, "count": count, "num_classes": cfg.num_classes,
        "class_names": dataset.classes, "shard_size": cfg.shard_size, "num_shards": total, "dtype": cfg.dtype,
        "alpha": cfg.alpha, "data_path": os.path.abspath(cfg.data_path), "layout": fmt.LAYOUT,
    }  # fmt: skip

    def prepare() -> None:  # rank 0; its error stops every process and is printed once
        if info.is_main:
            try:
                fmt.prepare_cache_folder(out, plan)
            except OSError as err:
                raise ConfigError(f"cannot prepare --out {out}: {err}") from err

    distributed.on_every_rank(prepare)

    missing = set(fmt.missing_shards(out, count, cfg.shard_size))
    todo = [k for k in range(info.rank, total, info.world_size) if k in missing]
    _log(
        f"{count} images in {total} shards of {cfg.shard_size}; {len(todo)} shards to compute on rank 0, "
        f"{info.world_size} process(es), latents {tuple(latent_shape)}, scale {codec.scale}"
    )
    _encode_shards(cfg, info, codec, dataset, todo, out)

    distributed.barrier()
    missing = fmt.missing_shards(out, count, cfg.shard_size) if info.is_main else None
    if info.is_main and not missing:
        fmt.write_manifest(out, plan)
    missing = distributed.broadcast_object(missing)
    if missing:
        _log(f"incomplete: {len(missing)} shards missing (e.g. {fmt.moments_name(missing[0])}); rerun to finish")
        return False
    _log(f"done: {out / fmt.MANIFEST_NAME}")
    return True


def _encode_shards(cfg: ExtractConfig, info, codec, dataset, todo: list[int], out: Path) -> None:
    """Encode the images of shards `todo` in order, writing each shard as soon as it is complete."""
    if not todo:
        return
    from tqdm import tqdm

    store_dtype = np.dtype(cfg.dtype)
    n_items = len(dataset)
    indices = [
        i for k in todo
        for i in range(k * cfg.shard_size, k * cfg.shard_size + fmt.shard_length(k, n_items, cfg.shard_size))
    ]  # fmt: skip
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.num_workers, pin_memory=info.device.type == "cuda", drop_last=False,
    )  # fmt: skip
    pending = collections.deque(todo)
    buf_m: list[np.ndarray] = []
    buf_y: list[np.ndarray] = []
    buffered, done = 0, 0
    for x, y in tqdm(loader, disable=not info.is_main, desc="extract-latents", unit="batch"):
        moments = encode_pair(codec, x.to(info.device, non_blocking=True))  # B 2 2 C h w
        computed = moments.cpu().numpy()
        with np.errstate(over="ignore"):  # a float16 overflow is reported by _check_moments, naming the image
            stored = computed.astype(store_dtype)
        _check_moments(computed, stored, indices[done : done + len(stored)], dataset)
        done += len(stored)
        buf_m.append(stored)
        buf_y.append(y.numpy())
        buffered += x.shape[0]
        while pending and buffered >= fmt.shard_length(pending[0], n_items, cfg.shard_size):
            k = pending.popleft()
            n = fmt.shard_length(k, n_items, cfg.shard_size)
            all_m, all_y = np.concatenate(buf_m), np.concatenate(buf_y)
            fmt.write_shard(out, k, all_m[:n], all_y[:n])
            buf_m, buf_y, buffered = [all_m[n:]], [all_y[n:]], buffered - n
    if pending or buffered:
        raise RuntimeError(f"internal error: {len(pending)} shards and {buffered} images left unwritten")


def _check_moments(computed: np.ndarray, stored: np.ndarray, indices: list[int], dataset) -> None:
    """Refuse to write moments that a reader would refuse (non-finite, or beyond float16's range), naming the first
    such image; one pass over the batch (B, 2, 2, C, h, w) on the CPU, where it is copied anyway."""
    bad = ~(np.abs(stored).reshape(len(stored), -1).max(axis=1) <= fmt.MAX_MOMENT)  # (B,); NaN compares False
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    path = dataset.samples[indices[i]][0] if hasattr(dataset, "samples") else f"dataset index {indices[i]}"
    hint = (
        "the VAE's values are finite but beyond float16's range (65504): pass --dtype float32"
        if stored.dtype == np.float16 and np.isfinite(computed[i]).all()
        else "check that image and the VAE (--vae)"
    )
    raise ConfigError(
        f"the VAE gave non-finite or out-of-range posterior moments for {int(bad.sum())} image(s) of this batch, "
        f"first {path}; nothing of that shard was written: {hint}"
    )
