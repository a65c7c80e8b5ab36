"""What a step will cost, said before the first one: the tokens per image, the model FLOPs of a step and the time
per step this device should take, with a warning that names the flags to change when one step would take minutes.

Model FLOPs follow BENCHMARKS.md's convention (disploss.models.forward_flops gives the multiply-accumulates of one
forward pass of one image): a training step costs 3 x 2 x MACs per image (forward, and a backward of twice the
forward), 4 x 2 x MACs with --grad-checkpointing (the forward once more); MeanFlow adds its JVP pass on the share
of the batch with r != t (a forward on dual tensors: about two forwards) and the guidance passes without gradient.
The time is those FLOPs over what the device does in plain matmuls (disploss.runtime.matmul_flops_per_second), an
optimistic estimate: attention at long sequences, small layers and the optimizer run slower than a large matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOW_STEP_S = 60.0  # an estimated step above this warns before the first one


@dataclass(frozen=True)
class StepCost:
    """tokens: per image; flops: model FLOPs of one optimizer step of one process; seconds: the estimated time of
    that step on this device; flops_per_second: what the device did in matmuls."""

    tokens: int
    flops: float
    seconds: float
    flops_per_second: float


def step_flops(model_config: dict, local_batch: int, cfg) -> float:
    """Model FLOPs of one optimizer step of one process (all its micro-batches).

    Args:
        model_config: SiT.config() (input size, patch, width, depth, ...).
        local_batch: images per process and step (--grad-accum-steps micro-batches together).
        cfg: the TrainConfig (--grad-checkpointing, --objective and MeanFlow's settings).
    """
    from disploss.models import forward_flops

    macs = forward_flops(model_config)
    passes = 8.0 if cfg.grad_checkpointing else 6.0  # FLOPs per MAC of a training pass
    if cfg.objective == "meanflow":
        mf = cfg.meanflow
        passes += 2 * 2.0 * mf.ratio  # the JVP on the rows with r != t: primal and tangent
        if mf.guided:
            passes += 2.0 * (2 if mf.kappa else 1)  # u(z, t, t | null) (and | y), one batched call
    return passes * macs * local_batch


def estimate(model_config: dict, local_batch: int, cfg, device: torch.device) -> StepCost:
    """Tokens, FLOPs and the estimated time of one step on `device` (about 0.05 s of matmuls to measure it)."""
    from disploss.runtime import matmul_flops_per_second

    tokens = (model_config["input_size"] // model_config["patch_size"]) ** 2
    flops = step_flops(model_config, local_batch, cfg)
    speed = matmul_flops_per_second(device, cfg.precision)
    return StepCost(tokens, flops, flops / speed, speed)


def cost_line(cost: StepCost, cfg, model_config: dict, local_batch: int, device: torch.device) -> str:
    """The run's first line about its cost, e.g. 'SiT-T/2 sees 16 tokens per image (8x8 input, patch 2); ...'."""
    side, patch = model_config["input_size"], model_config["patch_size"]
    split = f"{cfg.grad_accum_steps} x {local_batch // cfg.grad_accum_steps}" if cfg.grad_accum_steps > 1 else ""
    return (
        f"{cfg.model} sees {cost.tokens:,} tokens per image ({side}x{side} input, patch {patch}); a step is "
        f"{_flops(cost.flops)} of model FLOPs per process (batch {local_batch}{f' = {split}' if split else ''}); "
        f"estimated {format_seconds(cost.seconds)} per step on this {_device_name(device)} (it does "
        f"{cost.flops_per_second / 1e9:,.0f} GFLOP/s in matmuls; the estimate is optimistic)"
    )


def slow_step_warning(cost: StepCost, cfg, device: torch.device) -> str | None:
    """The warning of a step estimated above SLOW_STEP_S, naming the flags that make it cheaper; else None."""
    if cost.seconds <= SLOW_STEP_S:
        return None
    fixes = [f"a smaller --image-size (tokens grow with its square: --image-size {cfg.image_size // 2} has "
             f"{max(cost.tokens // 4, 1):,})"]  # fmt: skip
    if cfg.vae == "none" and cfg.latents is None:
        fixes.append("--vae ema or mse instead of --vae none (latents 8x smaller per side: 64x fewer tokens)")
    fixes.append("a larger patch or a smaller model (--model SiT-T/4: 4x fewer tokens than SiT-T/2)")
    fixes.append("a smaller --global-batch-size")
    return (
        f"one training step is estimated at {format_seconds(cost.seconds)} on this {_device_name(device)} "
        f"({cost.tokens:,} tokens per image); Ctrl-C is honoured only between operations, and one attention op of "
        f"that size can hold the process for minutes. Make it cheaper with {'; '.join(fixes)}"
    )


def format_seconds(seconds: float) -> str:
    """0.12 s, 45 s, 12 min, 3.7 h."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _flops(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def _device_name(device: torch.device) -> str:
    return "GPU" if device.type == "cuda" else "CPU"
