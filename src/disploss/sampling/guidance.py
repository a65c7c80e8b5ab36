"""Classifier-free guidance as the samplers see it: the model function and the doubled batch [x; x] with labels
[y; null] (the reference's layout)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.errors import ConfigError


def check_guidance(model: torch.nn.Module, guide_channels: int | None) -> None:
    """--guide-channels must not exceed the model's output channels (ValueError naming the valid values)."""
    if guide_channels is not None and guide_channels > model.in_channels:
        raise ConfigError(
            f"--guide-channels {guide_channels} exceeds the model's {model.in_channels} output channels; "
            f"valid values: 1..{model.in_channels} or all"
        )


def guided_model_fn(
    model: torch.nn.Module, cfg_scale: float, guide_channels: int | None, bf16: bool = False, compile: bool = False
) -> tuple[Callable, bool]:
    """The function the solver calls, and whether it expects the doubled batch [x; x] with labels [y; null].

    cfg_scale > 1: model.forward_with_cfg (the reference's layout); cfg_scale == 1: plain model.forward on
    the undoubled batch (uncond + 1 * (cond - uncond) = cond: the same field for half the cost).

    Args:
        bf16: run the model under bfloat16 autocast, returning float32 to the solver.
        compile: torch.compile the function (guidance and autocast included); shapes that change (the shrinking
            batch of the per-image adaptive solvers) are compiled as dynamic after the first recompile.
    Returns:
        (fn(x, t, y, **kwargs) -> field, doubled); kwargs reach the model (a MeanFlow SiT's r).
    """
    doubled = cfg_scale > 1.0
    if doubled:

        def fn(x, t, y, **kwargs):
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_channels=guide_channels, **kwargs)
    else:

        def fn(x, t, y, **kwargs):
            return model(x, t, y, **kwargs)

    if bf16:
        plain = fn

        def fn(x, t, y, **kwargs):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return plain(x, t, y, **kwargs).float()

    return (torch.compile(fn) if compile else fn), doubled


def cfg_batch(z: torch.Tensor, y: torch.Tensor, null_class: int, doubled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) as the solver sees them: [z; z] and [y; null] when doubled. z (B, C, h, w), y (B,)."""
    if not doubled:
        return z, y
    return torch.cat([z, z], 0), torch.cat([y, torch.full_like(y, null_class)], 0)  # (2B, C, h, w), (2B,)


def as_doubled_noise(x: torch.Tensor) -> torch.Tensor:
    # SDE increments for an undoubled batch, drawn as the doubled one would be (first half kept), so that
    # --cfg-scale 1 consumes the global CPU generator exactly as the reference's always-doubled batch does.
    from disploss.transport.integrators import default_noise

    return default_noise(torch.cat([x, x], 0))[: x.shape[0]]
