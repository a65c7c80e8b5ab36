"""Samplers of a Transport, as functions of (transport, model, x): the probability-flow ODE, the reverse-time SDE and
the ODE likelihood. Each builds the field from the transport and the model and calls an integrator
(disploss.transport.integrators) on the time grid; `model_kwargs` (the labels) reach the model.

`Sampler(transport).sample_ode(**options)` (and sample_sde, sample_ode_likelihood) is the reference's interface to
the same functions: it checks the options at once and returns fn(x, model_fn, **model_kwargs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.errors import ConfigError
from disploss.transport.integrators import (
    ADAPTIVE_METHODS,
    FIXED_METHODS,
    TIME_SCHEDULES,
    default_noise,
    ode_adaptive_per_image,
    ode_fixed,
    ode_torchdiffeq,
    sde_integrate,
    time_grid,
)
from disploss.transport.paths import DIFFUSION_FORMS
from disploss.transport.transport import Transport

ODE_FIXED_METHODS = FIXED_METHODS  # ours: euler, heun2, ab2, ab3 (exact model-call counts)
TORCHDIFFEQ_METHODS = (
    "dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3", "rk4",
    "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver",
)  # fmt: skip
ODE_METHODS = (*TORCHDIFFEQ_METHODS, *(m for m in FIXED_METHODS if m not in TORCHDIFFEQ_METHODS))
# Adaptive methods run by our per-image solver (with step_control='per-image'); the other torchdiffeq methods that
# share state across the batch: dopri8 (one step size per batch), implicit_adams and fixed_adams (a corrector
# iterated to a tolerance over the batch), scipy_solver (the batch as one system).
PER_IMAGE_METHODS = ADAPTIVE_METHODS
BATCH_COUPLED_METHODS = ("dopri8", "implicit_adams", "fixed_adams", "scipy_solver")
STEP_CONTROLS = ("per-image", "batch")
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _choice(value, choices, what: str) -> None:
    if value not in choices:
        shown = ", ".join("None" if c is None else str(c) for c in choices)
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {shown}")


def _check_steps(num_steps: int) -> None:
    if num_steps < 2:
        raise ConfigError(f"num_steps must be at least 2, got {num_steps}")


def _rows_of(model_kwargs: dict, rows: torch.Tensor, batch: int) -> dict:
    # The model inputs of the rows `rows` of a batch of `batch`: per-row tensors (the labels) are indexed.
    if rows.numel() == batch:
        return model_kwargs
    return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in model_kwargs.items()}  # fmt: skip


def check_ode_options(method: str, num_steps: int, time_schedule: str = "uniform", time_rho: float = 1.5,
                      step_control: str = "per-image") -> None:  # fmt: skip
    """ConfigError for an ODE option no sampler takes (the valid choices named)."""
    _choice(method, ODE_METHODS, "ODE sampling method")
    _check_steps(num_steps)
    _choice(time_schedule, TIME_SCHEDULES, "time schedule")
    _choice(step_control, STEP_CONTROLS, "step control")
    time_grid(0.0, 1.0, 2, time_schedule, time_rho)  # checks rho


def sample_ode(
    transport: Transport,
    model: Callable,
    x: torch.Tensor,
    *,
    method: str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    reverse: bool = False,
    time_schedule: str = "uniform",
    time_rho: float = 1.5,
    step_control: str = "per-image",
    tied_halves: bool = False,
    keep_trajectory: bool = False,
    **model_kwargs,
) -> torch.Tensor:
    """The probability-flow ODE dx/dt = v(x, t) from noise (t0) to data (t1), or data to noise with reverse=True.

    Args:
        transport: gives v from the model's prediction (velocity, score or noise) and the interval [t0, t1].
        model: called as model(x, t, **model_kwargs).
        x: (B, C, H, W) the state at t0.
        method: 'euler', 'heun2', 'ab2', 'ab3' run our fixed-step integrator, with exactly (num_steps - 1),
            2 (num_steps - 1), (num_steps - 1) and num_steps model calls; 'dopri5', 'bosh3', 'fehlberg2',
            'adaptive_heun' our per-image adaptive solver (torchdiffeq's with step_control='batch'); any other
            torchdiffeq method goes to torchdiffeq.
        num_steps: points of the time grid; it bounds the calls of the fixed-step methods only.
        time_schedule, time_rho: the grid (integrators.time_grid): 'uniform' (the reference's linspace) or 'power'
            (steps shrinking towards the data end, exponent rho); for adaptive methods it only chooses the output
            times.
        step_control: adaptive methods: 'per-image' (each image's own error decides its steps, so its result does
            not depend on its batch-mates) or 'batch' (torchdiffeq's: one step size for the batch).
        tied_halves: x is the guidance batch [x; x] (rows i and i + B/2 are one image): per-image steps keep both
            rows together.
        keep_trajectory: return every state of the grid, not only the last.
    Returns:
        (num_steps, B, C, H, W) the states on the grid, or (1, B, C, H, W) the last one.
    """
    check_ode_options(method, num_steps, time_schedule, time_rho, step_control)
    t0, t1 = transport.interval(eval=True)
    if reverse:
        t0, t1 = t1, t0  # integrate the same field backwards in time: data -> noise
    ts = time_grid(t0, t1, num_steps, time_schedule, time_rho, device=x.device)

    def field(state, t):
        return transport.drift(state, t, model, **model_kwargs)

    with torch.no_grad():
        if method in ODE_FIXED_METHODS:
            return torch.stack(ode_fixed(field, x, ts, method, keep=keep_trajectory))
        if method in PER_IMAGE_METHODS and step_control == "per-image":

            def rows_field(state, t, rows):
                return transport.drift(state, t, model, **_rows_of(model_kwargs, rows, x.shape[0]))

            return ode_adaptive_per_image(
                rows_field, x, ts, method, atol, rtol, tie_halves=tied_halves, keep=keep_trajectory
            )
        # VP's coefficients are undefined past t = 1 (sigma_t is NaN there): never step beyond t1.
        out = ode_torchdiffeq(field, x, ts, method, atol, rtol, stop_at_end=transport.path_type == "VP")
        return out if keep_trajectory else out[-1:]


def check_sde_options(method: str, diffusion_form: str, last_step: str | None, num_steps: int) -> None:
    """ConfigError for an SDE option no sampler takes (the valid choices named)."""
    _choice(method, SDE_METHODS, "SDE sampling method")
    _choice(diffusion_form, DIFFUSION_FORMS, "diffusion form")
    _choice(last_step, LAST_STEPS, "last step")
    _check_steps(num_steps)


def sample_sde(
    transport: Transport,
    model: Callable,
    x: torch.Tensor,
    *,
    method: str = "Euler",
    diffusion_form: str = "SBDM",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
    num_steps: int = 250,
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = default_noise,
    keep_trajectory: bool = False,
    **model_kwargs,
) -> list[torch.Tensor]:
    """The reverse-time SDE with the path's marginals: dx = [v + w(t) score] dt + sqrt(2 w(t)) dW, from noise to data.

    Args:
        transport, model, x: as sample_ode.
        method: 'Euler' (Euler-Maruyama) or 'Heun'.
        diffusion_form, diffusion_norm: w(t); see paths.DIFFUSION_FORMS.
        last_step: None | 'Mean' | 'Tweedie' | 'Euler' (the text 'None' is None): the final deterministic step of
            size last_step_size from t1 = 1 - last_step_size to 1.
        noise_fn: draws the Brownian increments' standard normals for a state x; the default draws on the CPU
            generator like the reference; sample_ddp passes per-image streams.
        keep_trajectory: every state, not only the last.
    Returns:
        The list of num_steps states (the last after the last step), or [the last one].
    """
    last_step = None if last_step == "None" else last_step
    check_sde_options(method, diffusion_form, last_step, num_steps)
    if last_step is None:
        last_step_size = 0.0
    t0, t1 = transport.interval(eval=True, sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    path = transport.path

    def diffusion(state, t):
        return path.compute_diffusion(state, t, form=diffusion_form, norm=diffusion_norm)

    def sde_drift(state, t):
        velocity, score = transport.drift_and_score(state, t, model, **model_kwargs)  # one model call
        return velocity + diffusion(state, t) * score

    ts = torch.linspace(t0, t1, num_steps, device=x.device)
    with torch.no_grad():
        xs = sde_integrate(sde_drift, diffusion, x, ts, method, noise_fn, keep=keep_trajectory)
        last = xs[-1]
        tt = torch.full((x.shape[0],), t1, device=x.device, dtype=x.dtype)
        if last_step == "Mean":
            last = last + sde_drift(last, tt) * last_step_size
        elif last_step == "Euler":
            last = last + transport.drift(last, tt, model, **model_kwargs) * last_step_size
        elif last_step == "Tweedie":
            a, s = path.alpha(tt)[0], path.sigma(tt)[0]
            last = last / a + s**2 / a * transport.score(last, tt, model, **model_kwargs)
        if not keep_trajectory:
            return [last]
        xs.append(last)
    return xs


def check_likelihood_options(method: str, num_steps: int) -> None:
    """ConfigError for a likelihood option it does not take."""
    _choice(method, ODE_METHODS, "ODE sampling method")
    _check_steps(num_steps)
    if method in ("ab2", "ab3"):
        raise ConfigError(f"the likelihood integrates with euler, heun2 or a torchdiffeq method, not {method}")


def ode_likelihood(
    transport: Transport,
    model: Callable,
    x: torch.Tensor,
    *,
    method: str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x) of data x by the probability-flow ODE from data (t1) to noise (t0), with a Hutchinson (Rademacher)
    estimate of the divergence: log p_1(x) = log N(x_0; 0, I) - integral_0^1 div v dt.

    Returns:
        (logp (B,) in nats, x at t0 (B, ...)).
    """
    check_likelihood_options(method, num_steps)
    t0, t1 = transport.interval(eval=True)

    def field(state, t):
        xs, _ = state
        eps = torch.randint(2, xs.shape, device=xs.device).to(xs.dtype) * 2 - 1
        with torch.enable_grad():
            xs = xs.detach().requires_grad_(True)
            v = transport.drift(xs, t, model, **model_kwargs)
            grad = torch.autograd.grad((v * eps).sum(), xs)[0]
        div = (grad * eps).flatten(1).sum(1)
        return v.detach(), div.detach()

    ts = torch.linspace(t1, t0, num_steps, device=x.device)
    state = (x, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))
    if method in ("euler", "heun2"):
        # Fixed-step integration of the augmented state (x, integral of div v).
        xs, acc = state
        for i in range(num_steps - 1):
            t, dt = ts[i], ts[i + 1] - ts[i]
            tv = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
            v1, d1 = field((xs, acc), tv)
            if method == "euler":
                xs, acc = xs + dt * v1, acc + dt * d1
            else:
                tv2 = torch.full_like(tv, float(ts[i + 1]))
                v2, d2 = field((xs + dt * v1, acc + dt * d1), tv2)
                xs, acc = xs + dt * 0.5 * (v1 + v2), acc + dt * 0.5 * (d1 + d2)
        z, delta = xs, acc
    else:
        vp = transport.path_type == "VP"
        traj, deltas = ode_torchdiffeq(field, state, ts, method, atol, rtol, stop_at_end=vp)
        z, delta = traj[-1], deltas[-1]
    # delta = integral from t1 down to t0 of div v = -(integral_t0^t1 div v dt)
    return transport.prior_logp(z) + delta, z


class Sampler:
    """The reference's interface: `Sampler(transport).sample_ode(**options)` returns fn(x, model_fn, **model_kwargs)
    (the options checked at once), which calls sample_ode / sample_sde / ode_likelihood."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.path = transport.path

    def sample_ode(self, *, sampling_method: str = "dopri5", num_steps: int = 50, keep_trajectory: bool = True,
                   tied_halves: bool | None = None, **options) -> Callable:  # fmt: skip
        """fn(x, model_fn, **model_kwargs) -> (num_steps, B, ...) the states on the grid (see sample_ode).

        tied_halves=None: tied when model_kwargs has 'cfg_scale' (the reference's forward_with_cfg convention)."""
        check_ode_options(
            sampling_method, num_steps, options.get("time_schedule", "uniform"), options.get("time_rho", 1.5),
            options.get("step_control", "per-image"),
        )  # fmt: skip

        def fn(x, model_fn, **model_kwargs):
            tie = "cfg_scale" in model_kwargs if tied_halves is None else tied_halves
            return sample_ode(self.transport, model_fn, x, method=sampling_method, num_steps=num_steps,
                              keep_trajectory=keep_trajectory, tied_halves=tie, **options, **model_kwargs)  # fmt: skip

        return fn

    def sample_sde(self, *, sampling_method: str = "Euler", diffusion_form: str = "SBDM", last_step: str | None = "Mean",
                   num_steps: int = 250, keep_trajectory: bool = True, **options) -> Callable:  # fmt: skip
        """fn(x, model_fn, **model_kwargs) -> the list of num_steps states, the last after the last step."""
        check_sde_options(sampling_method, diffusion_form, None if last_step == "None" else last_step, num_steps)

        def fn(x, model_fn, **model_kwargs):
            return sample_sde(self.transport, model_fn, x, method=sampling_method, diffusion_form=diffusion_form,
                              last_step=last_step, num_steps=num_steps, keep_trajectory=keep_trajectory, **options,
                              **model_kwargs)  # fmt: skip

        return fn

    def sample_ode_likelihood(self, *, sampling_method: str = "dopri5", num_steps: int = 50, **options) -> Callable:
        """fn(x, model_fn, **model_kwargs) -> (logp (B,), x at t0)."""
        check_likelihood_options(sampling_method, num_steps)

        def fn(x, model_fn, **model_kwargs):
            return ode_likelihood(self.transport, model_fn, x, method=sampling_method, num_steps=num_steps, **options,
                                  **model_kwargs)  # fmt: skip

        return fn
