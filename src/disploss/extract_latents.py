"""`disploss extract-latents`: cache the VAE posterior of every image of a dataset, for training on latents.

For each image (ADM centre crop, as in training) the posterior mean and std of the image AND of its
horizontal flip are stored, so that `disploss.data.LatentsDataset` reproduces the reference's stochastic
latents (random flip, then a posterior sample times 0.18215) without running the encoder.

Runs as one process or under torchrun: shard k (dataset indices [k * shard_size, (k + 1) * shard_size)) is
computed by rank k % world_size. Each shard is written atomically, so a restart with the same command skips
the finished shards; `manifest.json` is written last, by rank 0 after a barrier, once every shard exists.
The folder layout is described in `disploss.data` (next to `LatentsDataset`, its reader).

Storage: float32 by default, 64 KiB per 256 px image (84 GB for the 1.28M ImageNet training images);
--dtype float16 halves that but keeps only about 3 significant digits and flushes a std below 6e-8 to 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from disploss import distributed
from disploss.data import (
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    MANIFEST_NAME,
    PLAN_NAME,
    ImageFolderDataset,
    labels_name,
    missing_shards,
    moments_name,
    num_shards,
    shard_length,
)
from disploss.fileio import atomic_write, atomic_write_json

# Plan entries that decide the content of the shards: a rerun into the same folder must agree on them.
_PLAN_KEYS_COMPARED = (
    "format", "version", "image_size", "vae", "scale", "shift", "latent_shape", "count", "num_classes",
    "class_names", "shard_size", "dtype", "alpha",
)
LAYOUT = (
    "moments_{shard:06d}.npy: (n, 2, 2, C, h, w) = [image, flipped image] x [posterior mean, posterior std], "
    "unscaled; labels_{shard:06d}.npy: int64 (n,); shard k holds dataset indices [k * shard_size, ...)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `disploss extract-latents`."""
    parser.add_argument("--data-path", required=True, help="ImageFolder-style dataset root (root/<class>/<image>)")
    parser.add_argument("--vae", required=True,
                        help="ema | mse (stabilityai/sd-vae-ft-*) | a folder holding a saved AutoencoderKL")
    parser.add_argument("--out", required=True, help="cache folder (created; rerun the same command to resume)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call (per process)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision")
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="unreadable files: warn and use the next image, or stop")
    parser.add_argument("--alpha", choices=("white", "drop"), default="white",
                        help="transparent images: composite on white, or drop alpha (the reference's loader)")


def _log(message: str) -> None:
    if distributed.is_main():
        print(f"[extract-latents] {message}", file=sys.stderr, flush=True)


def _prepare_out(out: Path, plan: dict) -> str | None:
    """Rank 0: create or check the cache folder. Returns a problem to report, or None.

    Writes plan.json into a new folder; in an existing cache checks that plan.json agrees, removes stale
    temporary files, and removes manifest.json if any shard is missing (the cache is then incomplete).
    """
    try:
        if out.exists() and not out.is_dir():
            return f"--out {out} exists and is not a folder"
        out.mkdir(parents=True, exist_ok=True)
        plan_path = out / PLAN_NAME
        if plan_path.is_file():
            with open(plan_path) as f:
                old = json.load(f)
            diff = [k for k in _PLAN_KEYS_COMPARED if old.get(k) != plan.get(k)]
            if diff:
                details = "; ".join(
                    f"{k}: {_short(old.get(k))} there, {_short(plan.get(k))} now" for k in diff
                )
                return (f"--out {out} holds a latent cache made with other settings ({details}); "
                        "pass another --out or delete that folder")
        else:
            visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
            if visible:
                return (f"--out {out} is not empty ({', '.join(sorted(visible)[:5])}...) and holds no "
                        f"{PLAN_NAME}: pass an empty or new folder")
            atomic_write_json(plan_path, plan)
        for p in out.glob(".*.tmp"):  # left by a killed run; atomic writes never read them
            p.unlink(missing_ok=True)
        if missing_shards(out, plan["count"], plan["shard_size"]):
            (out / MANIFEST_NAME).unlink(missing_ok=True)
    except OSError as e:
        return f"cannot prepare --out {out}: {e}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save on a path appends ".npy" to names without it (the temporary name), so write to a handle.
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, writer)


def _write_shard(out: Path, shard: int, moments: np.ndarray, labels: np.ndarray) -> None:
    # Labels first, moments last: a shard counts as done once both exist, and each appears atomically.
    _save_npy(out / labels_name(shard), labels.astype(np.int64))
    _save_npy(out / moments_name(shard), moments)


def encode_pair(codec, x: torch.Tensor) -> torch.Tensor:
    """Posterior moments of images and of their horizontal flips.

    Args:
        codec: a `disploss.vae.LatentCodec`.
        x: images (B, 3, H, W) in [-1, 1].
    Returns:
        float32 (B, 2, 2, C, h, w) = [image, flipped] x [mean, std] on the codec's device.
    """
    b = x.shape[0]
    mean, std = codec.encode_moments(torch.cat([x, x.flip(-1)]))  # 2B C h w
    moments = torch.stack([mean, std], dim=1)  # 2B 2 C h w
    return torch.stack([moments[:b], moments[b:]], dim=1)  # B 2 2 C h w


def run(args: argparse.Namespace) -> int:
    """Extract the latents; returns 0 when the cache is complete, 1 otherwise."""
    info = distributed.init(args.device)
    try:
        return _extract(args, info)
    finally:
        distributed.cleanup()


def _extract(args: argparse.Namespace, info: distributed.DistInfo) -> int:
    from disploss.vae import load_vae

    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError(
            f"--shard-size and --batch-size must be positive, got {args.shard_size} and {args.batch_size}"
        )
    out = Path(args.out)
    codec = load_vae(args.vae, info.device)
    latent_shape = codec.latent_shape(args.image_size)
    dataset = ImageFolderDataset(args.data_path, args.image_size, num_classes=args.num_classes,
                                 on_bad_image=args.on_bad_image, flip=False, alpha=args.alpha)
    count = len(dataset)
    total = num_shards(count, args.shard_size)
    plan = {
        "format": LATENT_FORMAT,
        "version": LATENT_FORMAT_VERSION,
        "image_size": args.image_size,
        "vae": args.vae,
        "scale": codec.scale,
        "shift": codec.shift,
        "latent_shape": list(latent_shape),
        "downsample_factor": codec.downsample_factor,
        "count": count,
        "num_classes": args.num_classes,
        "class_names": dataset.classes,
        "shard_size": args.shard_size,
        "num_shards": total,
        "dtype": args.dtype,
        "alpha": args.alpha,
        "data_path": os.path.abspath(args.data_path),
        "layout": LAYOUT,
    }
    problem = _prepare_out(out, plan) if info.is_main else None
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ValueError(problem)

    todo = [k for k in range(info.rank, total, info.world_size)
            if not (out / moments_name(k)).is_file() or not (out / labels_name(k)).is_file()]
    _log(f"{count} images in {total} shards of {args.shard_size}; {len(todo)} shards to compute on rank 0, "
         f"{info.world_size} process(es), latents {tuple(latent_shape)}, scale {codec.scale}")
    _encode_shards(args, info, codec, dataset, todo, out)

    distributed.barrier()
    missing = missing_shards(out, count, args.shard_size) if info.is_main else None
    if info.is_main and not missing:
        atomic_write_json(out / MANIFEST_NAME, plan)
    missing = distributed.broadcast_object(missing)
    if missing:
        _log(f"incomplete: {len(missing)} shards missing (e.g. {moments_name(missing[0])}); rerun to finish")
        return 1
    _log(f"done: {out / MANIFEST_NAME}")
    return 0


def _encode_shards(args, info, codec, dataset, todo: list[int], out: Path) -> None:
    """Encode the images of shards `todo` in order, writing each shard as soon as it is complete."""
    if not todo:
        return
    from tqdm import tqdm

    store_dtype = np.dtype(args.dtype)
    indices = [i for k in todo for i in range(k * args.shard_size, k * args.shard_size
                                               + shard_length(k, len(dataset), args.shard_size))]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=info.device.type == "cuda",
        drop_last=False,
    )
    pending = collections.deque(todo)
    buf_m: list[np.ndarray] = []
    buf_y: list[np.ndarray] = []
    buffered = 0
    for x, y in tqdm(loader, disable=not info.is_main, desc="extract-latents", unit="batch"):
        moments = encode_pair(codec, x.to(info.device, non_blocking=True))  # B 2 2 C h w
        buf_m.append(moments.cpu().numpy().astype(store_dtype))
        buf_y.append(y.numpy())
        buffered += x.shape[0]
        while pending and buffered >= shard_length(pending[0], len(dataset), args.shard_size):
            k = pending.popleft()
            n = shard_length(k, len(dataset), args.shard_size)
            all_m, all_y = np.concatenate(buf_m), np.concatenate(buf_y)
            _write_shard(out, k, all_m[:n], all_y[:n])
            buf_m, buf_y, buffered = [all_m[n:]], [all_y[n:]], buffered - n
    if pending or buffered:
        raise RuntimeError(f"internal error: {len(pending)} shards and {buffered} images left unwritten")
