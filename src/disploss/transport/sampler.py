"""Samplers: each `Sampler.sample_*` returns fn(x, model_fn, **model_kwargs), as the reference does.

`sample_ode` returns the states on its time grid (callers take [-1]); `sample_sde` returns the list of
states after each step plus the last step; `sample_ode_likelihood` returns (log p(x), x at t0).
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


def _check_ode_method(sampling_method: str, num_steps: int) -> None:
    if sampling_method not in ODE_METHODS:
        raise ConfigError(f"unknown ODE sampling method {sampling_method!r}; valid choices: {', '.join(ODE_METHODS)}")
    if num_steps < 2:
        raise ConfigError(f"num_steps must be at least 2, got {num_steps}")


def _rows_of(model_kwargs: dict, rows: torch.Tensor, batch: int) -> dict:
    # The model inputs of the rows `rows` of a batch of `batch`: per-row tensors (the labels) are indexed.
    if rows.numel() == batch:
        return model_kwargs
    return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in model_kwargs.items()}  # fmt: skip


class Sampler:
    """Builds sampling functions for a Transport."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.path = transport.path

    # -- ODE --------------------------------------------------------------------------------------------
    def sample_ode(
        self,
        *,
        sampling_method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        reverse: bool = False,
        keep_trajectory: bool = True,
        time_schedule: str = "uniform",
        time_rho: float = 1.5,
        step_control: str = "per-image",
        tied_halves: bool | None = None,
    ) -> Callable:
        """Probability-flow ODE from noise (t0) to data (t1), or data to noise with reverse=True.

        Args:
            sampling_method: 'euler', 'heun2', 'ab2', 'ab3' run our fixed-step integrator, with exactly
                (num_steps - 1), 2 (num_steps - 1), (num_steps - 1) and num_steps model calls; 'dopri5', 'bosh3',
                'fehlberg2', 'adaptive_heun' our per-image adaptive solver (torchdiffeq's with step_control='batch');
                any other torchdiffeq method goes to torchdiffeq.
            num_steps: points of the time grid; it bounds the calls of the fixed-step methods only.
            keep_trajectory: False returns only the final state (as a 1-element stack): less memory.
            time_schedule, time_rho: the grid (integrators.time_grid): 'uniform' (the reference's linspace) or
                'power' (steps shrinking towards the data end, exponent rho); for adaptive methods the grid only
                chooses the output times.
            step_control: adaptive methods: 'per-image' (each image's own error decides its steps, so its result
                does not depend on its batch-mates) or 'batch' (torchdiffeq's: one step size for the batch).
            tied_halves: the batch is the guidance batch [x; x] (rows i and i + B/2 are one image): per-image
                steps keep both rows together. None: when model_kwargs has 'cfg_scale' (the reference's
                forward_with_cfg convention).
        Returns:
            fn(x, model_fn, **model_kwargs) -> tensor (num_steps, B, ...) of the states on the grid.
        """
        _check_ode_method(sampling_method, num_steps)
        if time_schedule not in TIME_SCHEDULES:
            raise ConfigError(f"unknown time schedule {time_schedule!r}; valid choices: {', '.join(TIME_SCHEDULES)}")
        if step_control not in STEP_CONTROLS:
            raise ConfigError(f"unknown step control {step_control!r}; valid choices: {', '.join(STEP_CONTROLS)}")
        t0, t1 = self.transport.interval(eval=True)
        if reverse:
            t0, t1 = t1, t0  # integrate the same field backwards in time: data -> noise
        time_grid(t0, t1, num_steps, time_schedule, time_rho)  # checks rho now rather than at the first batch
        per_image = sampling_method in PER_IMAGE_METHODS and step_control == "per-image"

        def _sample(x, model_fn, **model_kwargs):
            ts = time_grid(t0, t1, num_steps, time_schedule, time_rho, device=x.device)

            def field(state, t):
                return self.transport.drift(state, t, model_fn, **model_kwargs)

            with torch.no_grad():
                if sampling_method in ODE_FIXED_METHODS:
                    return torch.stack(ode_fixed(field, x, ts, sampling_method, keep=keep_trajectory))
                if per_image:
                    tie = "cfg_scale" in model_kwargs if tied_halves is None else tied_halves

                    def rows_field(state, t, rows):
                        kwargs = _rows_of(model_kwargs, rows, x.shape[0])
                        return self.transport.drift(state, t, model_fn, **kwargs)

                    return ode_adaptive_per_image(
                        rows_field, x, ts, sampling_method, atol, rtol, tie_halves=tie, keep=keep_trajectory
                    )
                # VP's coefficients are undefined past t = 1 (sigma_t is NaN there): never step beyond t1.
                vp = self.transport.path_type == "VP"
                out = ode_torchdiffeq(field, x, ts, sampling_method, atol, rtol, stop_at_end=vp)
                return out if keep_trajectory else out[-1:]

        return _sample

    # -- SDE --------------------------------------------------------------------------------------------
    def sample_sde(
        self,
        *,
        sampling_method: str = "Euler",
        diffusion_form: str = "SBDM",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        num_steps: int = 250,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] = default_noise,
        keep_trajectory: bool = True,
    ) -> Callable:
        """Reverse-time SDE with the path's marginals: dx = [v + w(t) score] dt + sqrt(2 w(t)) dW.

        Args:
            sampling_method: 'Euler' (Euler-Maruyama) or 'Heun'.
            diffusion_form, diffusion_norm: w(t); see paths.DIFFUSION_FORMS.
            last_step: None | 'Mean' | 'Tweedie' | 'Euler': the final deterministic step of size
                last_step_size from t1 = 1 - last_step_size to 1.
            noise_fn: draws the Brownian increments' standard normals for a state x; the default draws on
                the CPU generator like the reference; sample_ddp passes per-image streams.
            keep_trajectory: False keeps only the final state (the list then holds one element): less memory.
        Returns:
            fn(x, model_fn, **model_kwargs) -> list of num_steps states (the last after the last step).
        """
        if sampling_method not in SDE_METHODS:
            raise ConfigError(
                f"unknown SDE sampling method {sampling_method!r}; valid choices: {', '.join(SDE_METHODS)}"
            )
        if diffusion_form not in DIFFUSION_FORMS:
            raise ConfigError(f"unknown diffusion form {diffusion_form!r}; valid choices: {', '.join(DIFFUSION_FORMS)}")
        if last_step == "None":
            last_step = None
        if last_step not in LAST_STEPS:
            raise ConfigError(f"unknown last step {last_step!r}; valid choices: None, Mean, Tweedie, Euler")
        if num_steps < 2:
            raise ConfigError(f"num_steps must be at least 2, got {num_steps}")
        if last_step is None:
            last_step_size = 0.0
        t0, t1 = self.transport.interval(
            eval=True, sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size
        )
        tr, path = self.transport, self.path

        def diffusion(x, t):
            return path.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)

        def _sample(x, model_fn, **model_kwargs):
            def sde_drift(state, t):
                velocity, score = tr.drift_and_score(state, t, model_fn, **model_kwargs)  # one model call
                return velocity + diffusion(state, t) * score

            ts = torch.linspace(t0, t1, num_steps, device=x.device)
            with torch.no_grad():
                xs = sde_integrate(sde_drift, diffusion, x, ts, sampling_method, noise_fn, keep=keep_trajectory)
                last = xs[-1]
                tt = torch.full((x.shape[0],), t1, device=x.device, dtype=x.dtype)
                if last_step == "Mean":
                    last = last + sde_drift(last, tt) * last_step_size
                elif last_step == "Euler":
                    last = last + tr.drift(last, tt, model_fn, **model_kwargs) * last_step_size
                elif last_step == "Tweedie":
                    a = path.alpha(tt)[0]
                    s = path.sigma(tt)[0]
                    last = last / a + s**2 / a * tr.score(last, tt, model_fn, **model_kwargs)
                if not keep_trajectory:
                    return [last]
                xs.append(last)
            return xs

        return _sample

    # -- likelihood -------------------------------------------------------------------------------------
    def sample_ode_likelihood(
        self,
        *,
        sampling_method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
    ) -> Callable:
        """log p(x) of data x by the probability-flow ODE from data (t1) to noise (t0), with a Hutchinson
        (Rademacher) estimate of the divergence: log p_1(x) = log N(x_0; 0, I) - integral_0^1 div v dt.

        Returns:
            fn(x, model_fn, **model_kwargs) -> (logp (B,) in nats, x at t0 (B, ...)).
        """
        _check_ode_method(sampling_method, num_steps)
        if sampling_method in ("ab2", "ab3"):
            raise ConfigError(
                f"the likelihood integrates with euler, heun2 or a torchdiffeq method, not {sampling_method}"
            )
        t0, t1 = self.transport.interval(eval=True)
        tr = self.transport

        def _sample(x, model_fn, **model_kwargs):
            def field(state, t):
                xs, _ = state
                eps = torch.randint(2, xs.shape, device=xs.device).to(xs.dtype) * 2 - 1
                with torch.enable_grad():
                    xs = xs.detach().requires_grad_(True)
                    v = tr.drift(xs, t, model_fn, **model_kwargs)
                    grad = torch.autograd.grad((v * eps).sum(), xs)[0]
                div = (grad * eps).flatten(1).sum(1)
                return v.detach(), div.detach()

            ts = torch.linspace(t1, t0, num_steps, device=x.device)
            state = (x, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))
            if sampling_method in ("euler", "heun2"):
                # Fixed-step integration of the augmented state (x, integral of div v).
                xs, acc = state
                for i in range(num_steps - 1):
                    t, dt = ts[i], ts[i + 1] - ts[i]
                    tv = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
                    v1, d1 = field((xs, acc), tv)
                    if sampling_method == "euler":
                        xs, acc = xs + dt * v1, acc + dt * d1
                    else:
                        tv2 = torch.full_like(tv, float(ts[i + 1]))
                        v2, d2 = field((xs + dt * v1, acc + dt * d1), tv2)
                        xs, acc = xs + dt * 0.5 * (v1 + v2), acc + dt * 0.5 * (d1 + d2)
                z, delta = xs, acc
            else:
                vp = tr.path_type == "VP"
                traj, deltas = ode_torchdiffeq(field, state, ts, sampling_method, atol, rtol, stop_at_end=vp)
                z, delta = traj[-1], deltas[-1]
            # delta = integral from t1 down to t0 of div v = -(integral_t0^t1 div v dt)
            return tr.prior_logp(z) + delta, z

        return _sample
