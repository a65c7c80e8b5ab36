"""Paths, conversions, time intervals and the training objective (flow + dispersive term)."""

from __future__ import annotations

import math

import pytest
import torch

from disploss.dispersive import dispersive_loss
from disploss.regularizer import DispersiveRegularizer
from disploss.training.objective import Objective
from disploss.transport import DIFFUSION_FORMS, LOSS_WEIGHTS, PATH_TYPES, PREDICTIONS, Transport, create_transport
from disploss.transport.paths import make_path
from trainkit import tiny_sit

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)  # torch.func.jvp, inside torch


# -- the reference's interpolants -------------------------------------------------------------------------
@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_plan_matches_reference(reference, path_type):
    t, x0, x1 = reference["path_t"], reference["path_x0"], reference["path_x1"]
    t_out, xt, ut = create_transport(path_type).path.plan(t, x0, x1)
    assert torch.equal(t_out, t)
    torch.testing.assert_close(xt, reference[f"path_{path_type}_xt"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ut, reference[f"path_{path_type}_ut"], rtol=0, atol=1e-5)


# -- independent derivations ------------------------------------------------------------------------------
@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_coefficients_match_the_written_formulas(gaussian, path_type):
    path = make_path(path_type)
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    x = torch.zeros(9, 1, dtype=torch.float64)
    a, s, da, ds = gaussian(path_type, 0.0, 1.0).coefficients(t, x)
    te = t[:, None]
    torch.testing.assert_close(path.alpha(te), a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(path.sigma(te), s, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(path.d_alpha(te), da, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(path.d_sigma(te), ds, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_boundary_values(path_type):
    # t = 1 is data for every path; t = 0 is pure noise for Linear and GVP. VP only reaches
    # alpha_0 = exp(-(sigma_max - sigma_min)/4 - sigma_min/2) at t = 0 (docs/reference.md).
    # float64: in float32 cos(pi/2) is -4e-8, not 0.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x1 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    path = make_path(path_type)
    _, xt1, _ = path.plan(torch.ones(3, dtype=torch.float64), x0, x1)
    torch.testing.assert_close(xt1, x1, rtol=0, atol=1e-14)
    _, xt0, _ = path.plan(torch.zeros(3, dtype=torch.float64), x0, x1)
    if path_type == "VP":
        a0 = math.exp(-(20.0 - 0.1) / 4 - 0.1 / 2)
        torch.testing.assert_close(xt0, a0 * x1 + math.sqrt(1 - a0**2) * x0, rtol=0, atol=1e-14)
    else:
        torch.testing.assert_close(xt0, x0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_ut_is_the_time_derivative_of_xt(path_type):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.97], dtype=torch.float64)
    path = make_path(path_type)
    xt, dxt = torch.func.jvp(lambda tt: path.plan(tt, x0, x1)[1], (t,), (torch.ones_like(t),))
    _, xt2, ut = path.plan(t, x0, x1)
    torch.testing.assert_close(xt, xt2)
    torch.testing.assert_close(ut, dxt, rtol=1e-10, atol=1e-10)
    # and by central finite differences, independent of autograd
    h = 1e-6
    fd = (path.plan(t + h, x0, x1)[1] - path.plan(t - h, x0, x1)[1]) / (2 * h)
    torch.testing.assert_close(ut, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_conversions_on_a_gaussian(gaussian, path_type):
    target = gaussian(path_type, torch.tensor([0.7, -1.2])[:, None], torch.tensor([0.4, 2.0])[:, None])
    path = make_path(path_type)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 2, 3, generator=g, dtype=torch.float64) * 1.5
    t = torch.tensor([0.05, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95], dtype=torch.float64)
    v, s, n = target.velocity(x, t), target.score(x, t), target.noise(x, t)
    close = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.score_from_velocity(v, x, t), s, **close)
    torch.testing.assert_close(path.noise_from_velocity(v, x, t), n, **close)
    torch.testing.assert_close(path.velocity_from_score(s, x, t), v, **close)
    torch.testing.assert_close(path.score_from_noise(n, x, t), s, **close)
    # Round trips through the Transport's drift / score for every prediction type.
    fields = {"velocity": target.velocity, "score": target.score, "noise": target.noise}
    for prediction, field in fields.items():
        tr = create_transport(path_type, prediction)
        torch.testing.assert_close(tr.drift(x, t, field), v, **close)
        torch.testing.assert_close(tr.score(x, t, field), s, **close)


@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_sde_drift_and_diffusion(path_type):
    # compute_drift returns (-f, g^2/2) with f = (alpha'/alpha) x and g^2/2 = (alpha'/alpha) sigma^2 - sigma sigma'.
    # For VP the reference writes them as (-beta/2 x, beta/2), beta = sigma_min + (1 - t)(sigma_max - sigma_min).
    path = make_path(path_type)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    te = t[:, None]
    minus_f, half_g2 = path.compute_drift(x, t)
    if path_type == "VP":
        beta = 0.1 + (1 - te) * (20.0 - 0.1)
        torch.testing.assert_close(minus_f, -0.5 * beta * x)
        torch.testing.assert_close(half_g2, beta / 2 * torch.ones_like(te))
        # the generic formula gives the same numbers where sigma_t is defined ...
        ratio, sigma, d_sigma = path.d_alpha(te) / path.alpha(te), path.sigma(te), path.d_sigma(te)
        torch.testing.assert_close(half_g2, ratio * sigma**2 - sigma * d_sigma)
        # ... and the closed form stays finite past t = 1, where adaptive solvers evaluate it
        later = path.compute_drift(x, torch.tensor([1.2, 1.5, 1.9], dtype=torch.float64))
        assert all(torch.isfinite(v).all() for v in later)
    elif path_type == "Linear":
        torch.testing.assert_close(minus_f, -x / te)
        torch.testing.assert_close(half_g2, (1 - te) ** 2 / te + (1 - te))
    else:
        c = torch.pi / 2
        torch.testing.assert_close(minus_f, -c / torch.tan(c * te) * x)
        expected = c / torch.tan(c * te) * torch.cos(c * te) ** 2 + c * torch.cos(c * te) * torch.sin(c * te)
        torch.testing.assert_close(half_g2, expected)


@pytest.mark.parametrize("form", DIFFUSION_FORMS)
def test_diffusion_forms(form):
    path = make_path("Linear")
    t = torch.tensor([0.1, 0.25, 0.5, 0.8], dtype=torch.float64)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    te = t[:, None, None]
    norm = 0.7
    expected = {
        "constant": norm * torch.ones_like(te),
        "SBDM": norm * ((1 - te) ** 2 / te + (1 - te)),
        "sigma": norm * (1 - te),
        "linear": norm * (1 - te),
        "decreasing": 0.25 * (norm * torch.cos(torch.pi * te) + 1) ** 2,
        "increasing-decreasing": norm * torch.sin(torch.pi * te) ** 2,
    }[form]
    w = path.compute_diffusion(x, t, form=form, norm=norm)
    torch.testing.assert_close(torch.broadcast_to(w, (4, 1, 1)), expected)
    assert torch.isfinite(w).all()


# -- intervals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path_type,prediction,train,sample",
    [
        ("Linear", "velocity", (0.0, 1.0), (0.0, 1.0)),
        ("GVP", "velocity", (0.0, 1.0), (0.0, 1.0)),
        ("Linear", "score", (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3)),
        ("GVP", "noise", (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3)),
        ("VP", "velocity", (0.0, 1 - 1e-5), (0.0, 1 - 1e-3)),
        ("VP", "score", (0.0, 1 - 1e-5), (0.0, 1 - 1e-3)),
    ],
)
def test_default_intervals(path_type, prediction, train, sample):
    tr = create_transport(path_type, prediction)
    assert tr.interval(eval=False) == pytest.approx(train, abs=1e-12)
    assert tr.interval(eval=True) == pytest.approx(sample, abs=1e-12)


def test_given_sample_eps_is_honoured():
    # The reference overwrote sample_eps with 0 for velocity models on Linear / GVP; we keep it.
    tr = create_transport("Linear", "velocity", sample_eps=0.02, train_eps=0.01)
    assert (tr.train_eps, tr.sample_eps) == (0.01, 0.02)
    assert tr.interval(eval=True, sde=True, diffusion_form="SBDM", last_step_size=0.04) == pytest.approx((0.02, 0.96))
    assert tr.interval(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.0) == pytest.approx((0.0, 0.98))
    tr = create_transport("GVP", "score", sample_eps=0.05)
    assert tr.interval(eval=True) == pytest.approx((0.05, 0.95))
    tr = create_transport("VP", "velocity", sample_eps=0.01)
    assert tr.interval(eval=True) == pytest.approx((0.0, 0.99))


def test_sde_intervals_avoid_the_reference_nans():
    tr = create_transport("Linear", "velocity")  # sample_eps = 0
    t0, t1 = tr.interval(eval=True, sde=True, diffusion_form="SBDM", last_step_size=0.04)
    assert t0 > 0 and t1 == pytest.approx(0.96)  # SBDM diverges at t = 0 (alpha = 0)
    t0, t1 = tr.interval(eval=True, sde=True, diffusion_form="sigma", last_step_size=0.0)
    assert t0 == 0 and t1 < 1  # the score diverges at t = 1 (sigma = 0): no last step means stop short
    with pytest.raises(ValueError, match="empty time interval"):
        tr.interval(eval=True, sde=True, diffusion_form="sigma", last_step_size=1.0)


def test_sample_t_draws_like_the_reference():
    tr = create_transport("Linear", "score")
    torch.manual_seed(3)
    t = tr.sample_t(1000, torch.device("cpu"))
    torch.manual_seed(3)
    expected = torch.rand(1000) * (1 - 2e-3) + 1e-3
    assert torch.equal(t, expected)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3


# -- training objective ---------------------------------------------------------------------------------
def _fixed_inputs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    y = torch.randint(0, 5, (B,), generator=g)
    return x1, noise, t, y


def test_training_loss_with_reference_settings():
    # infonce_l2, lambda 0.25, tau 1, last block: loss = flow + 0.25 * L_disp(last activation), per sample.
    model = tiny_sit(class_dropout_prob=0.0).train()
    x1, noise, t, y = _fixed_inputs()
    tr = create_transport("Linear")
    reg = DispersiveRegularizer(model, layers="blocks.1", weight=0.25, tau=1.0)  # the last of 2 blocks
    out = Objective(tr, reg)(model, x1, y, t=t, noise=noise)
    te = t[:, None, None, None]
    xt, ut = te * x1 + (1 - te) * noise, x1 - noise
    pred, acts = model(xt, t, y, return_act=True)
    flow = ((pred - ut) ** 2).mean(dim=(1, 2, 3))
    z = acts[-1].double().flatten(1)
    d = torch.cdist(z, z) ** 2 / z.shape[1]  # direct pairwise distances, not the Gram formula
    disp = torch.log(torch.exp(-d).mean())
    torch.testing.assert_close(out["flow"], flow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["disp"].double(), disp, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["loss"], flow + 0.25 * disp.float(), rtol=1e-5, atol=1e-5)
    assert out["loss"].shape == (4,)
    torch.testing.assert_close(out["pred"], pred)
    # The gradient of the mean total reaches the model through both terms.
    out["loss"].mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block", [0, 1, -1])
@pytest.mark.parametrize("variant", ["infonce_cosine", "hinge", "covariance"])
def test_training_loss_disp_options(block, variant):
    model = tiny_sit(depth=2, class_dropout_prob=0.0).train()  # the hooks capture in training mode
    x1, noise, t, y = _fixed_inputs(seed=1)
    tr = create_transport("Linear")
    reg = DispersiveRegularizer(
        model, layers=f"blocks.{block % len(model.blocks)}", weight=0.5, tau=0.5, variant=variant, margin=2.0
    )
    out = Objective(tr, reg)(model, x1, y, t=t, noise=noise)
    with torch.no_grad():
        te = t[:, None, None, None]
        _, acts = model(te * x1 + (1 - te) * noise, t, y, return_act=True)
    disp = dispersive_loss(acts[block], variant, tau=0.5, margin=2.0)
    torch.testing.assert_close(out["disp"].detach(), disp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["flow"] + 0.5 * disp, rtol=1e-6, atol=1e-6)


def test_disp_block_out_of_range():
    model = tiny_sit(depth=2)
    with pytest.raises(ValueError, match="'blocks.2' matches no module of SiT; nearest names: blocks.1, blocks.0"):
        DispersiveRegularizer(model, layers="blocks.2", weight=0.1)


def test_no_dispersive_term_calls_the_model_without_return_act():
    calls = []

    def model(x, t, **kwargs):
        calls.append(kwargs)
        return x * 0.5

    x1, noise, t, _ = _fixed_inputs()
    out = Objective(create_transport())(model, x1, 3, t=t, noise=noise)
    assert calls == [{"y": 3}]
    assert out["disp"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["flow"])


def test_velocity_flow_term_is_the_mse():
    x1, noise, t, _ = _fixed_inputs()
    w = torch.randn(4, 1, 1)

    def model(x, t):
        return x * w + t[:, None, None, None]

    for path_type in PATH_TYPES:
        tr = create_transport(path_type)
        out = tr.training_losses(model, x1, t=t, noise=noise)
        _, xt, ut = tr.path.plan(t, noise, x1)
        torch.testing.assert_close(out["loss"], ((model(xt, t) - ut) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("path_type", PATH_TYPES)
@pytest.mark.parametrize("prediction", ["score", "noise"])
@pytest.mark.parametrize("loss_weight", LOSS_WEIGHTS)
def test_score_and_noise_losses_are_finite(path_type, prediction, loss_weight):
    model = tiny_sit().train()
    x1, _, _, y = _fixed_inputs()
    tr = create_transport(path_type, prediction, loss_weight)
    torch.manual_seed(0)
    reg = DispersiveRegularizer(model, layers="blocks.1", weight=0.25)
    out = Objective(tr, reg)(model, x1, y)
    assert out["loss"].shape == (4,) and torch.isfinite(out["loss"]).all() and torch.isfinite(out["disp"])
    out["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("prediction", ["score", "noise"])
@pytest.mark.parametrize("loss_weight", LOSS_WEIGHTS)
def test_loss_weights_on_the_linear_path(prediction, loss_weight):
    # Linear path: g^2/2 = (1-t)^2/t + (1-t) = (1-t)/t and sigma = 1-t, so the 'velocity' weight
    # (g^2/2 / sigma)^2 is 1/t^2 and the 'likelihood' weight g^2/2 / sigma^2 is 1/(t (1-t)).
    x1, noise, t, _ = _fixed_inputs()
    x1, noise, t = x1.double(), noise.double(), t.double()
    te = t[:, None, None, None]
    weight = {None: torch.ones_like(te), "velocity": 1 / te**2, "likelihood": 1 / (te * (1 - te))}[loss_weight]
    pred = torch.randn(x1.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = create_transport("Linear", prediction, loss_weight).training_losses(lambda x, tt: pred, x1, t=t, noise=noise)
    err = pred - noise if prediction == "noise" else pred * (1 - te) + noise
    torch.testing.assert_close(out["loss"], (weight * err**2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_score_and_noise_losses_vanish_for_the_exact_target(prediction):
    # The unweighted objectives regress x0 (noise) and -x0 / sigma (score): the true targets give 0.
    x1, noise, t, _ = _fixed_inputs()
    tr = create_transport("GVP", prediction)
    sigma = torch.cos(torch.pi / 2 * t)[:, None, None, None]

    def model(x, tt):
        return noise if prediction == "noise" else -noise / sigma

    out = tr.training_losses(model, x1, t=t, noise=noise)
    assert out["loss"].abs().max() < 1e-10


def test_prior_logp():
    z = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(Transport.prior_logp(z), expected)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,what,choices",
    [
        ({"path_type": "linear"}, "path type", ["Linear", "GVP", "VP"]),
        ({"prediction": "epsilon"}, "prediction", ["velocity", "score", "noise"]),
        ({"loss_weight": "snr"}, "loss weight", ["None", "velocity", "likelihood"]),
    ],
)
def test_bad_transport_options_list_the_choices(kwargs, what, choices):
    with pytest.raises(ValueError, match=f"unknown {what}") as info:
        create_transport(**kwargs)
    assert all(c in str(info.value) for c in choices)


def test_loss_weight_none_string_is_accepted():
    assert create_transport(loss_weight="None").loss_weight is None
    assert set(PREDICTIONS) == {"velocity", "score", "noise"}


def test_unknown_diffusion_form_lists_the_choices():
    with pytest.raises(ValueError, match="unknown diffusion form") as info:
        make_path("Linear").compute_diffusion(torch.zeros(1, 2), torch.tensor([0.5]), form="inccreasing-decreasing")
    assert all(f in str(info.value) for f in DIFFUSION_FORMS)


def test_unknown_dispersive_variant_in_the_regularizer():
    with pytest.raises(ValueError, match="infonce_l2, infonce_cosine, hinge, covariance"):
        DispersiveRegularizer(tiny_sit(), layers="blocks.0", variant="l2")


def test_model_output_of_the_wrong_shape():
    x1, noise, t, _ = _fixed_inputs()
    with pytest.raises(ValueError, match="does not match its input"):
        create_transport().training_losses(lambda x, t: x[:, :2], x1, t=t, noise=noise)
