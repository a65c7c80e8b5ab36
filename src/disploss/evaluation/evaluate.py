"""Inception Score, FID, sFID, precision and recall of a sample batch, as ADM reports them (`disploss evaluate`).

The reference batch gives FID/sFID statistics (its precomputed `mu`, `sigma`, `mu_s`, `sigma_s` when present, as
ADM uses them, otherwise computed from its images) and the pool features precision/recall need (from its images).
The sample batch gives everything from its images (`arr_0`). See disploss.evaluation.inception for the features.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from disploss.errors import ConfigError, MissingFileError
from disploss.evaluation import metrics
from disploss.evaluation.inception import WEIGHTS_URL, InceptionFeatureExtractor
from disploss.evaluation.npz import ReferenceBatch, load_reference_batch, load_samples_npz
from disploss.fileio import atomic_write, check_output_file

Device = Literal["auto", "cpu", "cuda"]
NEIGHBOURHOOD_K = 3  # ADM's k for the precision/recall manifolds
CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
    """What the metrics need from the reference batch.

    Attributes:
        mu: (2048,), sigma: (2048, 2048) pool_3 statistics.
        mu_s: (2023,), sigma_s: (2023, 2023) spatial statistics.
        pool: (N, 2048) pool_3 features of the reference images, None when the batch holds statistics only.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: np.ndarray | None


def resolve_device(device: Device) -> str:
    """Map --device to a torch device string: "auto" picks CUDA when available."""
    import torch

    if device not in get_args(Device):
        raise ConfigError(f"device must be one of {get_args(Device)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_key(ref_path: Path, weights_path: Path | None) -> str:
    # The statistics depend on the reference file and on the Inception weights; size + mtime stand for content.
    weights = _file_identity(weights_path) if weights_path is not None else {"url": WEIGHTS_URL}
    key = {"version": CACHE_FORMAT_VERSION, "reference": _file_identity(ref_path), "weights": weights}
    return json.dumps(key, sort_keys=True)


def _not_our_cache(cache_path: Path) -> str | None:
    """None when cache_path is missing or a reference cache written by `_write_cache`, else what it is."""
    if not cache_path.exists():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                return "a .npy array"
            if "cache_key" not in data.files:
                return f"an .npz with the keys {sorted(data.files)[:8]}"
            key = json.loads(str(data["cache_key"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        return f"not a readable .npz: {error}"
    if not (isinstance(key, dict) and "version" in key and "reference" in key):
        return "an .npz whose cache_key is not ours"
    return None


def check_ref_cache(cache_path: Path, ref_path: Path, sample_path: Path, weights_path: Path | None) -> None:
    """Before any work: --ref-cache can be written, is no input, and is missing or a cache of ours (so it is never
    written over another file, e.g. the reference batch itself or another .npz)."""
    inputs = {"reference batch": ref_path, "sample batch": sample_path, "Inception weights file": weights_path}
    check_output_file(cache_path, "--ref-cache", inputs)
    what = _not_our_cache(cache_path)
    if what is not None:
        raise ConfigError(
            f"--ref-cache {cache_path} exists and is not a reference cache written by disploss evaluate ({what}); "
            "it was left as it is: choose another path, or remove that file"
        )


def _read_cache(cache_path: Path, key: str) -> ReferenceStatistics | None:
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if "cache_key" not in data.files or str(data["cache_key"]) != key:
                print(f"reference cache {cache_path} is stale (reference file or weights changed); recomputing")
                return None
            return ReferenceStatistics(
                mu=data["mu"],
                sigma=data["sigma"],
                mu_s=data["mu_s"],
                sigma_s=data["sigma_s"],
                pool=data["pool"] if "pool" in data.files else None,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        print(f"reference cache {cache_path} is unreadable ({error}); recomputing")
        return None


def _write_cache(cache_path: Path, key: str, stats: ReferenceStatistics) -> None:
    arrays = {
        "cache_key": np.array(key),
        "mu": stats.mu,
        "sigma": stats.sigma,
        "mu_s": stats.mu_s,
        "sigma_s": stats.sigma_s,
    }
    if stats.pool is not None:
        arrays["pool"] = stats.pool

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a handle, so numpy does not append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(cache_path, write)


def reference_statistics(
    ref_path: Path,
    extractor: InceptionFeatureExtractor,
    *,
    batch_size: int = 64,
    progress: bool = True,
    ref: ReferenceBatch | None = None,
) -> ReferenceStatistics:
    """Statistics and pool features of a reference batch; precomputed statistics win, as in ADM.

    Args:
        ref_path: ADM reference batch (.npz with `arr_0` and/or `mu`, `sigma`, `mu_s`, `sigma_s`).
        extractor: the Inception feature extractor.
        batch_size: images per Inception forward pass.
        progress: show a progress bar.
        ref: the batch, when already read and checked (`load_reference_batch`, `check_reference`).

    Returns:
        ReferenceStatistics; `pool` is None when the batch holds no images.
    """
    ref = check_reference(load_reference_batch(ref_path) if ref is None else ref, ref_path)
    pool = None
    stats = {key: getattr(ref, key) for key in ("mu", "sigma", "mu_s", "sigma_s")}
    if ref.images is not None:
        print(f"computing reference batch activations ({len(ref.images)} images)...")
        features = extractor(ref.images, batch_size=batch_size, progress=progress)
        pool = features.pool
        if stats["mu"] is None:
            stats["mu"], stats["sigma"] = metrics.compute_statistics(features.pool)
        if stats["mu_s"] is None:
            stats["mu_s"], stats["sigma_s"] = metrics.compute_statistics(features.spatial)
    return ReferenceStatistics(pool=pool, **stats)


def check_reference(ref: ReferenceBatch, ref_path) -> ReferenceBatch:
    """What the metrics need of a reference batch: at least k + 1 images, or all four statistics; returns `ref`."""
    if ref.images is not None and len(ref.images) < NEIGHBOURHOOD_K + 1:
        raise ConfigError(
            f"{ref_path}: has {len(ref.images)} images; precision/recall need at least {NEIGHBOURHOOD_K + 1}"
        )
    if ref.images is None and not ref.has_statistics:
        missing = [key for key in ("mu", "sigma", "mu_s", "sigma_s") if getattr(ref, key) is None]
        raise ConfigError(f"{ref_path}: has no images (arr_0) and lacks the statistics {missing}")
    return ref


def evaluate(
    ref_path: str | os.PathLike,
    sample_path: str | os.PathLike,
    *,
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: Device = "auto",
    ref_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Compute ADM's five numbers for a sample batch against a reference batch.

    Args:
        ref_path: ADM reference batch .npz.
        sample_path: ADM sample batch .npz (`arr_0`, uint8 (N, H, W, 3), N >= 4).
        weights_path: local Inception weights; None downloads them as torch-fidelity does.
        batch_size: images per Inception forward pass.
        device: "auto", "cpu" or "cuda".
        ref_cache: .npz to cache the reference statistics and features in, reused while the reference file
            (size, mtime) and the weights are unchanged; it is never written over an input or over a file that
            is not such a cache (a ConfigError before any work).
        progress: show progress bars.

    Returns:
        {"inception_score", "fid", "sfid", "precision", "recall"} as floats (precision and recall None when the
        reference batch has no images), plus "num_samples", "num_reference_images" and, when precision/recall
        are unavailable, "precision_recall_unavailable" with the reason.
    """
    ref_path, sample_path = Path(ref_path), Path(sample_path)
    weights_path = Path(weights_path) if weights_path is not None else None
    torch_device = resolve_device(device)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not ref_path.is_file():
        raise MissingFileError(f"{ref_path}: no such reference batch")
    if ref_cache is not None:  # before anything is read or computed
        check_ref_cache(Path(ref_cache), ref_path, sample_path, weights_path)
    samples = load_samples_npz(sample_path)
    if len(samples) < NEIGHBOURHOOD_K + 1:
        raise ConfigError(
            f"{sample_path}: has {len(samples)} images; precision/recall (k={NEIGHBOURHOOD_K}) need at least "
            f"{NEIGHBOURHOOD_K + 1}"
        )
    ref_stats, key = None, ""
    if ref_cache is not None:
        ref_cache = Path(ref_cache)
        key = _cache_key(ref_path, weights_path)
        ref_stats = _read_cache(ref_cache, key)
        if ref_stats is not None:
            print(f"reusing reference statistics from {ref_cache}")
    # Both inputs are read and checked before the Inception network is built: a damaged file fails first.
    ref = check_reference(load_reference_batch(ref_path), ref_path) if ref_stats is None else None
    extractor = InceptionFeatureExtractor(weights_path, device=torch_device)
    if ref_stats is None:
        ref_stats = reference_statistics(ref_path, extractor, batch_size=batch_size, progress=progress, ref=ref)
        if ref_cache is not None:
            _write_cache(ref_cache, key, ref_stats)

    print(f"computing sample batch activations ({len(samples)} images)...")
    features = extractor(samples, batch_size=batch_size, progress=progress)
    mu, sigma = metrics.compute_statistics(features.pool)
    mu_s, sigma_s = metrics.compute_statistics(features.spatial)

    print("computing evaluations...")
    result = {
        "inception_score": metrics.inception_score(features.probs),
        "fid": metrics.frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma),
        "sfid": metrics.frechet_distance(mu_s, sigma_s, ref_stats.mu_s, ref_stats.sigma_s),
        "precision": None,
        "recall": None,
        "num_samples": len(samples),
        "num_reference_images": None if ref_stats.pool is None else len(ref_stats.pool),
    }
    if ref_stats.pool is None:
        result["precision_recall_unavailable"] = (
            f"the reference batch {ref_path} holds statistics but no images (arr_0); precision/recall need "
            "reference features"
        )
    else:
        result["precision"], result["recall"] = metrics.precision_recall(
            ref_stats.pool, features.pool, k=NEIGHBOURHOOD_K, device=torch_device
        )
    return result
