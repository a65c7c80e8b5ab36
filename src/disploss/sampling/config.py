"""Typed settings of sampling, shared by `disploss sample` (a grid) and `disploss sample-ddp` (an .npz for FID).

- `SamplerConfig`: the MODE (ODE | SDE, a positional sub-command as in the reference: `sample.py ODE --model ...`;
  MeanFlow for models trained with `--objective meanflow`) and its own options; `sampler_fn` turns it into a sampling
  function.
- `ModelSpec`: which checkpoint, model, VAE and transport. Each field left None is taken from the checkpoint's
  stored training arguments (our checkpoints, and converted reference ones), else from its tensor shapes, else
  the reference default (disploss.sampling.load).
- `GuidanceConfig`: classifier-free guidance and the pixel conversion, the same for both commands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from disploss.errors import ConfigError
from disploss.imageio import PIXEL_CONVERSIONS
from disploss.options import at_least, check_options, option, positive
from disploss.runtime import DEVICES
from disploss.transport import (
    DIFFUSION_FORMS,
    LOSS_WEIGHTS,
    ODE_METHODS,
    PATH_TYPES,
    PER_IMAGE_METHODS,
    PREDICTIONS,
    SDE_METHODS,
    STEP_CONTROLS,
    TIME_SCHEDULES,
)
from disploss.transport import LAST_STEPS as TRANSPORT_LAST_STEPS

MODE_HELP = {
    "ODE": "sample with the probability-flow ODE",
    "SDE": "sample with the reverse-time SDE",
    "MeanFlow": "sample a MeanFlow model (train --objective meanflow) in --num-sampling-steps steps (default 1)",
}
MODES = ("ODE", "SDE", "MeanFlow")
FLOW_MODES = ("ODE", "SDE")  # modes of flow-matching models; MeanFlow models take MeanFlow
# The transport's last steps, None spelled 'None' as the reference's command line does.
LAST_STEPS = tuple("None" if step is None else step for step in TRANSPORT_LAST_STEPS)
REFERENCE_GUIDE_CHANNELS = 3

__all__ = [
    "FLOW_MODES",
    "GuidanceConfig",
    "LAST_STEPS",
    "MODES",
    "ModelSpec",
    "REFERENCE_GUIDE_CHANNELS",
    "SamplerConfig",
    "sampler_fn",
]


def parse_guide_channels(text: str) -> int | None:
    """--guide-channels: a positive int (3: the reference) or 'all' (-> None: the standard form)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{text!r}: valid values are a positive integer (3: the reference) or 'all'")
    return int(text)


def parse_class_labels(text: str) -> tuple[int, ...]:
    """--class-labels: comma-separated non-negative ints, e.g. '207,360,387'."""
    try:
        labels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of integers, e.g. 207,360") from None
    if not labels or min(labels) < 0:
        raise ConfigError(f"{text!r}: give at least one class label, each >= 0")
    return labels


def check_cfg_scale(value: float) -> str | None:
    """>= 1 (1 disables guidance; below 1 the reference refuses too) and finite (NaN and infinity are refused)."""
    if 1.0 <= value < math.inf:
        return None
    return f"must be >= 1.0 and finite (1 disables guidance; the published numbers use 1.5 or 4.0), got {value}"


@dataclass(frozen=True)
class SamplerConfig:
    """The sampling mode and its options (the reference's flags and defaults of each mode)."""

    mode: str = option("ODE", "ODE (probability flow, torchdiffeq), SDE (Euler-Maruyama / Heun) or MeanFlow (average "
                       "velocity, few steps)", choices=MODES, cli=False)  # the sub-command, not a flag  # fmt: skip
    num_sampling_steps: int = option(250, "points of the time grid (bounds the model calls of fixed-step methods only)",
                                     check=at_least(2), modes=FLOW_MODES)  # fmt: skip
    ode_method: str = option(
        "dopri5", f"one of {', '.join(ODE_METHODS)}. Fixed steps with exact model calls: euler (steps - 1), heun2 "
        "2 (steps - 1), ab2 (steps - 1), ab3 (steps); adaptive, each image its own steps: dopri5, bosh3, fehlberg2, "
        "adaptive_heun; the rest: torchdiffeq", choices=ODE_METHODS, flag="--sampling-method", metavar="METHOD",
        modes=("ODE",),
    )  # fmt: skip
    atol: float = option(1e-6, "absolute tolerance (adaptive methods)", check=positive, modes=("ODE",))
    rtol: float = option(1e-3, "relative tolerance (adaptive methods)", check=positive, modes=("ODE",))
    time_schedule: str = option(
        "uniform", "time grid of the fixed-step methods: uniform (the reference's) or power (steps shrinking towards "
        "the data end, see --time-rho)", choices=TIME_SCHEDULES, modes=("ODE",),
    )  # fmt: skip
    time_rho: float = option(1.5, "exponent of --time-schedule power (1: uniform)", check=at_least(1.0), modes=("ODE",))
    step_control: str = option(
        "per-image", "adaptive methods: per-image (each image's own error decides its steps: its result does not "
        "depend on its batch-mates, the batch size or the number of processes) or batch (torchdiffeq's and the "
        "reference's: one step size for the whole batch)", choices=STEP_CONTROLS, modes=("ODE",),
    )  # fmt: skip
    reverse: bool = option(False, "integrate from data to noise", modes=("ODE",))
    sde_method: str = option("Euler", "Euler-Maruyama or stochastic Heun", choices=SDE_METHODS,
                             flag="--sampling-method", modes=("SDE",))  # fmt: skip
    diffusion_form: str = option("sigma", "diffusion coefficient w(t) of the SDE", choices=DIFFUSION_FORMS,
                                 modes=("SDE",))  # fmt: skip
    diffusion_norm: float = option(1.0, "scale of w(t)", modes=("SDE",))
    last_step: str = option("Mean", "deterministic last step from 1 - last-step-size to 1", choices=LAST_STEPS,
                            modes=("SDE",))  # fmt: skip
    last_step_size: float = option(0.04, "size of the last step", check=positive, modes=("SDE",))
    meanflow_steps: int = option(
        1, "equal steps from noise to data, exactly one model call each (1: one-step generation)", check=at_least(1),
        flag="--num-sampling-steps", modes=("MeanFlow",),
    )  # fmt: skip

    def __post_init__(self):
        check_options(self)

    @property
    def method(self) -> str:
        """The sampling method of the mode."""
        return {"ODE": self.ode_method, "SDE": self.sde_method}.get(self.mode, "uniform")

    def settings(self) -> dict:
        """The mode's options as a plain dict (recorded in sample folders and compared on resume)."""
        steps = self.meanflow_steps if self.mode == "MeanFlow" else self.num_sampling_steps
        out = {"mode": self.mode, "sampling_method": self.method, "num_sampling_steps": steps}
        if self.mode == "MeanFlow":
            return out
        if self.mode == "ODE":
            out.update(atol=self.atol, rtol=self.rtol, reverse=self.reverse)
            if self.ode_method in PER_IMAGE_METHODS:
                out["step_control"] = self.step_control
            if self.time_schedule != "uniform":
                out.update(time_schedule=self.time_schedule, time_rho=self.time_rho)
        else:
            out.update(diffusion_form=self.diffusion_form, diffusion_norm=self.diffusion_norm,
                       last_step=self.last_step, last_step_size=self.last_step_size)  # fmt: skip
        return out


def sampler_fn(cfg: SamplerConfig, transport, noise_fn: Callable | None = None, doubled: bool = False) -> Callable:
    """The sampling function of the chosen mode: fn(x, model_fn, **model_kwargs), whose [-1] is the sample.

    Args:
        cfg: the mode and its options.
        transport: a disploss.transport.Transport.
        noise_fn: SDE only: draws the standard normals of the Brownian increments for a state x
            (default: the reference's, on the global CPU generator).
        doubled: x will be the guidance batch [x; x] (disploss.sampling.guidance.cfg_batch): per-image adaptive
            steps keep each image's two rows together.
    """
    from disploss.transport import Sampler
    from disploss.transport.integrators import default_noise

    if cfg.mode == "MeanFlow":  # x = eps + u(eps, r=1, t=0) in one step; N equal steps (disploss.meanflow)
        from disploss.meanflow import sample_meanflow

        return lambda x, model_fn, **model_kwargs: sample_meanflow(model_fn, x, cfg.meanflow_steps, **model_kwargs)
    sampler = Sampler(transport)
    if cfg.mode == "ODE":
        return sampler.sample_ode(
            sampling_method=cfg.ode_method, num_steps=cfg.num_sampling_steps, atol=cfg.atol, rtol=cfg.rtol,
            reverse=cfg.reverse, keep_trajectory=False, time_schedule=cfg.time_schedule, time_rho=cfg.time_rho,
            step_control=cfg.step_control, tied_halves=doubled,
        )  # fmt: skip
    return sampler.sample_sde(
        sampling_method=cfg.sde_method, diffusion_form=cfg.diffusion_form, diffusion_norm=cfg.diffusion_norm,
        last_step=None if cfg.last_step == "None" else cfg.last_step, last_step_size=cfg.last_step_size,
        num_steps=cfg.num_sampling_steps, noise_fn=noise_fn or default_noise, keep_trajectory=False,
    )  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """Which model to sample and how to decode it; None = the checkpoint's value (see the module docstring)."""

    ckpt: str | None = option(
        None, "SiT checkpoint: a released file (bare state dict or {'ema': ...}), one of our training checkpoints, or "
        "a .safetensors export. Without it the reference downloads SiT-XL-2-256x256.pt; here it is read from "
        "pretrained_models/ if present", metavar="PATH",
    )  # fmt: skip
    model: str | None = option(None, "model preset, e.g. SiT-XL/2 (default: from the checkpoint's stored arguments, "
                               "else from its tensor shapes)", metavar="NAME")  # fmt: skip
    vae: str | None = option(None, "ema | mse (stabilityai/sd-vae-ft-*) | a local AutoencoderKL folder | none (pixel "
                             "space) (default: the checkpoint's, else the command's)", metavar="SPEC")  # fmt: skip
    image_size: int | None = option(None, "image side in pixels (default: the checkpoint's, else its latent size "
                                    "times the VAE factor; released files: 256)", check=at_least(1), metavar="PX")  # fmt: skip
    num_classes: int | None = option(None, "number of classes (default: the checkpoint's; released files: 1000)",
                                     check=at_least(1), metavar="N")  # fmt: skip
    path_type: str | None = option(None, "default: the checkpoint's, else Linear", choices=(None, *PATH_TYPES))
    prediction: str | None = option(None, "default: the checkpoint's, else velocity", choices=(None, *PREDICTIONS))
    loss_weight: str | None = option(None, "default: None (has no effect on sampling)", choices=LOSS_WEIGHTS,
                                     none_literal=True)  # fmt: skip
    sample_eps: float | None = option(None, "default: the reference's effective value (0 for velocity on "
                                      "Linear/GVP, else 1e-3)")  # fmt: skip
    train_eps: float | None = option(None, "default: the reference's effective value (no effect on sampling)")

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance, where to run, and how samples become pixels."""

    cfg_scale: float = option(
        4.0, "classifier-free guidance scale (>= 1; 1 runs the model once per step, unbatched). Each command keeps the "
        "reference's: 4.0 for sample (its showcase grids), 1.0 for sample-ddp (FID without guidance); the demo's "
        "grids use 2.0", check=check_cfg_scale,
    )  # fmt: skip
    guide_channels: int | None = option(
        REFERENCE_GUIDE_CHANNELS, "guide the first K output channels only (3: the reference's DiT legacy behind the "
        "published numbers) or all of them (the standard form)", metavar="K|all",
        parse=parse_guide_channels,
    )  # fmt: skip
    device: str | None = option(None, "where to run (default: cuda when available)", choices=(None, *DEVICES))
    pixel_conversion: str = option(
        "truncate", "[-1,1] -> uint8: truncate = the reference's clamp(127.5 x + 128, 0, 255).to(uint8) "
        "(bit-comparable npz); round = clamp(round(127.5 (x + 1)), 0, 255)", choices=PIXEL_CONVERSIONS,
    )  # fmt: skip

    def __post_init__(self):
        check_options(self)
        if self.guide_channels is not None and self.guide_channels < 1:
            raise ConfigError(f"--guide-channels must be a positive integer or all, got {self.guide_channels}")


def mode_defaults(cls: type) -> dict:
    """{mode: an instance of the command's config `cls`} whose values are that mode's flag defaults: MeanFlow folds
    guidance into its training target, so it samples without guidance unless --cfg-scale asks for it."""
    return {"MeanFlow": cls(sampler=SamplerConfig(mode="MeanFlow"), guidance=GuidanceConfig(cfg_scale=1.0))}
