"""ODE / SDE / likelihood samplers: the reference's ODE finals, torchdiffeq equivalence, convergence orders
on a Gaussian target with a closed-form field, SDE statistics, likelihood, and every option combination."""

from __future__ import annotations

import math

import pytest
import torch

from disploss.transport import (
    DIFFUSION_FORMS,
    LAST_STEPS,
    PATH_TYPES,
    PREDICTIONS,
    SDE_METHODS,
    Sampler,
    create_transport,
)
from disploss.transport.integrators import ode_fixed
from trainkit import tiny_sit

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)  # torch.func.jvp, inside torch


def _ode_case(reference, model, entry):
    """(model_fn, x, kwargs) for one 'ode' entry of the fixture json (README: CFG batch [z, z], [y, null])."""
    z, y = reference["ode_z"], reference["ode_y"]
    if entry["cfg_scale"] > 1:
        null = torch.full_like(y, model.num_classes)
        kwargs = {"y": torch.cat([y, null]), "cfg_scale": entry["cfg_scale"]}
        return model.forward_with_cfg, torch.cat([z, z]), kwargs
    return model, z, {"y": y}


def _entries():
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "data" / "sit_reference_small.json").read_text())["ode"]


# -- the reference's ODE finals ---------------------------------------------------------------------------
@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["key"])
def test_ode_finals_match_reference(reference, reference_model, entry):
    model_fn, x, kwargs = _ode_case(reference, reference_model, entry)
    tr = create_transport(entry["path_type"])
    sample = Sampler(tr).sample_ode(
        sampling_method=entry["sampling_method"], num_steps=entry["num_steps"], atol=entry["atol"], rtol=entry["rtol"]
    )
    traj = sample(x, model_fn, **kwargs)
    assert traj.shape == (entry["num_steps"], *x.shape)
    final = traj[-1][: len(reference["ode_z"])]
    torch.testing.assert_close(final, reference[entry["key"]], rtol=0, atol=1e-4)


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["key"])
def test_fixed_step_integrator_equals_torchdiffeq(reference, reference_model, entry):
    from torchdiffeq import odeint

    model_fn, x, kwargs = _ode_case(reference, reference_model, entry)
    tr = create_transport(entry["path_type"])
    t0, t1 = tr.interval(eval=True)
    ts = torch.linspace(t0, t1, entry["num_steps"])

    def field(t, state):
        return tr.drift(state, torch.ones(len(state)) * t, model_fn, **kwargs)

    calls = []

    def counted(state, t):
        calls.append(1)
        return tr.drift(state, t, model_fn, **kwargs)

    with torch.no_grad():
        theirs = odeint(field, x, ts, method=entry["sampling_method"])
        ours = torch.stack(ode_fixed(counted, x, ts, entry["sampling_method"]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs[-1][: len(reference["ode_z"])], reference[entry["key"]], rtol=0, atol=1e-4)
    per_step = {"euler": 1, "heun2": 2}[entry["sampling_method"]]
    assert len(calls) == per_step * (entry["num_steps"] - 1)


# -- convergence on a Gaussian target ---------------------------------------------------------------------
def _endpoint_error(gaussian, path_type, prediction, method, num_steps, **kw):
    target = gaussian(path_type, torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0]))
    field = {"velocity": target.velocity, "score": target.score, "noise": target.noise}[prediction]
    tr = create_transport(path_type, prediction)
    t0, t1 = tr.interval(eval=True)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = Sampler(tr).sample_ode(sampling_method=method, num_steps=num_steps, **kw)(x, field)[-1]
    return (out - target.flow(x, t0, t1)).abs().max().item()


@pytest.mark.parametrize("path_type", PATH_TYPES)
@pytest.mark.parametrize("method,order", [("euler", 1), ("heun2", 2), ("ab2", 2), ("ab3", 3)])
def test_fixed_step_convergence_order(gaussian, path_type, method, order):
    # Halving the step divides the global error by 2^order (asymptotically). The grid starts at
    # 41 points (40 steps) so that the ratio is already within 15% of its limit.
    errors = [_endpoint_error(gaussian, path_type, "velocity", method, n) for n in (41, 81)]
    ratio = errors[0] / errors[1]
    assert 2**order * 0.85 < ratio < 2**order * 1.15, (errors, ratio)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun2", 2), ("ab2", 2), ("ab3", 3)])
@pytest.mark.parametrize("rho", [1.5, 3.0])
def test_power_schedule_keeps_the_order(gaussian, method, order, rho):
    # The power grid is a smooth map of the uniform one (steps shrinking towards t1 like (1 - u)^(rho - 1)), so
    # the order is that of the method (the variable-step Adams-Bashforth weights included).
    kw = dict(time_schedule="power", time_rho=rho)
    errors = [_endpoint_error(gaussian, "Linear", "velocity", method, n, **kw) for n in (81, 161)]
    ratio = errors[0] / errors[1]
    assert 2**order * 0.8 < ratio < 2**order * 1.2, (errors, ratio)


@pytest.mark.parametrize("schedule", ["uniform", "power"])
@pytest.mark.parametrize("method,nfe", [("euler", lambda n: n - 1), ("heun2", lambda n: 2 * (n - 1)),
                                        ("ab2", lambda n: n - 1), ("ab3", lambda n: n)])  # fmt: skip
@pytest.mark.parametrize("num_steps", [2, 3, 4, 11])
def test_fixed_step_methods_make_exactly_their_model_calls(gaussian, schedule, method, nfe, num_steps):
    target = gaussian("Linear", 0.5, 0.7)
    times = []

    def field(x, t):
        times.append(float(t[0]))
        return target.velocity(x, t)

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=num_steps,
                                                   time_schedule=schedule, time_rho=2.0)  # fmt: skip
    out = sample(x, field)
    assert len(times) == nfe(num_steps)
    assert out.shape == (num_steps, 5, 3) and torch.isfinite(out).all()
    assert min(times) == 0.0 and max(times) <= 1.0


def test_adams_bashforth_weights():
    from disploss.transport.integrators import adams_bashforth_weights

    # uniform steps: the classical coefficients (Hairer, Norsett, Wanner, table III.1.1), nodes oldest first
    torch.testing.assert_close(adams_bashforth_weights([0.0, 0.1], 0.1, 0.2), [-0.1 / 2, 0.1 * 3 / 2])
    torch.testing.assert_close(adams_bashforth_weights([0.0, 0.1, 0.2], 0.2, 0.3), [0.5 / 12, -1.6 / 12, 2.3 / 12])
    # uneven nodes: exact for every polynomial of degree < number of nodes
    nodes, a, b = [0.1, 0.25, 0.6], 0.6, 0.95
    w = adams_bashforth_weights(nodes, a, b)
    for degree in range(3):
        exact = (b ** (degree + 1) - a ** (degree + 1)) / (degree + 1)
        assert abs(sum(wj * n**degree for wj, n in zip(w, nodes)) - exact) < 1e-14


def test_time_grid():
    from disploss.transport.integrators import time_grid

    assert torch.equal(time_grid(0.0, 1.0, 7), torch.linspace(0.0, 1.0, 7))
    g = time_grid(0.0, 1.0, 9, "power", 2.0)
    u = torch.linspace(0, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(g, (1 - (1 - u) ** 2).float(), rtol=0, atol=1e-7)
    assert g[0] == 0.0 and g[-1] == 1.0 and (g.diff() > 0).all() and (g.diff().diff() < 0).all()  # shrinking steps
    back = time_grid(1.0, 0.001, 5, "power", 3.0)  # the reverse direction: still denser near the end point t1
    assert back[0] == 1.0 and back[-1] == pytest.approx(0.001) and (back.diff() < 0).all()
    assert torch.equal(time_grid(0.0, 1.0, 6, "power", 1.0), torch.linspace(0.0, 1.0, 6))


# VP-noise with dopri5 used to abort ('underflow in dt'), as in the reference: the adaptive last step overshot t1
# and evaluated the field at t > 1, where VP's sigma_t is NaN. The sampler now lands the last step on t1 for VP.
DOPRI5_CASES = [(path_type, prediction) for path_type in PATH_TYPES for prediction in PREDICTIONS]


@pytest.mark.parametrize("path_type,prediction", DOPRI5_CASES)
def test_dopri5_reaches_the_exact_endpoint(gaussian, path_type, prediction):
    # The exact flow map of the Gaussian; the error is bounded by dopri5's tolerances (global error can be
    # a few times the local tolerance), for every prediction type through the Transport's conversions.
    err = _endpoint_error(gaussian, path_type, prediction, "dopri5", 5, atol=1e-9, rtol=1e-9)
    assert err < 1e-6


def test_reverse_ode_returns_the_noise(gaussian):
    target = gaussian("Linear", torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0]))
    tr = create_transport("Linear")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = Sampler(tr)
    data = sampler.sample_ode(sampling_method="dopri5", atol=1e-10, rtol=1e-10)(z, target.velocity)[-1]
    torch.testing.assert_close(data, target.flow(z, 0.0, 1.0), rtol=0, atol=1e-7)
    back = sampler.sample_ode(sampling_method="dopri5", atol=1e-10, rtol=1e-10, reverse=True)(data, target.velocity)
    torch.testing.assert_close(back[-1], z, rtol=0, atol=1e-7)
    back = sampler.sample_ode(sampling_method="heun2", num_steps=201, reverse=True)(data, target.velocity)
    torch.testing.assert_close(back[-1], z, rtol=0, atol=1e-3)


def test_keep_trajectory_false(gaussian):
    target = gaussian("Linear", 0.0, 1.0)
    x = torch.randn(3, 2, dtype=torch.float64)
    tr = create_transport("Linear")
    for method in ("euler", "dopri5"):
        full = Sampler(tr).sample_ode(sampling_method=method, num_steps=5)(x, target.velocity)
        last = Sampler(tr).sample_ode(sampling_method=method, num_steps=5, keep_trajectory=False)(x, target.velocity)
        assert last.shape == (1, 3, 2)
        torch.testing.assert_close(last[0], full[-1])


# -- SDE statistics ---------------------------------------------------------------------------------------
# N samples of a 2-coordinate Gaussian (mean M, std S). Sampling error: the mean's standard error is
# S / sqrt(N) = 0.008 S and the variance's relative standard error sqrt(2 / N) = 0.011; 100 Euler / Heun steps
# add an O(dt) bias measured at <= 0.015 S on the mean and <= 0.07 on the variance (Heun with the constant
# form is the worst). Tolerances 0.05 S and 0.12 cover about 5 standard errors plus that bias, while a sampler
# that is off by a factor in the noise or the score term misses the variance by far more.
M, S, N = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.5]), 16000


def _sde_stats(gaussian, path_type, prediction, method, form, last_step, seed=0):
    target = gaussian(path_type, M, S)
    field = {"velocity": target.velocity, "score": target.score, "noise": target.noise}[prediction]
    torch.manual_seed(seed)
    x = torch.randn(N, 2, dtype=torch.float64)
    tr = create_transport(path_type, prediction)
    xs = Sampler(tr).sample_sde(sampling_method=method, diffusion_form=form, last_step=last_step, num_steps=100)(
        x, field
    )
    assert len(xs) == 100  # num_steps - 1 SDE steps plus the last step, as the reference
    out = xs[-1].double()
    return (out.mean(0) - M.double()) / S, out.var(0) / S.double() ** 2 - 1


def _check_stats(mean_err, var_err):
    assert mean_err.abs().max() < 0.05, mean_err
    assert var_err.abs().max() < 0.12, var_err


@pytest.mark.parametrize("method", SDE_METHODS)
@pytest.mark.parametrize("form", DIFFUSION_FORMS)
def test_sde_reproduces_the_gaussian(gaussian, method, form):
    _check_stats(*_sde_stats(gaussian, "Linear", "velocity", method, form, "Euler"))


@pytest.mark.parametrize("last_step", ["Mean", None, "Tweedie"])
def test_sde_last_steps_reproduce_the_gaussian(gaussian, last_step):
    # 'Mean' takes the SDE drift without noise for the last step, so it is only unbiased where the diffusion
    # vanishes at t = 1, as SBDM does.
    _check_stats(*_sde_stats(gaussian, "Linear", "velocity", "Euler", "SBDM", last_step))


@pytest.mark.parametrize(
    "path_type,prediction,method,form",
    [
        ("GVP", "velocity", "Euler", "SBDM"),
        ("VP", "velocity", "Heun", "sigma"),
        ("Linear", "score", "Euler", "SBDM"),
        ("GVP", "noise", "Heun", "linear"),
    ],
)
def test_sde_other_paths_and_predictions(gaussian, path_type, prediction, method, form):
    _check_stats(*_sde_stats(gaussian, path_type, prediction, method, form, "Euler"))


def test_sde_noise_fn_is_used():
    tr = create_transport("Linear")
    seen = []

    def noise_fn(x):
        seen.append(x.shape)
        return torch.zeros_like(x)

    x = torch.randn(3, 2)
    xs = Sampler(tr).sample_sde(num_steps=5, noise_fn=noise_fn, diffusion_form="sigma", last_step=None)(
        x, lambda x, t: torch.zeros_like(x) + 1.0
    )
    assert len(seen) == 4 and all(s == (3, 2) for s in seen)
    assert torch.isfinite(xs[-1]).all()


# -- likelihood -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,num_steps,tol", [("dopri5", 5, 1e-5), ("heun2", 101, 1e-3), ("euler", 401, 5e-2)])
@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_likelihood_of_a_gaussian(gaussian, method, num_steps, tol, path_type):
    # The closed-form velocity of a Gaussian is affine with a diagonal Jacobian, so the Hutchinson estimate
    # with Rademacher probes is exact and the only error is the integrator's.
    target = gaussian(path_type, torch.tensor([1.5, -0.5])[:, None], torch.tensor([0.5, 2.0])[:, None])
    x = (
        target.mean
        + target.std * torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.3
    )
    tr = create_transport(path_type)
    kw = dict(atol=1e-9, rtol=1e-9) if method == "dopri5" else {}
    logp, z = Sampler(tr).sample_ode_likelihood(sampling_method=method, num_steps=num_steps, **kw)(x, target.velocity)
    assert logp.shape == (6,)
    torch.testing.assert_close(z, target.flow(x, 1.0, 0.0), rtol=0, atol=max(tol, 1e-6))
    torch.testing.assert_close(logp, target.log_density(x), rtol=0, atol=tol)


def test_likelihood_of_a_tiny_sit_is_finite():
    model = tiny_sit()
    x = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    logp, z = Sampler(create_transport("Linear")).sample_ode_likelihood(sampling_method="heun2", num_steps=3)(
        x, model, y=torch.tensor([0, 1])
    )
    assert logp.shape == (2,) and torch.isfinite(logp).all() and z.shape == x.shape


# -- every option with a tiny random SiT ------------------------------------------------------------------
ODE_OPTIONS = [("ode", m, None, None) for m in ("euler", "heun2", "dopri5")]
SDE_OPTIONS = [("sde", m, f, ls) for m in SDE_METHODS for f in DIFFUSION_FORMS for ls in LAST_STEPS]


@pytest.fixture(scope="module")
def smoke_model():
    return tiny_sit(seed=3, depth=1).requires_grad_(False)


@pytest.mark.parametrize("option", ODE_OPTIONS + SDE_OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("path_type", PATH_TYPES)
def test_every_option_gives_finite_samples(smoke_model, path_type, prediction, option):
    kind, method, form, last_step = option
    tr = create_transport(path_type, prediction)
    sampler = Sampler(tr)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([1, 5])  # 5 = the null class
    torch.manual_seed(0)
    if kind == "ode":
        out = sampler.sample_ode(sampling_method=method, num_steps=4, atol=1e-3, rtol=1e-3)(x, smoke_model, y=y)
        assert out.shape == (4, 2, 4, 8, 8)
    else:
        out = sampler.sample_sde(sampling_method=method, diffusion_form=form, last_step=last_step, num_steps=4)(
            x, smoke_model, y=y
        )
        assert len(out) == 4
    assert torch.isfinite(out[-1]).all()
    assert out[-1].shape == x.shape


def test_vp_score_model_with_default_dopri5_is_finite(smoke_model):
    # dopri5's last step would overshoot t1 (up to t ~ 1.5 here), where VP's coefficients are undefined; the
    # sampler makes it land on t1 for VP, so the field is only ever evaluated inside [t0, t1].
    seen = []

    def model(x, t, y):
        seen.append(t.max().item())
        return smoke_model(x, t, y)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    out = Sampler(create_transport("VP", "score")).sample_ode()(x, model, y=torch.tensor([1, 5]))
    t1 = create_transport("VP", "score").interval(eval=True)[1]
    assert max(seen) <= t1 + 1e-6 and torch.isfinite(out[-1]).all()


# -- the reference's NaN cases, one by one ----------------------------------------------------------------
def _times_seen(tr, **sde_kwargs):
    seen = []

    def field(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x) + 0.1

    x = torch.randn(2, 3)
    xs = Sampler(tr).sample_sde(num_steps=6, **sde_kwargs)(x, field)
    return torch.cat(seen), xs


@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_sbdm_with_a_velocity_model_is_finite(path_type):
    t, xs = _times_seen(create_transport(path_type), diffusion_form="SBDM")
    assert t.min() > 0  # the reference started at t = 0, where SBDM's diffusion is infinite
    assert all(torch.isfinite(x).all() for x in xs)


@pytest.mark.parametrize("path_type", ["Linear", "GVP"])
def test_heun_without_a_last_step_is_finite(path_type):
    t, xs = _times_seen(create_transport(path_type), sampling_method="Heun", diffusion_form="sigma", last_step=None)
    assert t.max() < 1  # the reference's Heun evaluated the score at t = 1, where sigma = 0
    assert all(torch.isfinite(x).all() for x in xs)


@pytest.mark.parametrize("form", ["constant", "increasing-decreasing"])
def test_constant_and_increasing_decreasing_forms_run(form):
    # The reference crashed on 'constant' (a float, not a tensor) and could not reach 'increasing-decreasing'
    # (its key was misspelled).
    tr = create_transport("Linear")
    _, xs = _times_seen(tr, diffusion_form=form, diffusion_norm=0.5)
    assert all(torch.isfinite(x).all() for x in xs)
    t = torch.tensor([0.25])
    w = tr.path.compute_diffusion(torch.zeros(1, 3), t, form=form, norm=0.5)
    assert w.item() == pytest.approx(0.5 if form == "constant" else 0.5 * math.sin(math.pi * 0.25) ** 2)


def test_given_sample_eps_reaches_the_sampler():
    tr = create_transport("Linear", "velocity", sample_eps=0.05)
    t, _ = _times_seen(tr, diffusion_form="SBDM", last_step="Mean", last_step_size=0.04)
    assert t.min().item() == pytest.approx(0.05) and t.max().item() == pytest.approx(0.96)
    seen = []
    Sampler(create_transport("GVP", "score", sample_eps=0.05)).sample_ode(sampling_method="euler", num_steps=3)(
        torch.zeros(1, 2), lambda x, tt: seen.append(tt) or torch.zeros_like(x)
    )
    assert [s.item() for s in seen] == pytest.approx([0.05, 0.5])


# -- bad input --------------------------------------------------------------------------------------------
def test_unknown_ode_method_lists_the_choices():
    with pytest.raises(ValueError, match="unknown ODE sampling method 'rk45'") as info:
        Sampler(create_transport()).sample_ode(sampling_method="rk45")
    assert all(m in str(info.value) for m in ("dopri5", "euler", "heun2"))
    with pytest.raises(ValueError, match="unknown ODE sampling method"):
        Sampler(create_transport()).sample_ode_likelihood(sampling_method="Euler")


@pytest.mark.parametrize(
    "kwargs,message,choices",
    [
        ({"sampling_method": "Milstein"}, "unknown SDE sampling method", ["Euler", "Heun"]),
        ({"diffusion_form": "inccreasing-decreasing"}, "unknown diffusion form", list(DIFFUSION_FORMS)),
        ({"last_step": "Median"}, "unknown last step", ["None", "Mean", "Tweedie", "Euler"]),
    ],
)
def test_bad_sde_options_list_the_choices(kwargs, message, choices):
    with pytest.raises(ValueError, match=message) as info:
        Sampler(create_transport()).sample_sde(**kwargs)
    assert all(c in str(info.value) for c in choices)


def test_last_step_none_string_is_accepted():
    xs = Sampler(create_transport()).sample_sde(last_step="None", num_steps=3)(
        torch.zeros(1, 2), lambda x, t: torch.zeros_like(x)
    )
    assert len(xs) == 3


@pytest.mark.parametrize("num_steps", [0, 1])
def test_too_few_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps must be at least 2"):
        Sampler(create_transport()).sample_ode(num_steps=num_steps)
    with pytest.raises(ValueError, match="num_steps must be at least 2"):
        Sampler(create_transport()).sample_sde(num_steps=num_steps)
