"""Integrators as pure functions of a vector field: fixed-step ODE (Euler, Heun, Adams-Bashforth 2 and 3) on any
time grid, adaptive embedded Runge-Kutta with per-image step-size control, torchdiffeq's solvers, and SDE
(Euler-Maruyama, Heun). Each returns the states on its time grid.

A field is f(x, t) with x (B, ...) and t (B,); `ts` is the 1-D time grid, increasing or decreasing (t = 0 noise,
t = 1 data, as the whole package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from disploss.errors import ConfigError

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A field that also receives the rows of the full batch it is evaluated on (B,) int64: the per-image adaptive
# solver evaluates only the images still integrating, so the field must select their labels (and other inputs).
RowField = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

FIXED_METHODS = ("euler", "heun2", "ab2", "ab3")
TIME_SCHEDULES = ("uniform", "power")


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], device=x.device, dtype=x.dtype) * t


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, ..., 1) against x (B, ...)
    return v.reshape(-1, *([1] * (x.dim() - 1)))


# -- time grids ---------------------------------------------------------------------------------------------------
def time_grid(
    t0: float, t1: float, num_points: int, schedule: str = "uniform", rho: float = 1.5, device=None
) -> torch.Tensor:
    """The time grid of the fixed-step samplers, float32 (num_points,), from t0 to t1 (either direction).

    uniform: torch.linspace(t0, t1, n) (the reference's grid).
    power:   t_i = t0 + (t1 - t0) (1 - (1 - i / (n - 1))^rho): steps shrink towards t1 (for sampling, the data end)
             like (1 - u)^(rho - 1); rho = 1 is the uniform grid. EDM's schedule (Karras et al. 2022, eq. 5) is this
             map in sigma = 1 - t of the Linear path with sigma_min = 0 (their rho = 7 is for sigma up to 80).
    """
    if schedule not in TIME_SCHEDULES:
        raise ConfigError(f"unknown time schedule {schedule!r}; valid choices: {', '.join(TIME_SCHEDULES)}")
    if not rho >= 1.0:
        raise ConfigError(f"the power schedule's rho must be >= 1 (1: uniform), got {rho}")
    if schedule == "uniform" or rho == 1.0:
        return torch.linspace(t0, t1, num_points, device=device)
    u = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    ts = t0 + (t1 - t0) * (1.0 - (1.0 - u) ** rho)
    ts[-1] = t1  # exact end point
    return ts.to(device=device, dtype=torch.float32)


# -- fixed steps --------------------------------------------------------------------------------------------------
def adams_bashforth_weights(nodes: list[float], a: float, b: float) -> list[float]:
    """Weights w_j with  integral_a^b p(t) dt = sum_j w_j f_j  for the polynomial p through (nodes_j, f_j).

    The variable-step Adams-Bashforth step is x(b) = x(a) + sum_j w_j f(x(nodes_j), nodes_j) (Hairer, Norsett,
    Wanner, Solving ODEs I, sec. III.1: integrate the Lagrange interpolant of the past field values). On a uniform
    grid the weights are h (3/2, -1/2) and h (5/12, -16/12, 23/12) for nodes oldest first.
    """
    import numpy as np

    h = b - a
    s = [(n - a) / h for n in nodes]  # nodes in units of the step, the new point at 1
    weights = []
    for j, sj in enumerate(s):
        basis = np.polynomial.Polynomial([1.0])
        for m, sm in enumerate(s):
            if m != j:
                basis = basis * np.polynomial.Polynomial([-sm, 1.0]) / (sj - sm)
        antiderivative = basis.integ()
        weights.append(h * float(antiderivative(1.0) - antiderivative(0.0)))
    return weights


def ode_fixed(
    f: Field, x: torch.Tensor, ts: torch.Tensor, method: str = "euler", keep: bool = True
) -> list[torch.Tensor]:
    """Fixed-step integration on the grid `ts` with an exact count of field evaluations (NFE).

    euler: 1 evaluation a step, order 1. heun2: explicit trapezoid, 2 a step, order 2 (the same steps as
    torchdiffeq's 'euler' and 'heun2'). ab2: Adams-Bashforth 2 on any grid, 1 evaluation a step (the first step is
    Euler), order 2. ab3: Adams-Bashforth 3, 1 evaluation a step after a first Heun step and a second AB2 step, order
    3. NFE: (n - 1) for euler and ab2, 2 (n - 1) for heun2, n for ab3, with n = len(ts).
    Returns [x(ts[0]), ..., x(ts[-1])] (only the last when keep=False).
    """
    if method not in FIXED_METHODS:
        raise ConfigError(f"unknown fixed-step method {method!r}; valid choices: {', '.join(FIXED_METHODS)}")
    history: list[tuple[float, torch.Tensor]] = []  # (t, f(x(t), t)) of the last points, oldest first
    depth = {"ab2": 2, "ab3": 3}.get(method, 0)
    states = [x] if keep else []
    for i in range(len(ts) - 1):
        t, dt = ts[i], ts[i + 1] - ts[i]
        k1 = f(x, _tvec(t, x))
        if method == "euler":
            x = x + dt * k1
        elif method == "heun2" or (method == "ab3" and i == 0):
            k2 = f(x + dt * k1, _tvec(ts[i + 1], x))
            x = x + dt * 0.5 * (k1 + k2)
            if method == "ab3":
                history.append((float(t), k1))
        else:
            history = [*history, (float(t), k1)][-depth:]
            weights = adams_bashforth_weights([s for s, _ in history], float(t), float(ts[i + 1]))
            x = x + sum(w * k for w, (_, k) in zip(weights, history))
        if keep:
            states.append(x)
    return states if keep else [x]


# -- adaptive steps, one step size per image ------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddedTableau:
    """An explicit Runge-Kutta pair: stage nodes c and rows a (stages 2..s), solution weights b, error weights
    e = b - b_hat (over the s stages plus, for FSAL pairs, the derivative at the new point), and weights `mid` of the
    state at the middle of the step (dense output); `order` sets the step-size exponent 1 / order."""

    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...]
    mid: tuple[float, ...]

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is evaluated at the new solution (its value is f at the new point)."""
        return self.c[-1] == 1.0 and tuple(self.a[-1]) == tuple(self.b[: len(self.a[-1])]) and self.b[-1] == 0.0


_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
# Shampine's 4th-order companion (Shampine 1986, "Some practical Runge-Kutta formulas"), as torchdiffeq's dopri5.
_DP_B_HAT = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
TABLEAUS = {
    # Dormand & Prince 1980, 5(4), FSAL: 6 evaluations a step.
    "dopri5": EmbeddedTableau(
        order=5,
        c=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DP_B[:6],
        ),
        b=_DP_B,
        e=tuple(p - q for p, q in zip(_DP_B, _DP_B_HAT)),
        # Shampine's dense output at theta = 1/2 (Hairer's DOPRI5 contd5 coefficients, halved), as torchdiffeq.
        mid=(
            6025192743 / 30085553152 / 2,
            0.0,
            51252292925 / 65400821598 / 2,
            -2691868925 / 45128329728 / 2,
            187940372067 / 1594534317056 / 2,
            -1776094331 / 19743644256 / 2,
            11237099 / 235043384 / 2,
        ),
    ),  # fmt: skip
    # Bogacki & Shampine 1989, 3(2), FSAL: 3 evaluations a step.
    "bosh3": EmbeddedTableau(
        order=3,
        c=(1 / 2, 3 / 4, 1.0),
        a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        b=(2 / 9, 1 / 3, 4 / 9, 0.0),
        e=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        mid=(0.0, 0.5, 0.0, 0.0),
    ),  # fmt: skip
    # Fehlberg 1969, 2(1): 2 evaluations a step.
    "fehlberg2": EmbeddedTableau(
        order=2,
        c=(1 / 2, 1.0),
        a=((1 / 2,), (1 / 256, 255 / 256)),
        b=(1 / 512, 255 / 256, 1 / 512),
        e=(-1 / 512, 0.0, 1 / 512),
        mid=(0.0, 0.5, 0.0),
    ),  # fmt: skip
    # Heun with an Euler error estimate, 2(1): 1 evaluation a step.
    "adaptive_heun": EmbeddedTableau(order=2, c=(1.0,), a=((1.0,),), b=(0.5, 0.5), e=(0.5, -0.5), mid=(0.5, 0.0)),
}
ADAPTIVE_METHODS = tuple(TABLEAUS)
# Step-size control of torchdiffeq's RK solvers (Hairer, Norsett, Wanner, sec. II.4): safety, growth and shrink bounds.
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.pow(2).flatten(1).mean(1).sqrt()  # (B, ...) -> (B,)


def _tie(v: torch.Tensor, reduce) -> torch.Tensor:
    # Rows i and i + n/2 are one image (the classifier-free guidance batch [x; x]): give both the reduced value.
    half = v.shape[0] // 2
    both = reduce(v[:half], v[half:])
    return torch.cat([both, both])


def ode_adaptive_per_image(
    f: RowField,
    x: torch.Tensor,
    ts: torch.Tensor,
    method: str = "dopri5",
    atol: float = 1e-6,
    rtol: float = 1e-3,
    tie_halves: bool = False,
    keep: bool = True,
    stats: dict | None = None,
) -> torch.Tensor:
    """Adaptive embedded Runge-Kutta in which every image has its own time, step size and accept / reject.

    Each image follows exactly the steps that torchdiffeq's solver of the same name takes for that image alone (the
    same pair, initial step selection, error norm and controller, with the last step landing on ts[-1] as with
    torchdiffeq's step_t = [ts[-1]]), so its result does not depend on its batch-mates; torchdiffeq's own solvers
    take one step size for the whole batch from the RMS error over all of it. The batch evaluates only the images
    still integrating, so the field receives their rows.

    Args:
        f: field(x_rows, t_rows (n,), rows (n,) int64) for the images `rows` of the batch.
        x: (B, ...) initial states at ts[0].
        ts: output times (increasing or decreasing); they do not change the steps.
        method: one of ADAPTIVE_METHODS.
        atol, rtol: tolerances of the per-image RMS error norm.
        tie_halves: the batch is [x; x] of classifier-free guidance (rows i and i + B/2 are one image): both rows
            take the larger error and the smaller step, so they stay one image.
        keep: return the states at every ts (intermediate ones by the quartic dense output of their step, as
            torchdiffeq's); else only the last.
        stats: if given, receives 'nfe' (B,) int64, the field evaluations of each image, and 'steps' (B,), the
            accepted steps.
    Returns:
        (len(ts), B, ...) states, or (1, B, ...) with keep=False.
    """
    if method not in TABLEAUS:
        raise ConfigError(f"unknown adaptive method {method!r}; valid choices: {', '.join(ADAPTIVE_METHODS)}")
    tab = TABLEAUS[method]
    B, device = x.shape[0], x.device
    if tie_halves and B % 2:
        raise ConfigError(f"tie_halves needs the doubled guidance batch [x; x], got an odd batch of {B}")
    sign = 1.0 if float(ts[-1]) >= float(ts[0]) else -1.0
    s_out = sign * ts.to(device=device, dtype=torch.float64)  # times in the integration direction: increasing
    s_end = s_out[-1]

    def field(y, s, rows):
        v = f(y, (sign * s).to(y.dtype), rows)
        return v if sign > 0 else -v

    rows = torch.arange(B, device=device)
    s = s_out[0].repeat(B)  # (B,) float64
    y = x.clone()
    fy = field(y, s, rows)  # f at (s, y): the first stage of the next step
    h = _initial_step(field, y, fy, s, rows, atol, rtol, tab.order)
    if tie_halves:
        h = _tie(h, torch.minimum)
    nfe = torch.full((B,), 2, dtype=torch.int64, device=device)
    steps = torch.zeros(B, dtype=torch.int64, device=device)
    out = torch.empty(len(ts) if keep else 1, *x.shape, dtype=x.dtype, device=device)
    out[0] = x
    active = rows
    while active.numel():
        y0, f0, s0, h0 = y[active], fy[active], s[active], h[active]
        s1 = torch.where(s0 + h0 >= s_end, s_end, s0 + h0)  # the last step lands on the end
        dt = s1 - s0
        if not bool((dt > 0).all()):
            raise FloatingPointError(f"{method}: step size underflow at t = {float(s0[dt <= 0][0]):.6g}")
        dtx = _bcast(dt.to(x.dtype), y0)
        k = [f0]
        for ci, row in zip(tab.c, tab.a):
            yi = y0 + dtx * sum(w * kj for w, kj in zip(row, k) if w != 0.0)
            k.append(field(yi, s1 if ci == 1.0 else s0 + ci * dt, active))
        y1 = yi if tab.fsal else y0 + dtx * sum(w * kj for w, kj in zip(tab.b, k) if w != 0.0)
        err = dtx * sum(w * kj for w, kj in zip(tab.e, k) if w != 0.0)
        ratio = _rms(err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))).to(torch.float64)
        if tie_halves:
            ratio = _tie(ratio, torch.maximum)
        nfe[active] += len(tab.c)
        accept = ratio <= 1
        h[active] = _next_step(dt, ratio, tab.order)
        if not bool(torch.isfinite(y1[accept]).all()):
            raise FloatingPointError(f"{method}: non-finite state")
        done = accept & (s1 >= s_end)
        if keep:
            ymid = y0 + dtx * sum(w * kj for w, kj in zip(tab.mid, k) if w != 0.0)
            _fill_grid(out, s_out, active[accept], s0[accept], s1[accept], y0[accept], y1[accept], ymid[accept],
                       f0[accept], k[-1][accept])  # fmt: skip
        else:
            out[0, active[done]] = y1[done]
        moved = active[accept]
        y[moved], fy[moved], s[moved] = y1[accept], k[-1][accept], s1[accept]
        steps[moved] += 1
        active = active[~done]
    if stats is not None:
        stats["nfe"], stats["steps"] = nfe, steps
    return out


def _initial_step(field, y0, f0, s0, rows, atol, rtol, order) -> torch.Tensor:
    # Hairer, Norsett, Wanner sec. II.4 (as torchdiffeq's _select_initial_step, per image): (B,) float64. 1 evaluation.
    scale = atol + y0.abs() * rtol
    d0, d1 = _rms(y0 / scale).double(), _rms(f0 / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = field(y0 + _bcast(h0.to(y0.dtype), y0) * f0, s0 + h0, rows)
    d2 = _rms((f1 - f0) / scale).double() / h0
    small = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(small, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1.0 / order))
    return torch.minimum(100 * h0, h1)


def _next_step(dt: torch.Tensor, ratio: torch.Tensor, order: int) -> torch.Tensor:
    # The controller of torchdiffeq's _optimal_step_size, per image: after an accepted step the step never shrinks.
    dfactor = torch.where(ratio < 1, torch.ones_like(ratio), torch.full_like(ratio, _DFACTOR))
    factor = torch.clamp(torch.maximum(_SAFETY / ratio ** (1.0 / order), dfactor), max=_IFACTOR)
    return dt * torch.where(ratio == 0, torch.full_like(ratio, _IFACTOR), factor)


def _fill_grid(out, s_out, rows, s0, s1, y0, y1, ymid, f0, f1) -> None:
    # Output times in (s0, s1] of each accepted step from the quartic p(theta), theta = (s - s0) / (s1 - s0), with
    # p(0) = y0, p(1) = y1, p(1/2) = ymid, p'(0) = dt f0, p'(1) = dt f1 (the dense output of torchdiffeq's RK solvers).
    if not rows.numel():
        return
    first = int(torch.searchsorted(s_out, s0.min(), right=True))
    last = int(torch.searchsorted(s_out, s1.max(), right=True))
    dt = s1 - s0
    d = _bcast(dt.to(y0.dtype), y0)
    c4 = 2 * d * (f1 - f0) - 8 * (y1 + y0) + 16 * ymid
    c3 = d * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * ymid
    c2 = d * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * ymid
    c1 = d * f0
    for j in range(max(first, 1), last):
        inside = (s0 < s_out[j]) & (s_out[j] <= s1)
        if not bool(inside.any()):
            continue
        th = _bcast(((s_out[j] - s0[inside]) / dt[inside]).to(y0.dtype), y0)
        out[j, rows[inside]] = y0[inside] + th * (c1[inside] + th * (c2[inside] + th * (c3[inside] + th * c4[inside])))


def ode_torchdiffeq(f, x, ts: torch.Tensor, method: str, atol: float, rtol: float, stop_at_end: bool = False):
    """Any torchdiffeq method. x may be a tuple of tensors (likelihood).

    For adaptive methods the grid does not bound the number of field evaluations, and one step size serves the whole
    batch (from the RMS error over all of it): an image's result depends on its batch-mates
    (ode_adaptive_per_image does not). Their last step normally
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
    tols = dict(atol=[atol] * n, rtol=[rtol] * n) if n > 1 else dict(atol=atol, rtol=rtol)  # scipy_solver: scalars
    return odeint(_fn, x, ts, method=method, options=options, **tols)


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
