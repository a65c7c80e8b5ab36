"""Integrators as pure functions of a vector field: fixed-step ODE (Euler, Heun), adaptive ODE through
torchdiffeq, and SDE (Euler-Maruyama, Heun). Each returns the states on its time grid.

A field is f(x, t) with x (B, ...) and t (B,); `ts` is the 1-D time grid, increasing or decreasing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.errors import ConfigError

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * t


def ode_fixed(
    f: Field, x: torch.Tensor, ts: torch.Tensor, method: str = "euler", keep: bool = True
) -> list[torch.Tensor]:
    """Euler (1 evaluation a step) or Heun (explicit trapezoid, 2 a step) on the grid `ts`.

    The same steps as torchdiffeq's 'euler' and 'heun2', with an exact count of field evaluations:
    (len(ts) - 1) * (1 or 2). Returns [x(ts[0]), ..., x(ts[-1])] (only the last when keep=False).
    """
    states = [x] if keep else []
    for i in range(len(ts) - 1):
        t, dt = ts[i], ts[i + 1] - ts[i]
        k1 = f(x, _tvec(t, x))
        if method == "euler":
            x = x + dt * k1
        elif method == "heun2":
            k2 = f(x + dt * k1, _tvec(ts[i + 1], x))
            x = x + dt * 0.5 * (k1 + k2)
        else:
            raise ConfigError(f"unknown fixed-step method {method!r}; valid choices: euler, heun2")
        if keep:
            states.append(x)
    return states if keep else [x]


def ode_torchdiffeq(f, x, ts: torch.Tensor, method: str, atol: float, rtol: float, stop_at_end: bool = False):
    """Any torchdiffeq method (dopri5 by default in the Sampler). x may be a tuple of tensors (likelihood).

    For adaptive methods the grid does not bound the number of field evaluations. Their last step normally
    overshoots ts[-1] (the solver then interpolates back), evaluating the field past the end of the grid;
    stop_at_end=True makes the last step land on ts[-1] exactly, for fields undefined beyond it.
    """
    from torchdiffeq import odeint

    first = x[0] if isinstance(x, tuple) else x

    def _fn(t, state):
        return f(state, _tvec(t, first))

    n = len(x) if isinstance(x, tuple) else 1
    adaptive = method in ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
    options = {"step_t": ts[-1:]} if (stop_at_end and adaptive) else None
    return odeint(_fn, x, ts, method=method, atol=[atol] * n, rtol=[rtol] * n, options=options)


def default_noise(x: torch.Tensor) -> torch.Tensor:
    """The reference's SDE noise: drawn on the CPU generator, then moved to x's device and dtype."""
    return torch.randn(x.size()).to(x)


def sde_integrate(
    drift: Field,
    diffusion: Field,
    x: torch.Tensor,
    ts: torch.Tensor,
    method: str = "Euler",
    noise_fn: Callable[[torch.Tensor], torch.Tensor] = default_noise,
    keep: bool = True,
) -> list[torch.Tensor]:
    """dx = drift dt + sqrt(2 diffusion) dW over ts[0] -> ts[-1], returning the state after each step.

    Euler: Euler-Maruyama. Heun: noise first (x_hat = x + sqrt(2 w) dW), then a Heun step of the drift
    from x_hat (the reference's stochastic Heun). Returns len(ts) - 1 states (only the last when keep=False).
    """
    dt = ts[1] - ts[0]
    samples = []
    for i in range(len(ts) - 1):
        t = _tvec(ts[i], x)
        dw = noise_fn(x) * torch.sqrt(dt)
        if method == "Euler":
            x = x + drift(x, t) * dt + torch.sqrt(2 * diffusion(x, t)) * dw
        elif method == "Heun":
            x_hat = x + torch.sqrt(2 * diffusion(x, t)) * dw
            k1 = drift(x_hat, t)
            k2 = drift(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)
        else:
            raise ConfigError(f"unknown SDE method {method!r}; valid choices: Euler, Heun")
        if keep:
            samples.append(x)
    return samples if keep else [x]
