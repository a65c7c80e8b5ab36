"""The metric math of ADM's evaluation suite (openai/guided-diffusion `evaluations/evaluator.py`) as pure functions.

Every function takes numpy arrays of Inception features or probabilities and returns Python floats, computed in
float64. Features are rows: N images by D feature dimensions, D = 2048 for pool_3 (FID, precision/recall) and
D = 2023 for the spatial mixed_6/conv features (sFID).
"""

from __future__ import annotations

import warnings

import numpy as np

from disploss.errors import ConfigError


def _as_float64_matrix(name: str, features: np.ndarray, min_rows: int) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ConfigError(f"{name} must be 2-D (N, D) features, got shape {features.shape}")
    if features.shape[0] < min_rows:
        raise ConfigError(f"{name} needs at least {min_rows} rows (images), got {features.shape[0]}")
    features = features.astype(np.float64, copy=False)
    if not np.isfinite(features).all():
        raise ConfigError(f"{name} contains NaN or inf values")
    return features


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a set of feature vectors, as ADM's `compute_statistics`.

    Args:
        features: (N, D) features, N >= 2.

    Returns:
        mu: (D,) float64 mean.
        sigma: (D, D) float64 covariance, np.cov(features, rowvar=False) (normalised by N - 1).
    """
    features = _as_float64_matrix("features", features, min_rows=2)
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    import scipy
    from scipy import linalg

    # SciPy 1.16 deprecated `disp`; older versions print a warning to stdout unless disp=False.
    major, minor = (int(part) for part in scipy.__version__.split(".")[:2])
    if (major, minor) >= (1, 16):
        return linalg.sqrtm(matrix)
    root, _ = linalg.sqrtm(matrix, disp=False)
    return root


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between two Gaussians, as ADM's `FIDStatistics.frechet_distance`.

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy.linalg.sqrtm. When the square root of the
    product is not finite (a singular product), eps * I is added to both covariances and the root recomputed; a
    negligible imaginary part (diagonal within 1e-3 of zero, ADM's tolerance) is dropped.

    Args:
        mu1: (D,) mean of the first set (a scalar is read as D = 1).
        sigma1: (D, D) covariance of the first set.
        mu2: (D,) mean of the second set.
        sigma2: (D, D) covariance of the second set.
        eps: diagonal offset used only when the product is singular.

    Returns:
        The distance as a float (FID for pool_3 statistics, sFID for spatial ones).

    Raises:
        ValueError: shapes differ or are not (D,) / (D, D), an input holds NaN or inf, or the square root has a
            large imaginary part.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ConfigError(f"mean vectors must both be (D,) with the same D, got shapes {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ConfigError(
            f"covariances must both be ({dim}, {dim}) to match the means {mu1.shape}, "
            f"got shapes {sigma1.shape} and {sigma2.shape}"
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ConfigError(f"{name} contains NaN or inf values; the statistics are broken")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: singular product of covariances; adding {eps} to their diagonals", stacklevel=2
        )
        offset = np.eye(dim) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ConfigError(
                f"sqrtm(sigma1 @ sigma2) has a large imaginary component ({largest:.3g}); "
                "the covariances are not positive semi-definite or too few images were used"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score as ADM's `compute_inception_score`: mean over chunks of exp(E_x KL(p(y|x) || p(y))).

    The rows are split, in order, into chunks of `split_size` (the last chunk may be smaller, as in ADM); p(y) is
    the mean row of each chunk. 50,000 samples give ADM's 10 splits of 5000. Terms with p(y|x) = 0 count as 0
    (0 log 0 = 0), where ADM's float arithmetic would give NaN.

    Args:
        probs: (N, K) class probabilities, rows summing to 1 (the softmax over Inception's 1008 logits).
        split_size: rows per chunk.

    Returns:
        The score, a float in [1, K].
    """
    from scipy.special import xlogy

    probs = _as_float64_matrix("probs", probs, min_rows=1)
    if split_size < 1:
        raise ConfigError(f"split_size must be >= 1, got {split_size}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ConfigError("probs must be non-negative with rows summing to 1 (softmax outputs)")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]  # (n, K)
        marginal = part.mean(axis=0, keepdims=True)  # (1, K)
        kl = xlogy(part, part) - xlogy(part, marginal)  # (n, K)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_sq_dists(a, b):
    # ||a||^2 - 2 a.b + ||b||^2, clamped at 0 against cancellation (ADM's `_batch_pairwise_distances`).
    sq = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]  # (R, C)
    return sq.clamp_min_(0.0)


def _knn_radii(features, k: int, batch_size: int):
    """Squared distance of each row to its k-th nearest other row, (N,), in chunks of batch_size x batch_size."""
    import torch

    n = features.shape[0]
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0 : r0 + batch_size]  # (R, D)
        best = torch.full((rows.shape[0], k), float("inf"), dtype=features.dtype, device=features.device)
        row_ids = torch.arange(r0, r0 + rows.shape[0], device=features.device)
        for c0 in range(0, n, batch_size):
            cols = features[c0 : c0 + batch_size]  # (C, D)
            dist = _pairwise_sq_dists(rows, cols)  # (R, C)
            col_ids = torch.arange(c0, c0 + cols.shape[0], device=features.device)
            dist.masked_fill_(row_ids[:, None] == col_ids[None, :], float("inf"))  # a point is not its own neighbour
            best = torch.topk(torch.cat([best, dist], dim=1), k, dim=1, largest=False).values  # (R, k), sorted
        radii[r0 : r0 + rows.shape[0]] = best[:, k - 1]
    return radii


def precision_recall(
    ref_features: np.ndarray,
    sample_features: np.ndarray,
    k: int = 3,
    *,
    batch_size: int = 4096,
    device: str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds, as ADM's `compute_prec_recall`.

    Distances are squared Euclidean. The manifold of a set is the union of balls around its points whose radius
    is the distance to the point's k-th nearest other point (the point itself excluded). A point lies inside a
    manifold when its distance to some ball centre is <= that ball's radius.
    Precision = share of samples inside the reference manifold; recall = share of reference points inside the
    sample manifold. Distances are computed in float64 in (batch_size x batch_size) blocks, so memory stays
    O(batch_size^2 + N D) for any N (ADM used float16 blocks, which changes a few borderline points).

    Args:
        ref_features: (N1, D) reference features, N1 >= k + 1.
        sample_features: (N2, D) sample features, N2 >= k + 1.
        k: neighbourhood size (ADM: 3).
        batch_size: rows and columns per distance block.
        device: torch device for the distance blocks ("cpu", "cuda", ...).

    Returns:
        (precision, recall), floats in [0, 1].
    """
    import torch

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    ref = _as_float64_matrix("ref_features", ref_features, min_rows=0)
    sample = _as_float64_matrix("sample_features", sample_features, min_rows=0)
    if ref.shape[1] != sample.shape[1]:
        raise ConfigError(f"feature sizes differ: ref_features {ref.shape} vs sample_features {sample.shape}")
    for name, feats in (("ref_features", ref), ("sample_features", sample)):
        if feats.shape[0] < k + 1:
            raise ConfigError(
                f"{name} has {feats.shape[0]} points; precision/recall with k={k} needs at least {k + 1} "
                "(each point needs k other points to define its radius)"
            )

    ref_t = torch.from_numpy(ref).to(device)
    sample_t = torch.from_numpy(sample).to(device)
    ref_radii = _knn_radii(ref_t, k, batch_size)  # (N1,)
    sample_radii = _knn_radii(sample_t, k, batch_size)  # (N2,)

    sample_in_ref = torch.zeros(sample_t.shape[0], dtype=torch.bool, device=sample_t.device)
    ref_in_sample = torch.zeros(ref_t.shape[0], dtype=torch.bool, device=ref_t.device)
    for s0 in range(0, sample_t.shape[0], batch_size):
        s_rows = sample_t[s0 : s0 + batch_size]  # (S, D)
        s_radii = sample_radii[s0 : s0 + batch_size]  # (S,)
        for r0 in range(0, ref_t.shape[0], batch_size):
            r_rows = ref_t[r0 : r0 + batch_size]  # (R, D)
            dist = _pairwise_sq_dists(s_rows, r_rows)  # (S, R)
            sample_in_ref[s0 : s0 + s_rows.shape[0]] |= (dist <= ref_radii[None, r0 : r0 + r_rows.shape[0]]).any(1)
            ref_in_sample[r0 : r0 + r_rows.shape[0]] |= (dist <= s_radii[:, None]).any(0)
    precision = sample_in_ref.double().mean().item()
    recall = ref_in_sample.double().mean().item()
    return float(precision), float(recall)
