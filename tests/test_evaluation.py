"""disploss.evaluation: ADM's metric math against independent derivations, the batch files, a random-weight
Inception-v3 end to end, and `disploss evaluate` on tiny batches. CPU only, no downloads."""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error

import numpy as np
import pytest
import torch

from disploss.commands.main import main
from disploss.evaluation import (
    InceptionFeatureExtractor,
    InceptionWeightsError,
    compute_statistics,
    frechet_distance,
    inception_score,
    load_reference_batch,
    load_samples_npz,
    metrics,
    precision_recall,
    save_samples_npz,
)
from disploss.evaluation.inception import NUM_CLASSES, POOL_DIM, SPATIAL_DIM, WEIGHTS_URL
from trainkit import make_random_inception_weights

# --------------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compute_statistics_matches_np_cov(dtype):
    features = np.random.default_rng(0).normal(size=(7, 4)).astype(dtype)
    mu, sigma = compute_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    # unbiased: sum of outer products of centred rows over N - 1
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(features) - 1), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)


@pytest.mark.parametrize(
    "features, message",
    [
        (np.zeros((1, 3)), "at least 2 rows"),
        (np.zeros(5), "2-D"),
        (np.array([[0.0, 1.0], [np.nan, 2.0]]), "NaN or inf"),
    ],
)
def test_compute_statistics_rejects_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        compute_statistics(features)


# ------------------------------------------------------------------------------------------------------ frechet


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)])
def test_frechet_distance_1d_closed_form(m1, s1, m2, s2):
    # Between N(m1, s1^2) and N(m2, s2^2): (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2.
    expected = (m1 - m2) ** 2 + s1**2 + s2**2 - 2 * s1 * s2
    got = frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert got == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(m1, s1**2, m2, s2**2) == pytest.approx(expected, abs=1e-10)  # scalars, as ADM allows


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_frechet_distance_matches_direct_and_symmetric_forms(dim):
    from scipy import linalg

    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    got = frechet_distance(mu1, s1, mu2, s2)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    # Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2), the square root of a symmetric PSD matrix: eigenvalues only.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    symmetric = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    )
    assert got == pytest.approx(direct, rel=1e-9, abs=1e-9)
    assert got == pytest.approx(symmetric, rel=1e-7, abs=1e-7)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-7, abs=1e-7)


def test_frechet_distance_diagonal_closed_form():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = compute_statistics(np.random.default_rng(1).normal(size=(50, 8)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rank_deficient_covariances_stay_finite():
    # Fewer images than dimensions, as with a few samples and 2048-d features: singular covariances.
    rng = np.random.default_rng(2)
    mu1, s1 = compute_statistics(rng.normal(size=(4, 12)))
    mu2, s2 = compute_statistics(rng.normal(size=(4, 12)) + 1.0)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got) and got > 0


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), r"\(3,\) and \(4,\)"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)), r"\(3, 3\) and \(4, 4\)"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.full((3, 3), np.nan)), "sigma2 contains NaN"),
        ((np.array([np.inf, 0.0]), np.eye(2), np.zeros(2), np.eye(2)), "mu1 contains NaN or inf"),
    ],
)
def test_frechet_distance_rejects_bad_statistics(args, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(*args)


def test_frechet_distance_large_imaginary_part_is_an_error():
    # A "covariance" with a negative eigenvalue: sqrtm(diag(1, -1)) = diag(1, i).
    with pytest.raises(ValueError, match="large imaginary component"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------------------------------------- inception score


@pytest.mark.parametrize("num_classes", [2, 10, 1008])
def test_inception_score_confident_and_uniform_equals_number_of_classes(num_classes):
    probs = np.eye(num_classes)[np.arange(3 * num_classes) % num_classes]  # one-hot, each class equally often
    assert inception_score(probs) == pytest.approx(num_classes, rel=1e-12)


def test_inception_score_identical_rows_is_one():
    row = np.random.default_rng(3).dirichlet(np.ones(10))
    assert inception_score(np.tile(row, (20, 1))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_averages_over_splits():
    confident = np.eye(4)  # IS 4
    identical = np.full((4, 4), 0.25)  # IS 1
    probs = np.concatenate([confident, identical])
    assert inception_score(probs, split_size=4) == pytest.approx((4 + 1) / 2)
    # ADM keeps a short last split: 4 + 4 + 2 rows.
    probs = np.concatenate([confident, identical, np.eye(2, 4)])
    assert inception_score(probs, split_size=4) == pytest.approx((4 + 1 + 2) / 3)


def test_inception_score_matches_direct_formula():
    probs = np.random.default_rng(4).dirichlet(np.ones(6) * 0.5, size=30)
    marginal = probs.mean(0)
    expected = math.exp(np.mean([np.sum(p * np.log(p / marginal)) for p in probs]))
    assert inception_score(probs, split_size=5000) == pytest.approx(expected, rel=1e-12)


def test_inception_score_rejects_non_probabilities():
    with pytest.raises(ValueError, match="rows summing to 1"):
        inception_score(np.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="split_size"):
        inception_score(np.eye(3), split_size=0)


# ----------------------------------------------------------------------------------------- precision and recall


def test_precision_recall_hand_built_k1():
    # k = 1: each radius is the squared distance to the nearest other point of the same set.
    ref = np.array([0.0, 1.0, 2.0, 10.0, 11.0])[:, None]  # radii 1, 1, 1, 1, 1
    sample = np.array([0.5, 2.9, 3.5, 10.5, 10.6, 30.0])[:, None]  # radii 5.76, .36, .36, .01, .01, 376.36
    # precision: 0.5 (0.25 from 0), 2.9 (0.81 from 2), 10.5, 10.6 inside; 3.5 (2.25 from 2) and 30 outside.
    # recall: 0, 1, 2 lie in the ball of 0.5 (radius 5.76), 11 in that of 30 (361 <= 376.36); 10 in none.
    precision, recall = precision_recall(ref, sample, k=1)
    assert precision == pytest.approx(4 / 6)
    assert recall == pytest.approx(4 / 5)


def test_precision_recall_hand_built_k3_boundary_counts_as_inside():
    # k = 3 on integers (exact distances): ref radii are the 3rd nearest other point: 9, 4, 4, 9.
    ref = np.array([0.0, 1.0, 2.0, 3.0])[:, None]
    sample = np.array([-3.0, 1.0, 6.0, 7.0, 20.0])[:, None]
    # -3 is at squared distance 9 from 0, exactly its radius: inside. 1 inside; 6 is 9 from 3: inside (boundary);
    # 7 is 16 from 3 and 25 from 2: outside; 20 outside.
    # Sample radii: -3 -> 3rd nearest of (16, 81, 100, 529) = 100; so 0, 1, 2, 3 all lie within 100 of -3.
    precision, recall = precision_recall(ref, sample, k=3)
    assert precision == pytest.approx(3 / 5)
    assert recall == pytest.approx(1.0)


def _brute_force_precision_recall(ref, sample, k):
    def sq_dists(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    def radii(x):
        d = sq_dists(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    cross = sq_dists(sample, ref)  # (N2, N1)
    precision = np.mean((cross <= radii(ref)[None, :]).any(1))
    recall = np.mean((cross <= radii(sample)[:, None]).any(0))
    return precision, recall


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_brute_force_for_any_batch_size(batch_size, k):
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(23, 5))
    sample = rng.normal(size=(17, 5)) * 0.7 + 0.6
    expected = _brute_force_precision_recall(ref, sample, k)
    assert precision_recall(ref, sample, k=k, batch_size=batch_size) == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both matter


def test_precision_recall_identical_sets_are_perfect():
    features = np.random.default_rng(6).normal(size=(12, 3))
    assert precision_recall(features, features.copy(), k=3) == (1.0, 1.0)


@pytest.mark.parametrize(
    "ref_shape, sample_shape, message",
    [
        ((3, 4), (10, 4), r"ref_features has 3 points; precision/recall with k=3 needs at least 4"),
        ((10, 4), (2, 4), r"sample_features has 2 points; .* needs at least 4"),
        ((10, 4), (10, 5), r"feature sizes differ: ref_features \(10, 4\) vs sample_features \(10, 5\)"),
    ],
)
def test_precision_recall_rejects_bad_inputs(ref_shape, sample_shape, message):
    with pytest.raises(ValueError, match=message):
        precision_recall(np.zeros(ref_shape), np.zeros(sample_shape), k=3)


# --------------------------------------------------------------------------------------------------- npz files


def _images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_samples_npz_round_trip_writes_exactly_the_named_file(tmp_path):
    images = _images(3, 0)
    path = tmp_path / "samples_without_suffix"
    save_samples_npz(path, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_without_suffix"]  # no ".npz", no temp file
    np.testing.assert_array_equal(load_samples_npz(path), images)
    with np.load(path) as data:
        assert data.files == ["arr_0"]


def test_save_samples_npz_rejects_float_images(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), dtype=np.float32))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"images": _images(2, 0)}, r"no key 'arr_0' .* keys found: \['images'\]"),
        ({"arr_0": _images(2, 0).astype(np.float32)}, "found dtype float32"),
        ({"arr_0": _images(2, 0)[..., 0]}, r"\(N, H, W, 3\).*found shape \(2, 16, 16\)"),
        ({"arr_0": np.zeros((2, 3, 16, 16), dtype=np.uint8)}, r"found shape \(2, 3, 16, 16\)"),
    ],
)
def test_load_samples_npz_rejects_bad_files(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_samples_npz(path)
    assert str(path) in str(info.value)


def test_load_samples_npz_missing_and_npy_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz: no such"):
        load_samples_npz(tmp_path / "nothere.npz")
    np.save(tmp_path / "single.npy", _images(2, 0))
    with pytest.raises(ValueError, match="single .npy array, not an .npz"):
        load_samples_npz(tmp_path / "single.npy")


def test_load_reference_batch_statistics_and_images(tmp_path):
    rng = np.random.default_rng(7)
    stats = {"mu": rng.normal(size=3), "sigma": np.eye(3), "mu_s": rng.normal(size=2), "sigma_s": np.eye(2)}
    np.savez(tmp_path / "full.npz", arr_0=_images(4, 1), arr_1=np.arange(4), **stats)
    ref = load_reference_batch(tmp_path / "full.npz")
    assert ref.has_statistics and ref.images.shape == (4, 16, 16, 3)
    for key, value in stats.items():
        np.testing.assert_array_equal(getattr(ref, key), value)

    np.savez(tmp_path / "stats_only.npz", **stats)
    ref = load_reference_batch(tmp_path / "stats_only.npz")
    assert ref.images is None and ref.has_statistics

    np.savez(tmp_path / "images_only.npz", arr_0=_images(4, 1))
    ref = load_reference_batch(tmp_path / "images_only.npz")
    assert ref.mu is None and not ref.has_statistics


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"labels": np.arange(3)}, r"neither images .* keys found: \['labels'\]"),
        ({"mu": np.zeros(3)}, "only one of 'mu' and 'sigma'"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"mu/sigma must be \(D,\) and \(D, D\), found \(3,\) and \(4, 4\)"),
        ({"arr_0": _images(2, 0).astype(np.int64)}, "found dtype int64"),
        ({"mu_s": np.zeros(2), "sigma_s": np.diag([1.0, np.inf])}, "mu_s/sigma_s contain NaN or inf"),
    ],
)
def test_load_reference_batch_rejects_bad_files(tmp_path, arrays, message):
    np.savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_reference_batch(tmp_path / "ref.npz")


# ------------------------------------------------------------------------------------ random-weight Inception


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    return make_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="session")
def extractor(random_inception_weights):
    return InceptionFeatureExtractor(random_inception_weights, device="cpu")


def test_inception_features_shapes_and_readouts(extractor):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = _images(3, 8, size=24)
    features = extractor(images, batch_size=2, progress=False)
    assert features.pool.shape == (3, POOL_DIM) and features.pool.dtype == np.float32
    assert features.spatial.shape == (3, SPATIAL_DIM) == (3, 2023)
    assert features.probs.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(features.probs.sum(1), 1.0, rtol=1e-12)

    model = extractor.model
    # probs: softmax(pool_3 @ W) without the bias, as ADM's `softmax/logits/MatMul` read-out.
    logits = features.pool.astype(np.float64) @ model.fc.weight.double().numpy().T
    expected_probs = np.exp(logits - logits.max(1, keepdims=True))
    expected_probs /= expected_probs.sum(1, keepdims=True)
    np.testing.assert_allclose(features.probs, expected_probs, rtol=1e-4, atol=1e-9)

    # spatial: run the layers by hand up to TF's mixed_6/conv = Mixed_6d.branch1x1, keep 7 channels, NHWC order.
    with torch.inference_mode():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"]:  # fmt: skip
            x = getattr(model, name)(x)
        conv = model.Mixed_6d.branch1x1(x).numpy()  # (N, 192, 17, 17)
    assert conv.shape == (3, 192, 17, 17)
    n, c, h, w = 1, 5, 16, 3
    assert features.spatial[n, (h * 17 + w) * 7 + c] == pytest.approx(float(conv[n, c, h, w]), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(features.spatial, conv[:, :7].transpose(0, 2, 3, 1).reshape(3, -1), rtol=1e-4, atol=1e-6)
    assert features.spatial.std() > 0 and features.pool.std() > 0

    # Batching does not change the answer.
    one_batch = extractor(images, batch_size=64, progress=False)
    np.testing.assert_allclose(one_batch.pool, features.pool, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_inception_tf32_is_off_during_the_forward_pass_and_restored(extractor, monkeypatch, allow_tf32):
    monkeypatch.setattr(extractor, "allow_tf32", allow_tf32)
    seen = []
    handle = extractor.model.Mixed_6d.register_forward_hook(lambda *args: seen.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        extractor(_images(1, 9), progress=False)
        assert seen == [allow_tf32]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        handle.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_inception_weights_errors_name_the_flag(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.raises(FileNotFoundError, match="does not exist; pass --inception-weights PATH"):
        InceptionFeatureExtractor(tmp_path / "missing.pth")

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match torch-fidelity's Inception-v3"):
        InceptionFeatureExtractor(tmp_path / "wrong.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        InceptionFeatureExtractor(tmp_path / "garbage.pth")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsError, match="could not download") as info:
        InceptionFeatureExtractor(None)
    assert "--inception-weights PATH" in str(info.value) and WEIGHTS_URL in str(info.value)


# ---------------------------------------------------------------------------------------- disploss evaluate


def _cli(tmp_path, weights, ref, sample, *extra):
    argv = ["evaluate", str(ref), str(sample), "--inception-weights", str(weights), "--device", "cpu",
            "--batch-size", "4", "--no-progress", *map(str, extra)]  # fmt: skip
    return main(argv)


def _write_batches(tmp_path, n_ref=6, n_sample=5):
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=_images(n_ref, 10))
    save_samples_npz(sample, _images(n_sample, 11, size=20))
    return ref, sample


def test_cli_evaluate_end_to_end(tmp_path, random_inception_weights, capsys):
    # The real thing: two 2048-d sqrtm (the slowest test here, ~20 s on two CPU cores).
    ref, sample = _write_batches(tmp_path)
    out, cache = tmp_path / "out" / "metrics.json", tmp_path / "ref_stats.npz"
    assert _cli(tmp_path, random_inception_weights, ref, sample, "--out", out, "--ref-cache", cache) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if ":" in line and not line.startswith("wrote")]
    labels = [line.split(":")[0] for line in printed[-5:]]
    assert labels == ["Inception Score", "FID", "sFID", "Precision", "Recall"]

    result = json.loads(out.read_text())
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert math.isfinite(result[key]), key
        assert f"{result[key]!r}" in "\n".join(printed)
    assert 1.0 <= result["inception_score"] <= NUM_CLASSES
    assert result["fid"] > 0 and result["sfid"] > 0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert result["num_samples"] == 5 and result["num_reference_images"] == 6
    with np.load(cache) as data:
        assert {"cache_key", "mu", "sigma", "mu_s", "sigma_s", "pool"} <= set(data.files)
        assert data["pool"].shape == (6, POOL_DIM) and data["sigma_s"].shape == (SPATIAL_DIM, SPATIAL_DIM)


@pytest.fixture
def fast_frechet(monkeypatch):
    # The tests below are about caching and missing inputs, not the math: skip the 2048-d sqrtm.
    monkeypatch.setattr(metrics, "frechet_distance", lambda mu1, s1, mu2, s2: float(np.sum((mu1 - mu2) ** 2)))


def test_cli_reference_cache_is_reused(tmp_path, random_inception_weights, fast_frechet, monkeypatch, capsys):
    ref, sample = _write_batches(tmp_path)
    cache = tmp_path / "ref_stats.npz"
    passes = []
    original_call = InceptionFeatureExtractor.__call__

    def counting_call(self, images, *args, **kwargs):
        passes.append(len(images))
        return original_call(self, images, *args, **kwargs)

    monkeypatch.setattr(InceptionFeatureExtractor, "__call__", counting_call)
    outs = [tmp_path / "first.json", tmp_path / "second.json"]
    assert _cli(tmp_path, random_inception_weights, ref, sample, "--ref-cache", cache, "--out", outs[0]) == 0
    assert passes == [6, 5]  # reference, then samples
    assert _cli(tmp_path, random_inception_weights, ref, sample, "--ref-cache", cache, "--out", outs[1]) == 0
    assert passes == [6, 5, 5]  # samples only
    assert "reusing reference statistics" in capsys.readouterr().out
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())


def test_reference_cache_goes_stale_when_the_reference_or_weights_change(tmp_path, capsys):
    from disploss.evaluation.evaluate import ReferenceStatistics, _cache_key, _read_cache, _write_cache

    ref, weights = tmp_path / "ref.npz", tmp_path / "weights.pth"
    np.savez(ref, arr_0=_images(4, 0))
    weights.write_bytes(b"w")
    stats = ReferenceStatistics(mu=np.zeros(2), sigma=np.eye(2), mu_s=np.ones(3), sigma_s=np.eye(3), pool=None)
    cache = tmp_path / "cache.npz"
    _write_cache(cache, _cache_key(ref, weights), stats)
    cached = _read_cache(cache, _cache_key(ref, weights))
    np.testing.assert_array_equal(cached.mu_s, stats.mu_s)
    assert cached.pool is None

    assert _read_cache(cache, _cache_key(ref, None)) is None  # the default (downloaded) weights instead
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))  # the reference "changed"
    assert _read_cache(cache, _cache_key(ref, weights)) is None
    assert "is stale" in capsys.readouterr().out
    cache.write_bytes(b"not an npz")
    assert _read_cache(cache, _cache_key(ref, weights)) is None
    assert "is unreadable" in capsys.readouterr().out


def test_cli_statistics_only_reference_reports_precision_recall_unavailable(
    tmp_path, random_inception_weights, fast_frechet, capsys
):
    rng = np.random.default_rng(12)
    ref = tmp_path / "virtual_ref.npz"
    np.savez(ref, mu=rng.normal(size=POOL_DIM), sigma=np.eye(POOL_DIM), mu_s=rng.normal(size=SPATIAL_DIM),
             sigma_s=np.eye(SPATIAL_DIM))  # fmt: skip
    sample = tmp_path / "sample.npz"
    save_samples_npz(sample, _images(4, 13))
    out = tmp_path / "metrics.json"
    assert _cli(tmp_path, random_inception_weights, ref, sample, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "Precision: unavailable" in printed and "Recall: unavailable" in printed
    assert "holds statistics but no images" in printed
    result = json.loads(out.read_text())
    assert result["precision"] is None and result["recall"] is None and math.isfinite(result["fid"])


@pytest.mark.parametrize(
    "make_sample, message",
    [
        (lambda p: np.savez(p, images=_images(5, 0)), r"no key 'arr_0' .* keys found: \['images'\]"),
        (lambda p: np.savez(p, arr_0=_images(5, 0).astype(np.float64)), "found dtype float64"),
        (lambda p: np.savez(p, arr_0=_images(3, 0)), "has 3 images; precision/recall .* need at least 4"),
    ],
)
def test_cli_bad_sample_batch_is_a_clear_error(tmp_path, random_inception_weights, capsys, make_sample, message):
    ref, _ = _write_batches(tmp_path)
    sample = tmp_path / "bad_sample.npz"
    make_sample(sample)
    assert _cli(tmp_path, random_inception_weights, ref, sample) == 2
    err = capsys.readouterr().err
    assert err.startswith("disploss evaluate: error:")
    assert re.search(message, err), err


def test_cli_missing_reference_is_a_clear_error(tmp_path, random_inception_weights, capsys):
    _, sample = _write_batches(tmp_path)
    assert _cli(tmp_path, random_inception_weights, tmp_path / "nope.npz", sample) == 2
    assert "nope.npz: no such reference batch" in capsys.readouterr().err


def test_cli_reference_with_nan_statistics_is_a_clear_error(tmp_path, random_inception_weights, capsys):
    ref = tmp_path / "nan_ref.npz"
    sigma = np.eye(POOL_DIM)
    sigma[0, 0] = np.nan
    np.savez(ref, mu=np.zeros(POOL_DIM), sigma=sigma, mu_s=np.zeros(SPATIAL_DIM), sigma_s=np.eye(SPATIAL_DIM))
    sample = tmp_path / "sample.npz"
    save_samples_npz(sample, _images(4, 14))
    assert _cli(tmp_path, random_inception_weights, ref, sample) == 2
    assert "nan_ref.npz: statistics mu/sigma contain NaN or inf values" in capsys.readouterr().err
