"""Dispersive loss: the reference's numbers and gradients, every variant against explicit float64 loops,
invariances, range, stability and dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from disploss.dispersive import VARIANTS, dispersive_loss, pairwise_sq_dists, reference_infonce_l2


# -- explicit definitions (python loops in float64), independent of the Gram-matrix implementation --------
def _rows(z: torch.Tensor) -> list[list[float]]:
    return z.reshape(z.shape[0], -1).double().tolist()


def loop_infonce_l2(z, tau=1.0):
    rows = _rows(z)
    B, M = len(rows), len(rows[0])
    s = sum(math.exp(-sum((a - b) ** 2 for a, b in zip(ri, rj)) / M / tau) for ri in rows for rj in rows)
    return math.log(s / B**2)


def loop_infonce_cosine(z, tau=1.0):
    rows = _rows(z)
    B = len(rows)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    return math.log(sum(math.exp(-(1 - cos(ri, rj)) / tau) for ri in rows for rj in rows) / B**2)


def loop_hinge(z, margin=1.0):
    rows = _rows(z)
    B, M = len(rows), len(rows[0])
    terms = [max(0.0, margin - sum((a - b) ** 2 for a, b in zip(ri, rj)) / M) ** 2 for ri in rows for rj in rows]
    return sum(terms) / B**2


def loop_covariance(z):
    # M x M covariance over the batch (unbiased, as np.cov) of the l2-normalised rows; sum of squared
    # off-diagonal entries.
    rows = _rows(z)
    B, M = len(rows), len(rows[0])
    rows = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]
    mean = [sum(r[a] for r in rows) / B for a in range(M)]
    total = 0.0
    for a in range(M):
        for b in range(M):
            if a != b:
                c = sum((r[a] - mean[a]) * (r[b] - mean[b]) for r in rows) / (B - 1)
                total += c * c
    return total


LOOPS = {
    "infonce_l2": lambda z, tau, margin: loop_infonce_l2(z, tau),
    "infonce_cosine": lambda z, tau, margin: loop_infonce_cosine(z, tau),
    "hinge": lambda z, tau, margin: loop_hinge(z, margin),
    "covariance": lambda z, tau, margin: loop_covariance(z),
}


# -- the reference's fixtures ------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(5))
def test_values_and_gradients_match_reference(reference, i):
    z = reference[f"disp{i}_z"].clone().requires_grad_(True)
    assert z.dtype == torch.float64
    val = dispersive_loss(z, "infonce_l2", tau=1.0)
    assert val.dtype == torch.float64 and val.dim() == 0
    torch.testing.assert_close(val, reference[f"disp{i}_val"].reshape(()), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(val, z)
    torch.testing.assert_close(grad, reference[f"disp{i}_grad"], rtol=1e-9, atol=1e-13)
    val_half = dispersive_loss(z.detach(), "infonce_l2", tau=0.5)
    torch.testing.assert_close(val_half, reference[f"disp{i}_val_tau0.5"].reshape(()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("i", range(5))
def test_reference_formula_reproduces_fixtures(reference, i):
    z = reference[f"disp{i}_z"].clone().requires_grad_(True)
    val = reference_infonce_l2(z)
    torch.testing.assert_close(val, reference[f"disp{i}_val"].reshape(()), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(val, z)[0], reference[f"disp{i}_grad"], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("i", range(5))
def test_fixture_values_match_the_definition(reference, i):
    # The README's definition, evaluated by explicit loops, also gives the stored numbers.
    z = reference[f"disp{i}_z"]
    assert loop_infonce_l2(z, 1.0) == pytest.approx(reference[f"disp{i}_val"].item(), abs=1e-12)
    assert loop_infonce_l2(z, 0.5) == pytest.approx(reference[f"disp{i}_val_tau0.5"].item(), abs=1e-12)


# -- every variant against its explicit definition ---------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 3), (5, 2, 3), (7, 4)])
@pytest.mark.parametrize("tau,margin", [(1.0, 1.0), (0.5, 2.5)])
def test_variants_match_explicit_loops(variant, shape, tau, margin):
    g = torch.Generator().manual_seed(hash((variant, shape, tau)) % 2**31)
    z = torch.randn(shape, generator=g, dtype=torch.float64) + 0.3
    got = dispersive_loss(z, variant, tau=tau, margin=margin)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(LOOPS[variant](z, tau, margin), rel=1e-10, abs=1e-12)


def test_hinge_and_covariance_hand_values():
    # Two points in 1-D, 0 and 2: d = 4 (> margin 1) off the diagonal, 0 on it: hinge = (2 * 1^2) / 4.
    z = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    assert dispersive_loss(z, "hinge", margin=1.0).item() == pytest.approx(0.5, abs=1e-15)
    assert dispersive_loss(z, "hinge", margin=5.0).item() == pytest.approx((2 * 25 + 2 * 1) / 4, abs=1e-13)
    # infonce_l2 by hand: log((2 + 2 exp(-4)) / 4).
    assert dispersive_loss(z).item() == pytest.approx(math.log((2 + 2 * math.exp(-4)) / 4), abs=1e-15)
    # Covariance of normalised rows (1, 0), (0, 1): centred rows +-(0.5, -0.5); C = [[.5, -.5], [-.5, .5]].
    z = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert dispersive_loss(z, "covariance").item() == pytest.approx(2 * 0.25, abs=1e-15)
    # Cosine: orthogonal pair -> log((2 + 2 exp(-1 / tau)) / 4).
    assert dispersive_loss(z, "infonce_cosine", tau=0.5).item() == pytest.approx(
        math.log((2 + 2 * math.exp(-2)) / 4), abs=1e-15
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_match_finite_differences(variant):
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z.requires_grad_(True)
    # margin 2 keeps some hinge pairs active and away from the kink
    assert torch.autograd.gradcheck(lambda x: dispersive_loss(x, variant, tau=0.7, margin=2.0), (z,))


def test_pairwise_sq_dists_by_loops():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 100.0
    d = pairwise_sq_dists(z)
    rows = z.tolist()
    expected = torch.tensor(
        [[sum((a - b) ** 2 for a, b in zip(ri, rj)) / 3 for rj in rows] for ri in rows], dtype=torch.float64
    )
    torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-10)
    assert torch.all(d.diagonal() == 0) and torch.all(d >= 0)


# -- invariances, range, edge cases -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_permutation_invariance(variant):
    z = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    torch.testing.assert_close(dispersive_loss(z[perm], variant), dispersive_loss(z, variant), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("B", [2, 3, 8])
def test_infonce_l2_range(B):
    z = torch.randn(B, 10, generator=torch.Generator().manual_seed(B), dtype=torch.float64)
    val = dispersive_loss(z).item()
    assert -math.log(B) <= val <= 0
    same = torch.ones(B, 10, dtype=torch.float64) * 3.0  # B identical points -> 0
    assert dispersive_loss(same).item() == 0.0
    far = z * 1e3  # far-apart points -> -log B
    assert dispersive_loss(far).item() == pytest.approx(-math.log(B), abs=1e-12)


@pytest.mark.parametrize(
    "variant,expected", [("infonce_l2", 0.0), ("infonce_cosine", 0.0), ("hinge", 4.0), ("covariance", 0.0)]
)
def test_batch_of_one(variant, expected):
    z = torch.randn(1, 3, 4, requires_grad=True)
    val = dispersive_loss(z, variant, margin=2.0)
    assert val.item() == pytest.approx(expected, abs=1e-6)  # cosine: cos(z, z) = 1 up to float32 round-off
    val.backward()
    assert torch.isfinite(z.grad).all()


def test_stable_at_huge_distance_scale():
    # z * 1e4: every off-diagonal logit is about -1e8; the value is -log B with finite (zero) gradients.
    torch.manual_seed(0)
    z = (torch.randn(8, 16, 6) * 1e4).requires_grad_(True)
    val = dispersive_loss(z)
    assert torch.isfinite(val) and val.item() == pytest.approx(-math.log(8), abs=1e-6)
    val.backward()
    assert torch.isfinite(z.grad).all()
    # The reference formula keeps the diagonal exp(0) = 1 terms, so it gives the same value here.
    assert reference_infonce_l2(z.detach()).item() == pytest.approx(-math.log(8), abs=1e-6)


def test_stable_at_tiny_temperature():
    # tau 1e-3 pushes the logits to -1e3 * d: exp underflows in the direct formula's off-diagonal terms, the
    # logsumexp keeps every term; compared with the float64 loop.
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.05
    got = dispersive_loss(z.float(), tau=1e-3)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(loop_infonce_l2(z, 1e-3), abs=1e-5)


def test_translation_invariance_in_float32():
    # A large common offset must not change the distances (the implementation centres before the Gram).
    z = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(dispersive_loss(z + 1e3), dispersive_loss(z), rtol=0, atol=1e-5)


# -- dtypes and gather ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_dtypes(variant):
    z64 = torch.randn(4, 5, dtype=torch.float64)
    assert dispersive_loss(z64, variant).dtype == torch.float64
    assert dispersive_loss(z64.float(), variant).dtype == torch.float32
    assert dispersive_loss(z64.bfloat16(), variant).dtype == torch.float32
    lin = torch.nn.Linear(5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(z64.float())
        assert z.dtype == torch.bfloat16
        val = dispersive_loss(z, variant)
    assert val.dtype == torch.float32
    # the float32 computation on the bf16 values equals the float64 one on the same values
    assert val.item() == pytest.approx(dispersive_loss(z.double(), variant).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather_in_a_single_process(variant):
    z = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    a = dispersive_loss(z, variant, gather=True)
    b = dispersive_loss(z, variant, gather=False)
    assert a.item() == b.item()
    (ga,) = torch.autograd.grad(a, z)
    (gb,) = torch.autograd.grad(b, z)
    assert torch.equal(ga, gb)


# -- bad input --------------------------------------------------------------------------------------------
def test_unknown_variant_lists_the_choices():
    with pytest.raises(ValueError) as info:
        dispersive_loss(torch.randn(2, 3), "infonce_l1")
    msg = str(info.value)
    assert "infonce_l1" in msg and all(v in msg for v in VARIANTS)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_non_positive_tau(tau):
    with pytest.raises(ValueError, match="tau must be positive"):
        dispersive_loss(torch.randn(2, 3), tau=tau)


@pytest.mark.parametrize("shape", [(3,), (0, 4)])
def test_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\(B, \.\.\.\)"):
        dispersive_loss(torch.randn(shape))


def test_all_variants_listed():
    assert set(VARIANTS) == set(LOOPS) == {"infonce_l2", "infonce_cosine", "hinge", "covariance"}
