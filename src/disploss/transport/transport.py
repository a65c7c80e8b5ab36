"""The Transport: a path plus a prediction type, with the flow-matching (or score / noise) loss and the drift /
score fields that the samplers integrate. Terms added to the loss (the dispersive one) are the training
objective's business (disploss.training.objective), not the transport's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.errors import ConfigError
from disploss.transport.paths import PATH_TYPES, expand_t_like_x, make_path

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
# Where the SDE coefficients are singular (SBDM at t = 0 where alpha = 0; the score at t = 1 where sigma = 0)
# and the resolved eps is 0, SDE sampling stays this far from the end point (the reference gave NaN there).
SDE_SAFE_EPS = 1e-3


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=list(range(1, x.dim())))


def _choice(value, choices, what: str):
    if value not in choices:
        shown = ", ".join("None" if c is None else str(c) for c in choices)
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {shown}")
    return value


class Transport:
    """A stochastic interpolant with a model parametrisation.

    Args:
        path_type: 'Linear' | 'GVP' | 'VP'.
        prediction: what the model predicts: 'velocity' | 'score' | 'noise'.
        loss_weight: None | 'velocity' | 'likelihood' (weights the score / noise losses only).
        train_eps, sample_eps: distance kept from the singular ends of [0, 1]; None picks the reference's
            defaults (0 for velocity on Linear/GVP, 1e-3 for score/noise, VP: 1e-5 / 1e-3). A given value is
            honoured (the reference overwrote it for velocity models).
    """

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
        _choice(path_type, PATH_TYPES, "path type")
        _choice(prediction, PREDICTIONS, "prediction")
        _choice(loss_weight, LOSS_WEIGHTS, "loss weight")
        self.path_type = path_type
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.path = make_path(path_type)
        if path_type == "VP":
            default_train, default_sample = 1e-5, 1e-3
        elif prediction != "velocity":
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if train_eps is None else float(train_eps)
        self.sample_eps = default_sample if sample_eps is None else float(sample_eps)

    def __repr__(self) -> str:
        return (
            f"Transport(path_type={self.path_type!r}, prediction={self.prediction!r}, loss_weight={self.loss_weight!r}, "
            f"train_eps={self.train_eps}, sample_eps={self.sample_eps})"
        )

    # -- time interval ----------------------------------------------------------------------------------
    def interval(self, *, eval: bool, sde: bool = False, diffusion_form: str = "SBDM", last_step_size: float = 0.0):
        """(t0, t1) for training (eval=False) or sampling; the reference's check_interval with its bugs fixed."""
        t0, t1 = 0.0, 1.0
        eps = self.sample_eps if eval else self.train_eps
        if self.path_type == "VP":
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.prediction != "velocity" or sde:
            sbdm_sde = diffusion_form == "SBDM" and sde
            t0 = eps if (sbdm_sde or self.prediction != "velocity") else 0.0
            if sbdm_sde and t0 == 0:
                t0 = SDE_SAFE_EPS
            if not sde or last_step_size == 0:
                t1 = 1 - (eps if (eps > 0 or not sde) else SDE_SAFE_EPS)
            else:
                t1 = 1 - last_step_size
        if not t0 < t1:
            raise ConfigError(f"empty time interval [{t0}, {t1}]: check sample_eps / last_step_size")
        return t0, t1

    def sample_t(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """t ~ U[t0, t1] of shape (B,), drawn on the CPU generator (as the reference) and moved to `device`."""
        t0, t1 = self.interval(eval=False)
        return (torch.rand((batch_size,)) * (t1 - t0) + t0).to(device)

    # -- training objective -----------------------------------------------------------------------------
    def training_losses(
        self,
        model: Callable,
        x1: torch.Tensor,
        model_kwargs: dict | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The flow-matching (or score / noise) loss of one batch.

        Args:
            model: called as model(x_t, t, **model_kwargs).
            x1: (B, C, H, W) data (latents).
            t, noise: optional fixed t (B,) and x0 (B, C, H, W); drawn as the reference does otherwise.
        Returns:
            dict with 'loss' (B,) (float32: the mean over each sample's elements) and 'pred' (B, C, H, W).
        """
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x1)
        if t is None:
            t = self.sample_t(x1.shape[0], x1.device)
        t, xt, ut = self.path.plan(t, noise, x1)
        pred = model(xt, t, **model_kwargs)
        if pred.shape != xt.shape:
            raise ConfigError(f"model output shape {tuple(pred.shape)} does not match its input {tuple(xt.shape)}")
        return {"loss": self._flow_loss(pred.float(), xt, t, noise, ut), "pred": pred}

    def _flow_loss(self, pred, xt, t, x0, ut) -> torch.Tensor:
        if self.prediction == "velocity":
            return mean_flat((pred - ut) ** 2)
        _, drift_var = self.path.compute_drift(xt, t)
        sigma_t = self.path.sigma(expand_t_like_x(t, xt))
        if self.loss_weight == "velocity":
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_weight == "likelihood":
            weight = drift_var / sigma_t**2
        else:
            weight = 1.0
        if self.prediction == "noise":
            return mean_flat(weight * (pred - x0) ** 2)
        return mean_flat(weight * (pred * sigma_t + x0) ** 2)

    # -- fields for the samplers ------------------------------------------------------------------------
    def drift(self, x: torch.Tensor, t: torch.Tensor, model: Callable, **model_kwargs) -> torch.Tensor:
        """The probability-flow velocity v(x, t) from the model's prediction."""
        return self._velocity_of(self._predict(x, t, model, model_kwargs), x, t)

    def score(self, x: torch.Tensor, t: torch.Tensor, model: Callable, **model_kwargs) -> torch.Tensor:
        """The score grad log p_t(x) from the model's prediction."""
        return self._score_of(self._predict(x, t, model, model_kwargs), x, t)

    def drift_and_score(self, x: torch.Tensor, t: torch.Tensor, model: Callable, **model_kwargs):
        """(velocity, score) from ONE model call (the reference called the model once for each)."""
        out = self._predict(x, t, model, model_kwargs)
        score = self._score_of(out, x, t)
        return self._velocity_of(out, x, t, score), score

    @staticmethod
    def _predict(x, t, model: Callable, model_kwargs: dict) -> torch.Tensor:
        out = model(x, t, **model_kwargs)
        if out.shape != x.shape:
            raise ConfigError(f"model output shape {tuple(out.shape)} does not match its input {tuple(x.shape)}")
        return out

    def _score_of(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "velocity":
            return self.path.score_from_velocity(out, x, t)
        if self.prediction == "noise":
            return self.path.score_from_noise(out, x, t)
        return out

    def _velocity_of(self, out, x, t, score: torch.Tensor | None = None) -> torch.Tensor:
        if self.prediction == "velocity":
            return out
        return self.path.velocity_from_score(self._score_of(out, x, t) if score is None else score, x, t)

    @staticmethod
    def prior_logp(z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample: (B, ...) -> (B,)."""
        n = z[0].numel()
        return -n / 2.0 * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype)) - (z**2).flatten(1).sum(1) / 2.0


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """Build a Transport (the reference's entry point). 'None' as a string is accepted for loss_weight."""
    if loss_weight == "None":
        loss_weight = None
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)
