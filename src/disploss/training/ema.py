"""Exponential moving average of model weights (decay 0.9999 each step in the reference)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """ema <- decay * ema + (1 - decay) * model, over every parameter (pos_embed included, as the reference).

    Args:
        model: the (unwrapped) model; the EMA starts as an exact copy of it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self._src = [p for _, p in sorted(model.named_parameters())]
        self._dst = [p for _, p in sorted(self.model.named_parameters())]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One EMA step (a single fused foreach lerp: ema += (1 - decay) (model - ema))."""
        torch._foreach_lerp_(self._dst, self._src, 1.0 - decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=True)
