"""The latent cache: one format module for its writer (`disploss extract-latents`, disploss.data.extract) and
its reader (`LatentsDataset`, for `train.py --latents`).

Format of a cache folder (version 1):
  plan.json                 the settings of the extraction, written first (a rerun must match it)
  moments_{k:06d}.npy       shard k: float32 or float16 (n, 2, 2, C, h, w) = [image, flipped image] x
                            [posterior mean, posterior std], unscaled, for dataset indices [k * shard_size, ...)
  labels_{k:06d}.npy        shard k: int64 (n,)
  manifest.json             written last, only once every shard exists: the cache is complete

Reading checks, so that a damaged cache is one line naming the file instead of a traceback or a wrong loss: the
manifest and plan parse and hold the fields of their format; every shard's .npy header (dtype, shape, and that the
file holds all the bytes the header announces) is read when the dataset is opened, before a run folder exists
(a header read per file: no data is read); each item read is checked to be finite and within float16's range
(+-65504, the range of a cache stored as float16) and its label within the classes, at the cost of one pass over
the 16 K floats the item copies anyway; the error names the shard file, the row and the fix.
"""

from __future__ import annotations

import json
import math
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
MOMENT_DTYPES = ("float32", "float16")
MAX_MOMENT = 65504.0  # float16's largest finite value: a stored moment beyond it is damage (or a float16 overflow)
RERUN = "rerun disploss extract-latents with the same arguments"


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


def read_json(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from `path` (a manifest or a plan).

    Raises:
        ConfigError: the file is unreadable, not JSON or not a JSON object; the message names it and `fix`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{path} cannot be read as JSON ({type(err).__name__}: {reason}): {fix}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field: (check, what it must be); the fields a reader of the cache relies on
_FIELDS = {
    "count": (_count, "a positive integer"),
    "shard_size": (_count, "a positive integer"),
    "image_size": (_count, "a positive integer"),
    "num_classes": (_count, "a positive integer"),
    "latent_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_count, v)), "[C, h, w]"),
    "scale": (_number, "a finite number"),
    "shift": (_number, "a finite number"),
    "vae": (lambda v: isinstance(v, str) and bool(v), "the VAE's name"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of names"),
    "dtype": (lambda v: v in MOMENT_DTYPES, f"one of {', '.join(MOMENT_DTYPES)}"),
}


def check_plan(plan: dict, path: str | os.PathLike, fix: str) -> dict:
    """Check the fields of a manifest or plan that the readers rely on (types and ranges; `shift` and `dtype` may
    be absent in older caches); returns `plan`.

    Raises:
        ConfigError: naming the file, the field, what it holds and `fix`.
    """
    for key, (ok, want) in _FIELDS.items():
        if key not in plan:
            if key in ("shift", "dtype"):
                continue
            raise ConfigError(f"{path} has no {key!r} (it must hold {want}): {fix}")
        if not ok(plan[key]):
            raise ConfigError(f"{path}: {key!r} is {_short(plan[key])}, not {want}: {fix}")
    return plan


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy file, from its header only; ConfigError for a file that is not one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as err:  # numpy's messages for a damaged header
        raise ConfigError(
            f"latent cache shard {path} is not a readable .npy file ({err}); delete it and {RERUN}"
        ) from err
    if fortran or dtype.hasobject:
        what = "Python objects" if dtype.hasobject else "a Fortran-order array"
        raise ConfigError(
            f"latent cache shard {path} holds {what}, not what extract-latents writes; delete it and {RERUN}"
        )
    return tuple(shape), dtype, offset


def check_shard_file(path: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> None:
    """Check from its header that an .npy shard has `shape`, one of `dtypes`, and all the bytes its header announces
    (a truncated file would fail later, inside a loader worker, as "mmap length is greater than file size").

    Raises:
        ConfigError: naming the file, what it holds, and the fix (delete it, rerun the extraction).
    """
    found, dtype, offset = _npy_header(path)
    if found != shape or dtype.name not in dtypes:
        raise ConfigError(
            f"latent cache shard {path} holds {dtype.name} {found}, expected {' or '.join(dtypes)} {shape}; "
            f"delete it and {RERUN}"
        )
    size, want = os.path.getsize(path), offset + math.prod(shape) * dtype.itemsize
    if size != want:
        what = "truncated" if size < want else "extra bytes"
        raise ConfigError(
            f"latent cache shard {path} is {size} bytes, its header announces {want} ({what}); delete it and {RERUN}"
        )


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
        ValueError: the folder is not a complete cache (the message names what is missing), a manifest that does
            not parse or lacks a field, or a shard whose header or size is wrong (named). Reading an item raises
            ValueError for a non-finite or out-of-range value or label, naming the shard file and the row.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True, sample: bool = True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise MissingFileError(f"latent cache folder {self.root} does not exist")
        manifest_path = os.path.join(self.root, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise ConfigError(self._incomplete_message())
        fix = f"{RERUN} to rewrite it (the finished shards are kept), or delete the folder and extract again"
        manifest = read_json(manifest_path, fix)
        if manifest.get("format") != LATENT_FORMAT or manifest.get("version") != LATENT_FORMAT_VERSION:
            raise ConfigError(
                f"{manifest_path} is not a {LATENT_FORMAT} version {LATENT_FORMAT_VERSION} manifest "
                f"(format={_short(manifest.get('format'))}, version={_short(manifest.get('version'))})"
            )
        self.manifest = check_plan(manifest, manifest_path, fix)
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
        dtypes = (manifest["dtype"],) if "dtype" in manifest else MOMENT_DTYPES
        for k in range(num_shards(self.count, self.shard_size)):  # headers only: before any run folder exists
            n = shard_length(k, self.count, self.shard_size)
            check_shard_file(os.path.join(self.root, moments_name(k)), (n, 2, 2, *self.latent_shape), dtypes)
            check_shard_file(os.path.join(self.root, labels_name(k)), (n,), ("int64",))

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
        fix = f"the cache is unfinished and its plan damaged: delete {self.root} and extract again"
        plan = check_plan(read_json(plan_path, fix), plan_path, fix)
        count, shard_size = plan["count"], plan["shard_size"]
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
            try:
                moments = np.load(mpath, mmap_mode="r", allow_pickle=False)
                labels = np.load(lpath, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:  # changed since the dataset was opened (its headers were checked)
                raise ConfigError(
                    f"cannot map latent cache shard {mpath} or {lpath} ({err}); delete them and {RERUN}"
                ) from err
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
        k, j = divmod(index, self.shard_size)
        moments, labels = self._shard(k)
        m, label = np.array(moments[j], dtype=np.float32), int(labels[j])
        # One pass: the max of |m| is NaN when any value is, and NaN <= anything is False.
        if not np.abs(m).max() <= MAX_MOMENT or not 0 <= label < self.num_classes:
            self._damaged(k, j, m, label)
        return torch.from_numpy(m), label

    def _damaged(self, k: int, j: int, m: np.ndarray, label: int) -> None:
        """Raise the error for item (shard k, row j): what is wrong with it, the files, the fix."""
        if not 0 <= label < self.num_classes:
            what, where = f"label {label}, outside the {self.num_classes} classes", labels_name(k)
        else:
            nan, inf = int(np.isnan(m).sum()), int(np.isinf(m).sum())
            large = int((np.abs(np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)) > MAX_MOMENT).sum())
            counts = f"{nan} NaN, {inf} infinite, {large} beyond +-{MAX_MOMENT:g} of {m.size}"
            what = f"non-finite or out-of-range moments ({counts})"
            where = moments_name(k)
        raise ConfigError(
            f"latent cache {self.root}: item {k * self.shard_size + j} (row {j} of {where}) holds {what}: the file is "
            f"damaged; delete {moments_name(k)} and {labels_name(k)} there and {RERUN} to compute that shard again"
        )

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
        fix = f"its settings are unknown, so its shards cannot be reused: delete {out} or pass another --out"
        old = check_plan(read_json(plan_path, fix), plan_path, fix)
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

    atomic_write(path, writer, size=array.nbytes)


def write_shard(out: Path, shard: int, moments: np.ndarray, labels: np.ndarray) -> None:
    """Write shard `shard`: labels first, moments last (a shard counts as done once both exist, and each
    appears atomically)."""
    save_npy(out / labels_name(shard), labels.astype(np.int64))
    save_npy(out / moments_name(shard), moments)


def write_manifest(out: Path, plan: dict) -> None:
    """Mark the cache complete (after every shard exists)."""
    atomic_write_json(out / MANIFEST_NAME, plan)
