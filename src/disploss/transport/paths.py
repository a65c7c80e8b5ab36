"""Interpolation paths x_t = alpha_t x1 + sigma_t x0 and the conversions between velocity, score and noise.

Every function takes t of shape (B,) and broadcasts it against x (B, ...). Formulas: SiT (Ma et al. 2024),
section 2 and appendix; t = 0 noise, t = 1 data.
"""

from __future__ import annotations

import math

import torch

from disploss.errors import ConfigError

PATH_TYPES = ("Linear", "GVP", "VP")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with as many dims as x."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class _Path:
    """Base class: subclasses define alpha, sigma and their time derivatives."""

    name = "base"

    def alpha(self, t):
        raise NotImplementedError

    def d_alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def d_sigma(self, t):
        raise NotImplementedError

    # -- the interpolant ----------------------------------------------------------------------------------
    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """Return (t, x_t, u_t) for noise x0 and data x1 (both (B, ...)), t (B,)."""
        te = expand_t_like_x(t, x1)
        xt = self.alpha(te) * x1 + self.sigma(te) * x0
        ut = self.d_alpha(te) * x1 + self.d_sigma(te) * x0
        return t, xt, ut

    # -- the SDE with the path's marginals: dx = [-drift_mean + diffusion * score] dt (+ noise) -----------
    def compute_drift(self, x: torch.Tensor, t: torch.Tensor):
        """(-f(x, t), g(t)^2 / 2) of the SBDM-form SDE: f = (alpha'/alpha) x, g^2/2 = (alpha'/alpha) sigma^2 - sigma sigma'."""
        te = expand_t_like_x(t, x)
        ratio = self.d_alpha(te) / self.alpha(te)
        sigma = self.sigma(te)
        return -ratio * x, ratio * sigma**2 - sigma * self.d_sigma(te)

    def compute_diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str = "SBDM", norm: float = 1.0):
        """Diffusion coefficient w(t) of the sampling SDE, broadcastable against x.

        Forms: constant (norm), SBDM (norm * g^2/2), sigma (norm * sigma_t), linear (norm * (1 - t)),
        decreasing (0.25 (norm cos(pi t) + 1)^2), increasing-decreasing (norm sin(pi t)^2).
        """
        te = expand_t_like_x(t, x)
        if form == "constant":
            return torch.full_like(te, float(norm))
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.sigma(te)
        if form == "linear":
            return norm * (1 - te)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * te) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * te) ** 2
        raise ConfigError(f"unknown diffusion form {form!r}; valid choices: {', '.join(DIFFUSION_FORMS)}")

    # -- conversions (x, t) + one prediction -> another -------------------------------------------------
    def score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """score = (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma)."""
        te = expand_t_like_x(t, x)
        r = self.alpha(te) / self.d_alpha(te)
        sigma = self.sigma(te)
        var = sigma**2 - r * self.d_sigma(te) * sigma
        return (r * velocity - x) / var

    def noise_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (alpha/alpha' v - x) / (alpha/alpha' sigma' - sigma)."""
        te = expand_t_like_x(t, x)
        r = self.alpha(te) / self.d_alpha(te)
        return (r * velocity - x) / (r * self.d_sigma(te) - self.sigma(te))

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = g^2/2 * score - (-f): the probability-flow velocity."""
        drift_mean, var = self.compute_drift(x, t)
        return var * score - drift_mean

    def score_from_noise(self, noise: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """score = -x0 / sigma_t."""
        return noise / -self.sigma(expand_t_like_x(t, x))


class LinearPath(_Path):
    """alpha = t, sigma = 1 - t (rectified flow / flow matching)."""

    name = "Linear"

    def alpha(self, t):
        return t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return 1 - t

    def d_sigma(self, t):
        return -torch.ones_like(t)


class GVPPath(_Path):
    """Generalised variance preserving: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    name = "GVP"

    def alpha(self, t):
        return torch.sin(t * math.pi / 2)

    def d_alpha(self, t):
        return math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2)

    def d_sigma(self, t):
        return -math.pi / 2 * torch.sin(t * math.pi / 2)


class VPPath(_Path):
    """Variance preserving (score SDE): alpha = exp(m(t)), sigma = sqrt(1 - alpha^2),
    m(t) = -(1/4)(1-t)^2 (sigma_max - sigma_min) - (1/2)(1-t) sigma_min."""

    name = "VP"

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def _m(self, t):
        return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def _dm(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        return torch.exp(self._m(t))

    def d_alpha(self, t):
        return self.alpha(t) * self._dm(t)

    def sigma(self, t):
        return torch.sqrt(1 - torch.exp(2 * self._m(t)))

    def d_sigma(self, t):
        e = torch.exp(2 * self._m(t))
        return e * (2 * self._dm(t)) / (-2 * self.sigma(t))

    def compute_drift(self, x: torch.Tensor, t: torch.Tensor):
        """(-beta/2 x, beta/2) with beta = sigma_min + (1 - t)(sigma_max - sigma_min): the generic formula in
        closed form, as the reference writes it. It needs no sigma_t, so it stays finite for t > 1, where
        adaptive torchdiffeq solvers evaluate the field when their last step overshoots t1 (sigma_t is NaN
        there; through the generic formula the score ODE on VP with dopri5 failed with 'underflow in dt')."""
        beta = self.sigma_min + (1 - expand_t_like_x(t, x)) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta * x, beta / 2


def make_path(path_type: str) -> _Path:
    """'Linear' | 'GVP' | 'VP' -> path object (ValueError listing the choices otherwise)."""
    paths = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
    if path_type not in paths:
        raise ConfigError(f"unknown path type {path_type!r}; valid choices: {', '.join(PATH_TYPES)}")
    return paths[path_type]()
