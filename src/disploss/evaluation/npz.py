"""ADM's batch files: a sample batch is an .npz whose `arr_0` holds uint8 images (N, H, W, 3); a reference batch
(e.g. VIRTUAL_imagenet256_labeled.npz) may also hold precomputed statistics `mu`, `sigma` (pool_3) and `mu_s`,
`sigma_s` (spatial), and labels we ignore.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from disploss.errors import ConfigError, MissingFileError
from disploss.fileio import atomic_write

IMAGES_KEY = "arr_0"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ConfigError(f"{where}: images must be uint8 in [0, 255], found dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"{where}: images must have shape (N, H, W, 3) (NHWC, RGB), found shape {images.shape}")
    if images.shape[0] == 0:
        raise ConfigError(f"{where}: holds no images (shape {images.shape})")
    return images


def save_samples_npz(path: str | os.PathLike, images: np.ndarray) -> None:
    """Write images as an ADM sample batch (key `arr_0`), atomically.

    Args:
        path: destination file, written exactly as named (no `.npz` is appended).
        images: (N, H, W, 3) uint8 RGB images.
    """
    images = _check_images(np.asarray(images), f"save_samples_npz({os.fspath(path)!r})")

    def write(tmp: Path) -> None:
        # Through a file handle: given a path without ".npz", np.savez would write to another file name.
        with open(tmp, "wb") as f:
            np.savez(f, **{IMAGES_KEY: images})

    atomic_write(path, write)


def _open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConfigError(f"{path}: cannot be read as an .npz file ({error})") from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: is a single .npy array, not an .npz archive with key {IMAGES_KEY!r}")
    return data


def load_samples_npz(path: str | os.PathLike) -> np.ndarray:
    """Read an ADM sample batch and check it.

    Args:
        path: an .npz file with key `arr_0`.

    Returns:
        (N, H, W, 3) uint8 images, loaded into memory (a 50k x 256 x 256 batch takes 9.8 GB).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not an .npz, no `arr_0` (the keys found are listed), not uint8, or not (N, H, W, 3).
    """
    with _open_npz(path) as data:
        if IMAGES_KEY not in data.files:
            raise ConfigError(f"{path}: no key {IMAGES_KEY!r} (ADM's image key); keys found: {sorted(data.files)}")
        images = data[IMAGES_KEY]
    return _check_images(images, str(path))


@dataclasses.dataclass(frozen=True)
class ReferenceBatch:
    """The contents of an ADM reference batch; absent parts are None.

    Attributes:
        images: (N, H, W, 3) uint8 images (`arr_0`), needed for precision/recall.
        mu: (2048,) pool_3 mean, sigma: (2048, 2048) pool_3 covariance.
        mu_s: (2023,) spatial mean, sigma_s: (2023, 2023) spatial covariance.
    """

    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    @property
    def has_statistics(self) -> bool:
        """Whether both the pool and the spatial statistics were precomputed."""
        return all(getattr(self, key) is not None for key in STATISTICS_KEYS)


def _check_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, names: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ConfigError(f"{path}: statistics {names} must be (D,) and (D, D), found {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"{path}: statistics {names} contain NaN or inf values")


def load_reference_batch(path: str | os.PathLike) -> ReferenceBatch:
    """Read an ADM reference batch: precomputed statistics where present, images where present.

    Args:
        path: an .npz with `arr_0` and/or `mu`, `sigma`, `mu_s`, `sigma_s`.

    Returns:
        A ReferenceBatch; statistics are float64.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: neither images nor statistics, images of the wrong dtype or shape, statistics of
            inconsistent shapes or with NaN/inf, or only one of a (mean, covariance) pair.
    """
    with _open_npz(path) as data:
        found = sorted(data.files)
        images = data[IMAGES_KEY] if IMAGES_KEY in data.files else None
        stats = {key: data[key].astype(np.float64) for key in STATISTICS_KEYS if key in data.files}
    if images is not None:
        _check_images(images, str(path))
    for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean_key in stats) != (cov_key in stats):
            raise ConfigError(f"{path}: has only one of {mean_key!r} and {cov_key!r}; keys found: {found}")
        if mean_key in stats:
            _check_statistics(path, stats[mean_key], stats[cov_key], f"{mean_key}/{cov_key}")
    if images is None and not stats:
        raise ConfigError(
            f"{path}: neither images ({IMAGES_KEY!r}) nor statistics ({', '.join(STATISTICS_KEYS)}); "
            f"keys found: {found}"
        )
    return ReferenceBatch(images=images, **stats)
