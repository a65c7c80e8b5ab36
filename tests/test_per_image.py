"""Adaptive sampling with per-image step-size control: each image gets exactly what torchdiffeq's solver gives it
alone, whatever its batch-mates; the guidance batch keeps its two rows together; and the sampler through the
Sampler and the commands."""

from __future__ import annotations

import warnings

import pytest
import torch

from disploss.transport import BATCH_COUPLED_METHODS, ODE_METHODS, PER_IMAGE_METHODS, Sampler, create_transport
from disploss.transport.integrators import ode_adaptive_per_image, ode_torchdiffeq
from trainkit import tiny_sit

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)  # torch.func.jvp, inside torch


def _target(gaussian):
    # a thin data coordinate (std 0.05) bends the flow near t = 1, so images of different sizes take different steps
    return gaussian("Linear", torch.tensor([1.5, -0.5]), torch.tensor([0.05, 2.0]))


def _batch(n: int = 8) -> torch.Tensor:
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 0.3, 1.0, 2.0, 5.0], dtype=torch.float64)[:n, None]
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scales


def _alone(target, x, ts, method, **kw):
    """torchdiffeq's solver on one image, its last step landing on ts[-1]; (states on ts, field evaluations)."""
    from torchdiffeq import odeint

    calls = [0]

    def fn(t, y):
        calls[0] += 1
        return target.velocity(y, torch.ones(1, dtype=y.dtype) * t)

    out = odeint(fn, x, ts, method=method, options={"step_t": ts[-1:]}, **kw)
    return out, calls[0]


@pytest.mark.parametrize("method", PER_IMAGE_METHODS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_each_image_gets_what_torchdiffeq_gives_it_alone(gaussian, method, direction):
    target = _target(gaussian)
    x = _batch()
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    if direction == "reverse":
        x, ts = target.flow(x, 0.0, 1.0), ts.flip(0)
    stats: dict = {}
    ours = ode_adaptive_per_image(lambda y, t, rows: target.velocity(y, t), x, ts, method, 1e-6, 1e-3, stats=stats)
    for i in range(len(x)):
        want, calls = _alone(target, x[i : i + 1], ts, method, atol=1e-6, rtol=1e-3)
        torch.testing.assert_close(ours[:, i : i + 1], want, rtol=0, atol=1e-12)  # every output time, dense output
        assert int(stats["nfe"][i]) == calls  # the same steps, accepted and rejected
    assert len(set(stats["nfe"].tolist())) > 1  # the images did take different steps


@pytest.mark.parametrize("method", PER_IMAGE_METHODS)
def test_batch_mates_do_not_change_an_image(gaussian, method):
    target = _target(gaussian)
    x = _batch()
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)

    def solve(rows_of_x):
        return ode_adaptive_per_image(lambda y, t, rows: target.velocity(y, t), x[rows_of_x], ts, method, keep=False)

    full = solve(list(range(8)))[0]
    for rows in ([3], [3, 0], [5, 3, 7], [7, 6, 5, 4, 3]):
        assert torch.equal(solve(rows)[0][rows.index(3)], full[3])
    # torchdiffeq's solver takes one step size for the batch (the RMS error over all of it): image 3 changes
    coupled = [
        ode_torchdiffeq(target.velocity, x[r], ts, method, 1e-6, 1e-3, stop_at_end=True)[-1] for r in ([3], [3, 0])
    ]
    assert not torch.equal(coupled[0][0], coupled[1][0])


def test_the_field_sees_only_the_images_still_integrating(gaussian):
    target = _target(gaussian)
    x = _batch()
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    seen: list[torch.Tensor] = []

    def field(y, t, rows):
        assert y.shape[0] == t.shape[0] == rows.shape[0]
        seen.append(rows.clone())
        return target.velocity(y, t)

    stats: dict = {}
    ode_adaptive_per_image(field, x, ts, "dopri5", stats=stats)
    counts = torch.zeros(8, dtype=torch.int64)
    for rows in seen:
        counts[rows] += 1
    assert torch.equal(counts, stats["nfe"])  # each image evaluated exactly its own NFE times
    assert min(len(r) for r in seen) < 8  # the batch shrank as images finished


def test_tied_halves_keep_the_guidance_rows_together(gaussian):
    # A guidance-like field: row i + B/2 is image i's unconditional row and only used through row i, and it breaks
    # (returns garbage) unless the rows come as [A; A + B/2].
    target = _target(gaussian)
    x = _batch(4)
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def guided(y, t, rows):
        half = len(rows) // 2
        assert torch.equal(rows[half:], rows[:half] + 4) and torch.equal(t[:half], t[half:])
        v = target.velocity(y[:half], t[:half])
        return torch.cat([v, v])

    out = ode_adaptive_per_image(guided, torch.cat([x, x]), ts, "dopri5", tie_halves=True, keep=False)[0]
    torch.testing.assert_close(out[:4], out[4:], rtol=0, atol=0)
    # each image as when solved alone (its pair shares its error, which is its own)
    alone = ode_adaptive_per_image(lambda y, t, rows: target.velocity(y, t), x, ts, "dopri5", keep=False)[0]
    torch.testing.assert_close(out[:4], alone, rtol=0, atol=1e-13)


def test_sampler_per_image_with_labels_and_reference_cfg_convention():
    # Through the Sampler with a real model: the labels follow the images still integrating, with the reference's
    # doubled batch and forward_with_cfg (tied automatically: model_kwargs has cfg_scale; its rows i and i + B/2
    # differ beyond the 3 guided channels, and stay paired), and the results do not depend on batch-mates up to
    # float kernels (the model's matmuls on other batch sizes).
    model = tiny_sit(5).requires_grad_(False)
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    null = torch.full_like(y, model.num_classes)
    fn = Sampler(create_transport()).sample_ode(keep_trajectory=False)
    rows = [0]

    def counted(x, t, y, cfg_scale):
        rows[0] += len(x)
        return model.forward_with_cfg(x, t, y, cfg_scale)

    both = fn(torch.cat([z, z]), counted, y=torch.cat([y, null]), cfg_scale=2.0)[0]
    for i in range(4):
        one = fn(torch.cat([z[i : i + 1]] * 2), model.forward_with_cfg, y=torch.stack([y[i], null[i]]), cfg_scale=2.0)
        torch.testing.assert_close(one[0, 0], both[i], rtol=0, atol=1e-5)
    assert rows[0] > 0


def test_batch_step_control_is_torchdiffeqs(gaussian):
    target = _target(gaussian)
    x = _batch()
    tr = create_transport()
    ours = Sampler(tr).sample_ode(step_control="batch")(x, target.velocity)
    want = ode_torchdiffeq(target.velocity, x, torch.linspace(0, 1, 50), "dopri5", 1e-6, 1e-3)
    assert torch.equal(ours, want)


@pytest.mark.parametrize("method", ODE_METHODS)
def test_which_methods_keep_each_image_independent_of_its_batch_mates(gaussian, method):
    # The README's list: every method but BATCH_COUPLED_METHODS gives image 3 the same result with other images
    # beside it (bitwise, for this elementwise field); the coupled ones (one step size, a corrector tolerance or one
    # scipy system over the whole batch) change it.
    target = _target(gaussian)
    x = _batch()
    fn = Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=6, keep_trajectory=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit_adams: 'Functional iteration did not converge'
        alone = fn(x[[3]], target.velocity)[0][0]
        same = [torch.equal(fn(x[[3, *mates]], target.velocity)[0][0], alone) for mates in ([7], [4, 1])]
    assert all(same) == (method not in BATCH_COUPLED_METHODS), same
