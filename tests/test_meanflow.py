"""MeanFlow (disploss.meanflow): the time mapping, the identity on analytic fields, the JVP through a tiny SiT
against finite differences, r = t as flow matching, guidance folded into the target, the dispersive term on the
primal pass, the second time input of the model (released keys unchanged), and sampling with exactly N model
calls, one-line errors for the wrong mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from disploss.checkpoint import load_sit_weights
from disploss.dispersive import dispersive_loss
from disploss.meanflow import (
    MeanFlowSettings,
    jvp_u,
    meanflow_losses,
    meanflow_target,
    paper_time,
    sample_meanflow,
    sample_times,
)
from disploss.models import SiT, math_attention
from disploss.regularizer import DispersiveRegularizer
from disploss.statedict import fingerprint
from disploss.transport import create_transport
from trainkit import MEANFLOW_SIT, MODEL, call, save_training_checkpoint, tiny_sit


def expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


# -- the time mapping ------------------------------------------------------------------------------------------
def test_times_are_the_papers_draws_mapped_to_this_axis():
    """The paper's code: tau = sigmoid(N(-0.4, 1)) twice, tau_t the larger, r = t for the first 75% (its axis,
    tau = 0 data); here t = 1 - tau_t <= r = 1 - tau_r."""
    B = 8
    torch.manual_seed(3)
    t, r = sample_times(B, MeanFlowSettings())
    torch.manual_seed(3)
    n = torch.randn(2, B).numpy().astype(np.float64) * 1.0 - 0.4
    tau = 1 / (1 + np.exp(-n))
    tau_t, tau_r = tau.max(0), tau.min(0)
    tau_r[:6] = tau_t[:6]  # int(8 * 0.75) = 6 samples with r = t
    np.testing.assert_allclose(t.numpy(), 1 - tau_t, rtol=0, atol=1e-6)
    np.testing.assert_allclose(r.numpy(), 1 - tau_r, rtol=0, atol=1e-6)
    assert (t <= r).all() and (r != t).sum() == 2
    torch.testing.assert_close(paper_time(t), torch.as_tensor(tau_t, dtype=t.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("ratio, batch, unequal", [(0.0, 8, 0), (1.0, 8, 8), (0.25, 10, 3), (0.5, 5, 3), (0.25, 2, 1)])
def test_share_of_r_not_equal_t(ratio, batch, unequal):
    t, r = sample_times(batch, MeanFlowSettings(ratio=ratio))
    assert int((r != t).sum()) == unequal and (r >= t).all() and ((t > 0) & (r < 1)).all()


def test_distribution_of_t_against_numerical_integration():
    """t = 1 - max(tau1, tau2), tau ~ sigmoid(N(-0.4, 1)) in the paper's axis: E[t] = 1 - integral_0^1 (1 - F(u)^2) du
    with F(u) = Phi((logit(u) + 0.4) / 1), by quadrature, against 40000 draws."""
    from scipy.special import logit, ndtr

    u = np.linspace(1e-9, 1 - 1e-9, 200001)
    cdf = ndtr((logit(u) + 0.4) / 1.0)
    expected = 1 - np.trapezoid(1 - cdf**2, u)
    torch.manual_seed(0)
    t, r = sample_times(40000, MeanFlowSettings())
    assert abs(float(t.double().mean()) - expected) < 0.005  # the std of the mean is ~0.001
    assert 0.4 < expected < 0.5  # the paper's mean -0.4 puts the noisier end tau_t near 1/2


# -- the identity on analytic fields -------------------------------------------------------------------------
def test_linear_in_time_field_target_is_the_true_average_velocity():
    """v(z, s) = a + b s: the trajectory is z_r = z_t + a (r - t) + b (r^2 - t^2) / 2, so the average velocity over
    [t, r] is a + b (t + r) / 2. A network equal to it gets exactly itself as the target; a wrong sign of
    (t - r) du/dt in the identity would give a + b (3t - r) / 2 instead."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 3, 4, 4, generator=g).double()
    t = torch.tensor([0.0, 0.1, 0.3, 0.5], dtype=torch.float64)
    r = torch.tensor([1.0, 0.9, 0.3, 0.75], dtype=torch.float64)
    z = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)

    def u_true(z, t, r):
        return (a + b * expand(t + r, z) / 2).expand_as(z)

    target = meanflow_target(u_true, z, t, r, a + b * expand(t, z))
    torch.testing.assert_close(target, u_true(z, t, r), rtol=0, atol=1e-12)
    assert not torch.allclose(target[0], (a + b * (3 * t[0] - r[0]) / 2)[0])


MEAN = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)  # per channel, broadcast against x[0] (3, H, W)
STD = torch.tensor([0.3, 1.2, 0.7]).view(3, 1, 1)


def gaussian_average_velocity(z, t, r, mean, std):
    """Exact u(z_t, r, t) for data N(mean, std^2) per coordinate on the Linear path (z_t = t x + (1 - t) eps):
    the flow maps z_t to z_r = r m + sqrt(V_r / V_t) (z_t - t m), V_s = s^2 std^2 + (1 - s)^2."""
    var = lambda s: expand(s, z) ** 2 * std**2 + (1 - expand(s, z)) ** 2  # noqa: E731
    z_r = expand(r, z) * mean + torch.sqrt(var(r) / var(t)) * (z - expand(t, z) * mean)
    return (z_r - z) / expand(r - t, z)


def test_gaussian_field_target_is_the_true_average_velocity(gaussian):
    """A field that depends on z and is not linear in time: Gaussian data, whose flow map is closed-form. The exact
    average velocity (checked against the conftest's flow map) is a fixed point of the MeanFlow target."""
    target_dist = gaussian("Linear", MEAN, STD)
    mean, std = target_dist.mean, target_dist.std
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.5, 0.7], dtype=torch.float64)
    r = torch.tensor([1.0, 0.6, 0.9, 0.7000001], dtype=torch.float64)
    for i in range(4):  # the closed form against the conftest's own flow map
        flow_r = target_dist.flow(z[i : i + 1], float(t[i]), float(r[i]))
        exact = (flow_r - z[i : i + 1]) / (r[i] - t[i])
        torch.testing.assert_close(
            gaussian_average_velocity(z, t, r, mean, std)[i : i + 1], exact, rtol=1e-6, atol=1e-6
        )

    def u_true(z, t, r):
        return gaussian_average_velocity(z, t, r, mean, std)

    v = target_dist.velocity(z, t)  # the instantaneous field at (z, t)
    torch.testing.assert_close(meanflow_target(u_true, z, t, r, v), u_true(z, t, r), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_sampling_with_the_exact_average_velocity_is_exact(gaussian, steps):
    """x = eps + u(eps, r=1, t=0): from noise at t = 0 to data at t = 1 with exactly `steps` model calls; the
    exact average velocity lands on the exact flow map whatever the number of steps."""
    target_dist = gaussian("Linear", MEAN, STD)
    mean, std = target_dist.mean, target_dist.std
    calls = []

    def model(z, t, r, y):
        calls.append((t.clone(), r.clone()))
        assert (y == 7).all()
        return gaussian_average_velocity(z, t.double(), r.double(), mean, std)

    eps = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    states = sample_meanflow(model, eps, steps, y=torch.full((5,), 7))
    assert len(calls) == steps and len(states) == steps + 1
    assert [float(c[0][0]) for c in calls] == pytest.approx([k / steps for k in range(steps)])
    assert [float(c[1][0]) for c in calls] == pytest.approx([(k + 1) / steps for k in range(steps)])
    torch.testing.assert_close(states[-1], target_dist.flow(eps, 0.0, 1.0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_steps must be at least 1"):
        sample_meanflow(model, eps, 0)


# -- the JVP through SiT ---------------------------------------------------------------------------------------
def test_math_attention_equals_sdpa():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))  # (B, heads, T, d)
    torch.testing.assert_close(
        math_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("training", [False, True])
def test_jvp_equals_a_finite_difference_on_a_tiny_sit(training):
    """du/dt along (v, 0, 1) of (z, r, t), from one pass on dual tensors through SiT (its attention switches to the
    written-out form), against a 5-point central difference in float64 (h = 1e-2: SiT embeds t in float32, so a
    smaller step would measure float32 rounding)."""
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).train(training)
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(3, 3, 8, 8, generator=g).double(), torch.randn(3, 3, 8, 8, generator=g).double()
    t, r, y = torch.tensor([0.1, 0.4, 0.6]).double(), torch.tensor([0.9, 0.4, 0.8]).double(), torch.tensor([0, 4, 5])
    ids = torch.tensor([0, 0, 1])
    u, dudt = jvp_u(model, z, t, r, v, y=y, force_drop_ids=ids)
    with torch.no_grad():
        plain = model(z, t, y, r=r, force_drop_ids=ids)
        h = 1e-2

        def at(k):
            return model(z + k * h * v, t + k * h, y, r=r, force_drop_ids=ids)

        fd = (at(-2) - 8 * at(-1) + 8 * at(1) - at(2)) / (12 * h)
    torch.testing.assert_close(u, plain, rtol=0, atol=1e-12)  # the primal is the plain forward
    assert fd.abs().max() > 1e-2  # a real derivative, not zero
    torch.testing.assert_close(dudt, fd, rtol=1e-4, atol=1e-6)
    wrong = jvp_u(model, z, t, r, -v, y=y, force_drop_ids=ids)[1]  # e.g. the paper's v = eps - x by mistake
    assert (wrong - fd).abs().max() > 100 * (dudt - fd).abs().max()


def test_attention_on_dual_inputs_has_the_plain_value_and_a_true_derivative(monkeypatch):
    """SiT's Attention on forward-mode dual inputs (MeanFlow's JVP): the primal equals the plain (SDPA) forward,
    the tangent a central difference, and SDPA is never handed a dual tensor (its fused kernels have no forward
    derivative)."""
    import torch.autograd.forward_ad as fwAD

    from disploss.models import Attention

    torch.manual_seed(0)
    attn = Attention(8, num_heads=2).double()
    x, dx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        plain = attn(x)
        h = 1e-4
        fd = (attn(x + h * dx) - attn(x - h * dx)) / (2 * h)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def plain_only(q, k, v, **kwargs):
        assert fwAD.unpack_dual(q).tangent is None, "SDPA was given a dual tensor"
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", plain_only)
    with torch.no_grad(), fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(attn(fwAD.make_dual(x, dx)))
    torch.testing.assert_close(primal, plain, rtol=1e-10, atol=1e-12)
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


# -- the objective ---------------------------------------------------------------------------------------------
def _fixed_batch(B=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, 3, 8, 8, generator=g).to(dtype)
    noise = torch.randn(B, 3, 8, 8, generator=g).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:B])
    return x1, noise, y


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_r_equal_t_is_flow_matching():
    """With r = t the target is v: 'flow' is the transport's flow-matching loss of the model at r = t, and with
    p = 0 the loss is ||delta||^2 = C H W times it (gradients too); with p = 1 it is ||delta||^2 / sg(||delta||^2 + c).
    (The transport casts the prediction to float32, hence the float32 tolerances.)"""
    x1, noise, y = _fixed_batch()
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    drop = torch.zeros(4, dtype=torch.bool)
    D = x1[0].numel()
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).train()
    transport = create_transport()
    flow = transport.training_losses(
        lambda x, s, y: model(x, s, y, r=s, force_drop_ids=torch.zeros_like(y)), x1, dict(y=y), t=t, noise=noise
    )["loss"]
    flow.mean().backward()
    g_flow = _grads(model)
    model.zero_grad()
    terms = meanflow_losses(model, x1, y, MeanFlowSettings(weight_p=0.0), noise=noise, t=t, r=t, drop=drop)
    torch.testing.assert_close(terms["flow"], flow.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["loss"].detach(), D * flow.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["target"], x1 - noise, rtol=0, atol=0)
    terms["loss"].mean().backward()
    grads = _grads(model)
    assert grads.keys() == g_flow.keys()
    for k, g in grads.items():
        assert (g - D * g_flow[k]).norm() <= 1e-6 * (D * g_flow[k]).norm(), k
    c = 1e-3
    weighted = meanflow_losses(model, x1, y, MeanFlowSettings(weight_c=c), noise=noise, t=t, r=t, drop=drop)["loss"]
    sq = D * flow.detach()
    torch.testing.assert_close(weighted.detach(), sq / (sq + c), rtol=1e-6, atol=0)


def test_loss_uses_the_identity_where_r_differs_from_t():
    """Rows with r != t are trained on v - (t - r) du/dt (computed here independently with torch.func.jvp through
    the model in float64, SDPA on its math backend), rows with r = t on v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x1, noise, y = _fixed_batch()
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=torch.float64)
    r = torch.tensor([0.1, 0.8, 0.6, 1.0], dtype=torch.float64)
    drop = torch.tensor([False, True, False, False])
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).train()
    terms = meanflow_losses(model, x1, y, MeanFlowSettings(), noise=noise, t=t, r=r, drop=drop)
    z = expand(t, x1) * x1 + (1 - expand(t, x1)) * noise
    v = x1 - noise

    def fn(z_, t_):
        return model(z_, t_, y, r=r, force_drop_ids=drop.long())

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        u, dudt = torch.func.jvp(fn, (z, t), (v, torch.ones_like(t)))
    expected = v + expand((r - t).clamp(0, 1), v) * dudt
    torch.testing.assert_close(terms["target"], expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(terms["pred"].detach(), u, rtol=1e-9, atol=1e-10)
    sq = ((u - expected) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(terms["loss"].detach(), sq / (sq + 1e-3), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(terms["target"][1], v[1])  # du/dt changes the target where r != t


@pytest.mark.parametrize("omega, kappa", [(2.0, 0.0), (1.0, 0.5), (0.6, 0.3)])
def test_guidance_folded_into_the_target(omega, kappa):
    """v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null); v where the label is dropped."""
    x1, noise, y = _fixed_batch()
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    drop = torch.tensor([False, False, True, False])
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).train()
    settings = MeanFlowSettings(omega=omega, kappa=kappa)
    terms = meanflow_losses(model, x1, y, settings, noise=noise, t=t, r=t, drop=drop)
    z = expand(t, x1) * x1 + (1 - expand(t, x1)) * noise
    v = x1 - noise
    with torch.no_grad():
        cond = model(z, t, y, r=t, force_drop_ids=torch.zeros_like(y))
        uncond = model(z, t, torch.full_like(y, 5), r=t, force_drop_ids=torch.zeros_like(y))  # 5: the null class
    expected = omega * v + kappa * cond + (1 - omega - kappa) * uncond
    expected[2] = v[2]
    torch.testing.assert_close(terms["target"], expected, rtol=1e-10, atol=1e-10)


def test_dispersive_term_sees_the_primal_pass_once():
    """The regulariser captures once per step, on the pass with gradient (the JVP pass runs without), and its value
    is the dispersive loss of the plain forward's block output."""
    x1, noise, y = _fixed_batch()
    t = torch.tensor([0.1, 0.35, 0.6, 0.2], dtype=torch.float64)
    r = torch.tensor([0.5, 0.8, 0.9, 1.0], dtype=torch.float64)  # every row takes the JVP
    drop = torch.tensor([False, True, False, False])
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).train()
    reg = DispersiveRegularizer(model, layers=["blocks.0", "blocks.1"], weight=0.5, tau=1.0)
    meanflow_losses(model, x1, y, MeanFlowSettings(omega=1.5), noise=noise, t=t, r=r, drop=drop)
    assert [name for name, _ in reg._captured] == ["blocks.0", "blocks.1"]
    term = reg.loss()
    z = expand(t, x1) * x1 + (1 - expand(t, x1)) * noise
    with torch.no_grad():
        _, acts = model(z, t, y, return_act=True, r=r, force_drop_ids=drop.long())
    expected = 0.5 * (dispersive_loss(acts[0]) + dispersive_loss(acts[1])) / 2
    torch.testing.assert_close(term.detach(), expected, rtol=1e-10, atol=1e-12)
    assert term.requires_grad
    reg.remove()


# -- the model -------------------------------------------------------------------------------------------------
def test_meanflow_sit_adds_only_the_r_embedder(reference, reference_config):
    """A flow SiT keeps the released checkpoints' keys (its forward is tested against the fixtures in
    test_models.py); a MeanFlow SiT adds r_embedder.* and nothing else, and says so in config()."""
    released = {k[len("model.") :] for k in reference if k.startswith("model.")}
    flow = SiT(**reference_config["model_config"])
    mf = SiT(**reference_config["model_config"], meanflow=True)
    assert set(flow.state_dict()) == released
    assert set(mf.state_dict()) - released == {f"r_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert released <= set(mf.state_dict())
    assert flow.config()["meanflow"] is False and mf.config()["meanflow"] is True


def test_time_inputs_are_checked():
    x, t, y = torch.randn(2, 3, 8, 8).double(), torch.rand(2).double(), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="a MeanFlow SiT needs r of shape"):
        tiny_sit(dtype=torch.float64, **MEANFLOW_SIT)(x, t, y)
    with pytest.raises(ValueError, match="r is for MeanFlow models"):
        tiny_sit()(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), r=torch.rand(2))


def test_r_conditions_the_output():
    model = tiny_sit(dtype=torch.float64, **MEANFLOW_SIT).eval()
    x, t, y = torch.randn(2, 3, 8, 8).double(), torch.full((2,), 0.3).double(), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(model(x, t, y, r=t), model(x, t, y, r=t + 0.5))


def test_checkpoint_shapes_tell_a_meanflow_model(tmp_path):
    from disploss import checkpoint as ckpt

    mf = tiny_sit(**MEANFLOW_SIT).eval()
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"ema": mf.state_dict(), "model_config": mf.config()})
    weights, config = ckpt.load_sit_weights(path)
    assert config["meanflow"] is True and ckpt.infer_sit_config(weights, num_heads=2)["meanflow"] is True
    model, built = ckpt.build_sit_from_checkpoint(path, vae_factor=1)
    assert model.meanflow and built == mf.config()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, r=t + 0.1), mf(x, t, y, r=t + 0.1))
    flow_sd = tiny_sit(0, preset=MODEL).state_dict()
    assert ckpt.infer_sit_config(flow_sd, num_heads=4)["meanflow"] is False
    exported = ckpt.export_safetensors(path, tmp_path / "c.safetensors")  # the config travels in the metadata
    assert exported["meanflow"] is True
    again, _ = ckpt.build_sit_from_checkpoint(tmp_path / "c.safetensors", vae_factor=1)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y, r=t + 0.1), mf(x, t, y, r=t + 0.1))


# -- sampling commands -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mf_ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mf")
    ema = tiny_sit(0, preset=MODEL, meanflow=True)
    mf = save_training_checkpoint(folder / "0000100.pt", ema, objective="meanflow")
    flow = save_training_checkpoint(folder / "flow" / "0000100.pt", tiny_sit(0, preset=MODEL))
    return {"meanflow": mf, "flow": flow, "ema": ema}


@pytest.mark.parametrize("steps", [1, 3])
def test_sample_grid_makes_exactly_n_model_calls(capsys, tmp_path, mf_ckpts, sit_forward_calls, steps):
    """`sample.py MeanFlow --num-sampling-steps N`: N calls of the model (one batch: an image per class), no
    guidance by default, and the grid is eps + sum of the steps of the checkpoint's EMA weights."""
    from disploss.sampling.grid import default_class_labels

    calls = sit_forward_calls
    out = tmp_path / "grid.png"
    argv = ["sample", "MeanFlow", "--ckpt", str(mf_ckpts["meanflow"]), "--out", str(out)]
    rc, stdout, err = call(capsys, argv + (["--num-sampling-steps", str(steps)] if steps != 1 else []))
    assert rc == 0, err
    images = len(default_class_labels(mf_ckpts["ema"].num_classes))
    assert calls == [images] * steps  # undoubled: --cfg-scale defaults to 1 in MeanFlow mode
    assert calls.times == [pytest.approx((k / steps, (k + 1) / steps)) for k in range(steps)]
    assert out.is_file() and "MeanFlow uniform, cfg 1.0" in stdout and "objective=meanflow" in stdout


def test_sample_ddp_meanflow_npz_and_calls_per_image(capsys, tmp_path, mf_ckpts, sit_forward_calls):
    """sample-ddp MeanFlow: the npz of N images, 2 model calls per batch with --num-sampling-steps 2, the images
    independent of the batch size, and a rerun that finds every image done samples nothing."""
    calls = sit_forward_calls
    base = ["sample-ddp", "MeanFlow", "--ckpt", str(mf_ckpts["meanflow"]), "--num-fid-samples", "5",
            "--num-sampling-steps", "2", "--device", "cpu"]  # fmt: skip
    npzs = []
    for bs in ("1", "5"):
        calls.clear()
        rc, out, err = call(capsys, [*base, "--sample-dir", str(tmp_path / bs), "--per-proc-batch-size", bs])
        assert rc == 0, err
        assert calls == [int(bs)] * (2 * (5 // int(bs)))  # 2 calls per batch, each image in exactly one batch
        (npz,) = (tmp_path / bs).glob("*.npz")
        weights = fingerprint(load_sit_weights(mf_ckpts["meanflow"])[0])  # sample folders are keyed by the weights
        assert npz.name == f"SiT-T-2-0000100-ema-{weights}-size-8-vae-none-cfg-1.0-seed-0-MeanFlow-2-uniform.npz"
        npzs.append(np.load(npz)["arr_0"])
    assert npzs[0].shape == (5, 8, 8, 3)
    assert np.abs(npzs[0].astype(int) - npzs[1].astype(int)).max() <= 1
    calls.clear()
    assert call(capsys, [*base, "--sample-dir", str(tmp_path / "1")])[0] == 0 and calls == []
    (folder,) = [p for p in (tmp_path / "1").iterdir() if p.is_dir()]
    for lost in ("000001.png", "000003.png"):  # resuming samples exactly the missing images again
        (folder / lost).unlink()
    calls.clear()
    assert call(capsys, [*base, "--sample-dir", str(tmp_path / "1"), "--per-proc-batch-size", "1"])[0] == 0
    assert calls == [1] * 4
    np.testing.assert_array_equal(np.load(next((tmp_path / "1").glob("*.npz")))["arr_0"], npzs[0])


def test_sample_ddp_meanflow_two_processes_give_the_same_npz_as_one(tmp_path, mf_ckpts):
    from trainkit import run_python, torchrun

    argv = ["-m", "disploss", "sample-ddp", "MeanFlow", "--ckpt", str(mf_ckpts["meanflow"]), "--num-fid-samples", "5",
            "--per-proc-batch-size", "1", "--device", "cpu"]  # fmt: skip
    one = run_python([*argv, "--sample-dir", tmp_path / "one"], tmp_path)
    two = torchrun(2, [*argv, "--sample-dir", tmp_path / "two"], tmp_path)
    for done in (one, two):
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sampling 5 on 2 process(es)" in two.stdout
    (a,), (b,) = (list((tmp_path / k).glob("*.npz")) for k in ("one", "two"))
    assert a.name == b.name
    np.testing.assert_array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])


@pytest.mark.parametrize(
    "which, argv, expected",
    [
        (
            "meanflow",
            ["ODE"],
            "is a MeanFlow model (trained with --objective meanflow): sample it in the MeanFlow mode",
        ),
        ("meanflow", ["SDE"], "sample it in the MeanFlow mode"),
        ("flow", ["MeanFlow"], "is a flow-matching model: sample it in the ODE or SDE mode"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "sample-ddp"])
def test_wrong_mode_is_one_line(capsys, tmp_path, mf_ckpts, which, argv, expected, command):
    rc, _, err = call(capsys, [command, *argv, "--ckpt", str(mf_ckpts[which]), "--device", "cpu",
                               *(["--out", str(tmp_path / "x.png")] if command == "sample" else
                                 ["--sample-dir", str(tmp_path), "--num-fid-samples", "2"])])  # fmt: skip
    assert rc == 2
    assert err.startswith(f"disploss {command}: error: ") and expected in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", ["sample", "sample-ddp"])
def test_zero_steps_is_one_line(capsys, mf_ckpts, command):
    rc, _, err = call(capsys, [command, "MeanFlow", "--ckpt", str(mf_ckpts["meanflow"]), "--num-sampling-steps", "0"])
    assert rc == 2 and "argument --num-sampling-steps: must be at least 1, got 0" in err and "Traceback" not in err


def test_sampler_settings():
    from disploss.sampling.config import MeanFlowConfig, ODEConfig

    cfg = MeanFlowConfig(num_sampling_steps=4)
    assert cfg.settings() == {"mode": "MeanFlow", "sampling_method": "uniform", "num_sampling_steps": 4}
    with pytest.raises(ValueError, match="--num-sampling-steps must be at least 1"):
        MeanFlowConfig(num_sampling_steps=0)
    assert math.isclose(ODEConfig().num_sampling_steps, 250)  # the flow modes keep theirs
