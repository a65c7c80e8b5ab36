"""ADM's batch files: a sample batch is an .npz whose `arr_0` holds uint8 images (N, H, W, 3); a reference batch
(e.g. VIRTUAL_imagenet256_labeled.npz) may also hold precomputed statistics `mu`, `sigma` (pool_3) and `mu_s`,
`sigma_s` (spatial), and labels we ignore.

Reading checks each member's .npy header before its data (dtype and shape: a float or object array is refused
without reading it, and an object array is never unpickled), then reads it, so that a damaged file (truncated, a
flipped byte that fails the zip CRC, a bad header) is one ConfigError naming the file and the member.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from disploss.errors import ConfigError, MissingFileError
from disploss.fileio import atomic_write

IMAGES_KEY = "arr_0"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _check_image_layout(dtype: np.dtype, shape: tuple[int, ...], where: str) -> None:
    if dtype.hasobject:
        raise ConfigError(
            f"{where}: images are an object array (pickled Python objects), refused without unpickling them; write "
            "uint8 (N, H, W, 3) images, e.g. with disploss.evaluation.save_samples_npz"
        )
    if dtype != np.uint8:
        raise ConfigError(f"{where}: images must be uint8 in [0, 255], found dtype {dtype}")
    if len(shape) != 4 or shape[-1] != 3:
        raise ConfigError(f"{where}: images must have shape (N, H, W, 3) (NHWC, RGB), found shape {tuple(shape)}")
    if shape[0] == 0:
        raise ConfigError(f"{where}: holds no images (shape {tuple(shape)})")


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    _check_image_layout(images.dtype, images.shape, where)
    return images


def save_samples_npz(path: str | os.PathLike, images: np.ndarray) -> None:
    """Write images as an ADM sample batch (key `arr_0`), atomically (a full disk: disploss.fileio.DiskFullError).

    Args:
        path: destination file, written exactly as named (no `.npz` is appended).
        images: (N, H, W, 3) uint8 RGB images.
    """
    images = _check_images(np.asarray(images), f"save_samples_npz({os.fspath(path)!r})")

    def write(tmp: Path) -> None:
        # Through a file handle: given a path without ".npz", np.savez would write to another file name.
        with open(tmp, "wb") as f:
            np.savez(f, **{IMAGES_KEY: images})

    atomic_write(path, write, size=images.nbytes)  # a full disk: one line naming the file and the space


# What numpy and zipfile raise for a damaged archive or member (a bad header, a failed CRC, a cut stream).
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, SyntaxError)
_DAMAGED = "the file is damaged or not written by numpy.savez; write it again (or fetch it again)"


def _open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such .npz file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: is empty (0 bytes); write it again")
    try:
        data = np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        raise ConfigError(
            f"{path}: cannot be read as an .npz file ({type(error).__name__}: {error}); {_DAMAGED}"
        ) from error
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: is a single .npy array, not an .npz archive with key {IMAGES_KEY!r}")
    return data


def _header(data: np.lib.npyio.NpzFile, key: str, path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of member `key`, from its .npy header only (nothing else of it is read or unpickled)."""
    name = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    try:
        with data.zip.open(name) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read(f)
    except _READ_ERRORS as error:
        raise ConfigError(f"{path}: member {key!r} has no readable .npy header ({type(error).__name__}: {error}); "
                          f"{_DAMAGED}") from error  # fmt: skip
    return tuple(shape), dtype


def _read(data: np.lib.npyio.NpzFile, key: str, path) -> np.ndarray:
    """Member `key`, read whole (its zip CRC checked); one ConfigError naming the file and the member."""
    try:
        return data[key]
    except _READ_ERRORS as error:
        raise ConfigError(
            f"{path}: member {key!r} cannot be read ({type(error).__name__}: {error}); {_DAMAGED}"
        ) from error


def _read_statistic(data: np.lib.npyio.NpzFile, key: str, path) -> np.ndarray:
    shape, dtype = _header(data, key, path)
    numeric = np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
    if dtype.hasobject or not numeric or dtype == np.bool_:
        kind = "an object array (pickled Python objects, not unpickled)" if dtype.hasobject else f"of dtype {dtype}"
        raise ConfigError(f"{path}: statistic {key!r} is {kind}, not real numbers; write float64 statistics (as ADM's "
                          "reference batches hold) or leave it out")  # fmt: skip
    return _read(data, key, path).astype(np.float64)


def load_samples_npz(path: str | os.PathLike) -> np.ndarray:
    """Read an ADM sample batch and check it.

    Args:
        path: an .npz file with key `arr_0`.

    Returns:
        (N, H, W, 3) uint8 images, loaded into memory (a 50k x 256 x 256 batch takes 9.8 GB).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not an .npz, no `arr_0` (the keys found are listed), not uint8 (an object array is refused
            without unpickling it), not (N, H, W, 3), or a damaged member (a bad header, a failed CRC).
    """
    with _open_npz(path) as data:
        if IMAGES_KEY not in data.files:
            raise ConfigError(f"{path}: no key {IMAGES_KEY!r} (ADM's image key); keys found: {sorted(data.files)}")
        _check_image_layout(*reversed(_header(data, IMAGES_KEY, path)), str(path))  # before reading any image
        images = _read(data, IMAGES_KEY, path)
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
            inconsistent shapes, of a non-numeric dtype (strings, objects) or with NaN/inf, only one of a (mean,
            covariance) pair, or a damaged member.
    """
    with _open_npz(path) as data:
        found = sorted(data.files)
        images = None
        if IMAGES_KEY in data.files:
            _check_image_layout(*reversed(_header(data, IMAGES_KEY, path)), str(path))  # before reading any image
        stats = {key: _read_statistic(data, key, path) for key in STATISTICS_KEYS if key in data.files}
        if IMAGES_KEY in data.files:
            images = _read(data, IMAGES_KEY, path)
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
