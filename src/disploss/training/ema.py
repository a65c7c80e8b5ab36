"""Exponential moving average of model weights (decay 0.9999 each step in the reference), its optional warm-up,
and how much of the initial weights it still holds after a run.

    ema <- d_s * ema + (1 - d_s) * model after update s = 0, 1, ...
    d_s = decay                                    (the reference: a constant)
    d_s = min(decay, 1 - (1 + s)^-p)               (--ema-warmup-power p: k-diffusion's EMAWarmup, inv_gamma 1)

k-diffusion's notes on the warm-up: power 2/3 suits runs of a million steps or more (d reaches 0.999 at 31.6K
steps, 0.9999 at 1M), power 3/4 shorter ones (0.999 at 10K, 0.9999 at 215.4K).

The EMA averages about the last 1 / (1 - decay) steps (its horizon), and after N updates it still holds the
product of the d_s of the initial weights: decay^N without warm-up, 0 with it (d_0 = 0 copies the model).
"""

from __future__ import annotations

import copy
import math

import torch

INITIAL_SHARE_WARNING = 0.05  # the train loop warns when the EMA ends with more than this share of its start


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


def ema_decay_at(update: int, decay: float, warmup_power: float | None = None) -> float:
    """d_s of update `update` (0-based): `decay`, or with a warm-up power p, min(decay, 1 - (1 + s)^-p)."""
    if warmup_power is None:
        return decay
    return min(decay, 1.0 - (1.0 + update) ** -warmup_power)


def initial_share(steps: int, decay: float, warmup_power: float | None = None) -> float:
    """The share of the initial weights left in the EMA after `steps` updates: prod_s d_s (decay^steps without
    warm-up; 0 with one, whose first update copies the model)."""
    if warmup_power is not None and steps > 0:
        return 0.0
    return math.exp(steps * math.log(decay)) if decay > 0 else float(steps == 0)


def horizon_warning(steps: int, decay: float, warmup_power: float | None = None) -> str | None:
    """The run's warning when its EMA would still hold more than INITIAL_SHARE_WARNING of the initial weights at
    its last step (the grids, sample.py and sample_ddp.py draw from the EMA), naming the fixes; else None.

    Args:
        steps: the run's length in optimizer steps (--max-steps, else --epochs in steps).
        decay, warmup_power: --ema-decay, --ema-warmup-power.
    """
    share = initial_share(steps, decay, warmup_power)
    if share <= INITIAL_SHARE_WARNING:
        return None
    suggest = _round_up_1sig(3.0 / max(steps, 1))  # decay^N <= e^-3 = 0.05: N >= 3 horizons
    fix = f"--ema-decay {1 - suggest:.{_decimals(suggest)}f}" if suggest < 1 else "--ema-decay 0 (the EMA is the model)"
    return (
        f"--ema-decay {decay} averages about the last {1 / (1 - decay):,.0f} steps, but the run is {steps:,} step(s) "
        f"long: its EMA would still hold {100 * share:.0f}% of the initial weights at the end, and the sample grids, "
        f"sample.py and sample_ddp.py draw from the EMA; use {fix} (3 horizons or fewer per run), --ema-warmup-power "
        "0.75 (a warm-up), or --sample-weights model for the grids"
    )


def _round_up_1sig(x: float) -> float:
    # 0.0375 -> 0.04, 0.002 -> 0.002, 0.3 -> 0.3
    exponent = math.floor(math.log10(x))
    return math.ceil(x / 10**exponent) * 10**exponent


def _decimals(x: float) -> int:
    return max(0, -math.floor(math.log10(x)))
