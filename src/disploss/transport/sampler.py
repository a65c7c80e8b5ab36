"""Samplers: each `Sampler.sample_*` returns fn(x, model_fn, **model_kwargs), as the reference does.

`sample_ode` returns the states on its time grid (callers take [-1]); `sample_sde` returns the list of
states after each step plus the last step; `sample_ode_likelihood` returns (log p(x), x at t0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.errors import ConfigError
from disploss.transport.integrators import default_noise, ode_fixed, ode_torchdiffeq, sde_integrate
from disploss.transport.paths import DIFFUSION_FORMS
from disploss.transport.transport import Transport

ODE_FIXED_METHODS = ("euler", "heun2")
TORCHDIFFEQ_METHODS = (
    "dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3", "rk4",
    "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver",
)  # fmt: skip
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


def _check_ode_method(sampling_method: str, num_steps: int) -> None:
    if sampling_method not in TORCHDIFFEQ_METHODS:
        raise ConfigError(
            f"unknown ODE sampling method {sampling_method!r}; valid choices: {', '.join(TORCHDIFFEQ_METHODS)}"
        )
    if num_steps < 2:
        raise ConfigError(f"num_steps must be at least 2, got {num_steps}")


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
    ) -> Callable:
        """Probability-flow ODE from noise (t0) to data (t1), or data to noise with reverse=True.

        Args:
            sampling_method: 'euler' and 'heun2' run our fixed-step integrator (exactly (num_steps - 1) or
                2 (num_steps - 1) model calls); any other torchdiffeq method goes to torchdiffeq.
            num_steps: points of the time grid linspace(t0, t1, num_steps); it bounds the calls of the
                fixed-step methods only.
            keep_trajectory: False returns only the final state (as a 1-element stack): less memory.
        Returns:
            fn(x, model_fn, **model_kwargs) -> tensor (num_steps, B, ...) of the states on the grid.
        """
        _check_ode_method(sampling_method, num_steps)
        t0, t1 = self.transport.interval(eval=True)
        if reverse:
            t0, t1 = t1, t0  # integrate the same field backwards in time: data -> noise

        def _sample(x, model_fn, **model_kwargs):
            ts = torch.linspace(t0, t1, num_steps, device=x.device)

            def field(state, t):
                return self.transport.drift(state, t, model_fn, **model_kwargs)

            with torch.no_grad():
                if sampling_method in ODE_FIXED_METHODS:
                    return torch.stack(ode_fixed(field, x, ts, sampling_method, keep=keep_trajectory))
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
            if sampling_method in ODE_FIXED_METHODS:
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
