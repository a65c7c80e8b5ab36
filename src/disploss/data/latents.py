"""The latent cache: one format module for its writer (`disploss extract-latents`, disploss.data.extract) and
its reader (`LatentsDataset`, for `train.py --latents`).

Format of a cache folder (version 1):
  plan.json                 the settings of the extraction, written first (a rerun must match it)
  moments_{k:06d}.npy       shard k: float32 or float16 (n, 2, 2, C, h, w) = [image, flipped image] x
                            [posterior mean, posterior std], unscaled, for dataset indices [k * shard_size, ...)
  labels_{k:06d}.npy        shard k: int64 (n,)
  manifest.json             written last, only once every shard exists: the cache is complete
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path

import numpy as np
import torch

from disploss.errors import ConfigError, MissingFileError
from disploss.fileio import atomic_write, atomic_write_json

LATENT_FORMAT = "disploss-latents"
LATENT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
LAYOUT = (
    "moments_{shard:06d}.npy: (n, 2, 2, C, h, w) = [image, flipped image] x [posterior mean, posterior std], "
    "unscaled; labels_{shard:06d}.npy: int64 (n,); shard k holds dataset indices [k * shard_size, ...)"
)
# Plan entries that decide the content of the shards: a rerun into the same folder must agree on them.
PLAN_KEYS_COMPARED = (
    "format", "version", "image_size", "vae", "scale", "shift", "latent_shape", "count", "num_classes",
    "class_names", "shard_size", "dtype", "alpha",
)  # fmt: skip


def moments_name(shard: int) -> str:
    """File name of the posterior moments of shard `shard`."""
    return f"moments_{shard:06d}.npy"


def labels_name(shard: int) -> str:
    """File name of the labels of shard `shard`."""
    return f"labels_{shard:06d}.npy"


def num_shards(count: int, shard_size: int) -> int:
    """Number of shards holding `count` items, `shard_size` per shard (the last one may be shorter)."""
    return -(-count // shard_size)


def shard_length(shard: int, count: int, shard_size: int) -> int:
    """Number of items in shard `shard`."""
    return min(shard_size, count - shard * shard_size)


def missing_shards(root: str | os.PathLike, count: int, shard_size: int) -> list[int]:
    """Shards of a cache whose moments or labels file is absent."""
    root = Path(root)
    return [
        k
        for k in range(num_shards(count, shard_size))
        if not (root / moments_name(k)).is_file() or not (root / labels_name(k)).is_file()
    ]


class LatentsDataset(torch.utils.data.Dataset):
    """Stochastic SD-VAE latents from a cache, without running the encoder.

    Each item draws, like the reference's `vae.encode(x).latent_dist.sample() * scale` on a randomly flipped
    image: the original or the flipped image with probability 0.5 each, then
        z = (mean + std * eps - shift) * scale,   eps ~ N(0, I),
    with torch's RNG. The shards are memory-mapped on first use in each process (DataLoader workers share
    the page cache; nothing is loaded up front).

    Args:
        root: a folder written by `disploss extract-latents`.
        flip: draw the flipped image's moments half of the time (the reference's random flip).
        sample: draw a posterior sample (the reference); False returns mean * scale (shifted likewise).
    Items:
        (z float32 (C, h, w), y int).
    Attributes:
        manifest (dict), image_size, latent_shape (C, h, w), scale, shift, num_classes, class_names, vae.
    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder is not a complete cache; the message names what is missing.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True, sample: bool = True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise MissingFileError(f"latent cache folder {self.root} does not exist")
        manifest_path = os.path.join(self.root, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise ConfigError(self._incomplete_message())
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != LATENT_FORMAT or manifest.get("version") != LATENT_FORMAT_VERSION:
            raise ConfigError(
                f"{manifest_path} is not a {LATENT_FORMAT} version {LATENT_FORMAT_VERSION} manifest "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
            )
        self.manifest = manifest
        self.count = int(manifest["count"])
        self.shard_size = int(manifest["shard_size"])
        missing = missing_shards(self.root, self.count, self.shard_size)
        if missing:
            raise ConfigError(
                f"latent cache {self.root} is incomplete although its manifest exists: "
                f"{self._describe_missing(missing)}; rerun disploss extract-latents with the same arguments"
            )
        self.image_size = int(manifest["image_size"])
        self.latent_shape = tuple(int(s) for s in manifest["latent_shape"])
        self.scale = float(manifest["scale"])
        self.shift = float(manifest.get("shift", 0.0))
        self.num_classes = int(manifest["num_classes"])
        self.class_names = list(manifest["class_names"])
        self.vae = manifest["vae"]
        self.flip = bool(flip)
        self.sample = bool(sample)
        self._moments: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}

    def _describe_missing(self, missing: list[int]) -> str:
        names = [
            n
            for k in missing[:5]
            for n in (moments_name(k), labels_name(k))
            if not os.path.isfile(os.path.join(self.root, n))
        ]
        more = f" and files of {len(missing) - 5} more shards" if len(missing) > 5 else ""
        return f"missing {', '.join(names)}{more}"

    def _incomplete_message(self) -> str:
        plan_path = os.path.join(self.root, PLAN_NAME)
        if not os.path.isfile(plan_path):
            return (
                f"{self.root} is not a latent cache: it has no {MANIFEST_NAME} "
                f"(write one with disploss extract-latents --out {self.root})"
            )
        with open(plan_path) as f:
            plan = json.load(f)
        count, shard_size = int(plan["count"]), int(plan["shard_size"])
        missing = missing_shards(self.root, count, shard_size)
        total = num_shards(count, shard_size)
        detail = f"{total - len(missing)} of {total} shards present"
        if missing:
            detail += f", {self._describe_missing(missing)}"
        return (
            f"latent cache {self.root} is incomplete: {MANIFEST_NAME} is missing ({detail}); "
            "rerun disploss extract-latents with the same arguments to finish it"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_moments"], state["_labels"] = {}, {}  # memory maps are reopened in each worker
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._moments:
            n = shard_length(k, self.count, self.shard_size)
            mpath = os.path.join(self.root, moments_name(k))
            lpath = os.path.join(self.root, labels_name(k))
            moments = np.load(mpath, mmap_mode="r")
            labels = np.load(lpath, mmap_mode="r")
            if moments.shape != (n, 2, 2, *self.latent_shape) or labels.shape != (n,):
                raise ConfigError(
                    f"latent cache shard {mpath} has shape {moments.shape} and {lpath} {labels.shape}; "
                    f"expected {(n, 2, 2, *self.latent_shape)} and {(n,)}"
                )
            self._moments[k], self._labels[k] = moments, labels
        return self._moments[k], self._labels[k]

    def __len__(self) -> int:
        return self.count

    def moments(self, index: int) -> tuple[torch.Tensor, int]:
        """The stored moments of one item.

        Returns:
            (float32 (2, 2, C, h, w) = [image, flipped] x [mean, std], label).
        """
        index = operator.index(index)
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for a cache of {self.count} items")
        index %= self.count
        moments, labels = self._shard(index // self.shard_size)
        j = index % self.shard_size
        return torch.from_numpy(np.array(moments[j], dtype=np.float32)), int(labels[j])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        m, label = self.moments(index)  # 2 2 C h w
        view = int(torch.rand(1).item() < 0.5) if self.flip else 0
        mean, std = m[view, 0], m[view, 1]  # C h w
        z = mean + std * torch.randn(mean.shape) if self.sample else mean
        return (z - self.shift) * self.scale, label


# -- the writer's side --------------------------------------------------------------------------------------------
def prepare_cache_folder(out: Path, plan: dict) -> None:
    """Create or check a cache folder before extraction (rank 0).

    Writes plan.json into a new folder; in an existing cache checks that plan.json agrees, removes stale
    temporary files, and removes manifest.json if any shard is missing (the cache is then incomplete).

    Raises:
        ConfigError: the folder is a file, holds other files, or a cache made with other settings.
        OSError: the folder cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN_NAME
    if plan_path.is_file():
        with open(plan_path) as f:
            old = json.load(f)
        diff = [k for k in PLAN_KEYS_COMPARED if old.get(k) != plan.get(k)]
        if diff:
            details = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(plan.get(k))} now" for k in diff)
            raise ConfigError(
                f"--out {out} holds a latent cache made with other settings ({details}); "
                "pass another --out or delete that folder"
            )
    else:
        visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if visible:
            raise ConfigError(
                f"--out {out} is not empty ({', '.join(sorted(visible)[:5])}...) and holds no "
                f"{PLAN_NAME}: pass an empty or new folder"
            )
        atomic_write_json(plan_path, plan)
    for p in out.glob(".*.tmp"):  # left by a killed run; atomic writes never read them
        p.unlink(missing_ok=True)
    if missing_shards(out, plan["count"], plan["shard_size"]):
        (out / MANIFEST_NAME).unlink(missing_ok=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path`, atomically."""

    # np.save on a path appends ".npy" to names without it (the temporary name), so write to a handle.
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, writer)


def write_shard(out: Path, shard: int, moments: np.ndarray, labels: np.ndarray) -> None:
    """Write shard `shard`: labels first, moments last (a shard counts as done once both exist, and each
    appears atomically)."""
    save_npy(out / labels_name(shard), labels.astype(np.int64))
    save_npy(out / moments_name(shard), moments)


def write_manifest(out: Path, plan: dict) -> None:
    """Mark the cache complete (after every shard exists)."""
    atomic_write_json(out / MANIFEST_NAME, plan)
