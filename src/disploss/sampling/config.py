"""Typed settings of sampling, shared by `disploss sample` (a grid) and `disploss sample-ddp` (an .npz for FID).

- `ODEConfig`, `SDEConfig`, `MeanFlowConfig` (SAMPLERS, by MODE: a positional sub-command as in the reference,
  `sample.py ODE --model ...`; MeanFlow for models trained with `--objective meanflow`): each mode's options; a
  config called on noise returns the sample, calling the integrators directly (disploss.transport.sample_ode ...).
- `ModelSpec`: which checkpoint, model, VAE and transport. Each field left None is taken from the checkpoint's
  stored training arguments (our checkpoints, and converted reference ones), else from its tensor shapes, else
  the reference default (disploss.sampling.load).
- `GuidanceConfig`: classifier-free guidance and the pixel conversion, the same for both commands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from disploss.checkpoint.sit import WEIGHT_CHOICES
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
# The transport's last steps, None spelled 'None' as the reference's command line does.
LAST_STEPS = tuple("None" if step is None else step for step in TRANSPORT_LAST_STEPS)
REFERENCE_GUIDE_CHANNELS = 3

__all__ = [
    "SAMPLERS",
    "GuidanceConfig",
    "LAST_STEPS",
    "MeanFlowConfig",
    "ModelSpec",
    "ODEConfig",
    "REFERENCE_GUIDE_CHANNELS",
    "SDEConfig",
    "SamplerConfig",
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


class _Sampler:
    """What the three sampler configs share: their mode name, the settings recorded in sample folders, and the
    call that turns noise into latents."""

    mode: ClassVar[str]

    def settings(self) -> dict:
        """The options as a plain dict (recorded in sample folders, compared when a folder is continued)."""
        return {
            "mode": self.mode,
            "sampling_method": self.sampling_method,
            "num_sampling_steps": self.num_sampling_steps,
        }

    def describe(self) -> str:
        """One line for logs, e.g. 'ODE dopri5, 250 grid points (adaptive: model calls unbounded)'."""
        raise NotImplementedError

    def __call__(self, transport, model_fn, z, y, *, noise_fn=None, doubled: bool = False) -> torch.Tensor:
        """The sample of noise z (B, C, h, w) with labels y (B,): latents (B, C, h, w) (the guided half of a doubled
        batch is the caller's to take).

        Args:
            transport: disploss.transport.Transport.
            model_fn: fn(x, t, y) -> the model's output (disploss.sampling.guidance.guided_model_fn).
            noise_fn: SDE only: the standard normals of the Brownian increments for a state x (default: the
                reference's, on the global CPU generator).
            doubled: z is the guidance batch [z; z] (disploss.sampling.guidance.cfg_batch): per-image adaptive steps
                keep each image's two rows together.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class ODEConfig(_Sampler):
    """`MODE ODE`: the probability-flow ODE (the reference's flags and defaults)."""

    mode: ClassVar[str] = "ODE"
    num_sampling_steps: int = option(250, "points of the time grid (bounds the model calls of fixed-step methods only)",
                                     check=at_least(2))  # fmt: skip
    sampling_method: str = option(
        "dopri5", f"one of {', '.join(ODE_METHODS)}. Fixed steps with exact model calls: euler (steps - 1), heun2 "
        "2 (steps - 1), ab2 (steps - 1), ab3 (steps); adaptive, each image its own steps: dopri5, bosh3, fehlberg2, "
        "adaptive_heun; the rest: torchdiffeq", choices=ODE_METHODS, metavar="METHOD",
    )  # fmt: skip
    atol: float = option(1e-6, "absolute tolerance (adaptive methods)", check=positive)
    rtol: float = option(1e-3, "relative tolerance (adaptive methods)", check=positive)
    time_schedule: str = option(
        "uniform", "time grid of the fixed-step methods: uniform (the reference's) or power (steps shrinking towards "
        "the data end, see --time-rho)", choices=TIME_SCHEDULES,
    )  # fmt: skip
    time_rho: float = option(1.5, "exponent of --time-schedule power (1: uniform)", check=at_least(1.0))
    step_control: str = option(
        "per-image", "adaptive methods: per-image (each image's own error decides its steps: its result does not "
        "depend on its batch-mates, the batch size or the number of processes) or batch (torchdiffeq's and the "
        "reference's: one step size for the whole batch)", choices=STEP_CONTROLS,
    )  # fmt: skip
    reverse: bool = option(False, "integrate from data to noise")

    def __post_init__(self):
        check_options(self)

    def settings(self) -> dict:
        out = {**super().settings(), "atol": self.atol, "rtol": self.rtol, "reverse": self.reverse}
        if self.sampling_method in PER_IMAGE_METHODS:
            out["step_control"] = self.step_control
        if self.time_schedule != "uniform":
            out.update(time_schedule=self.time_schedule, time_rho=self.time_rho)
        return out

    def describe(self) -> str:
        fixed = {"euler": 1, "ab2": 1, "heun2": 2}
        steps = self.num_sampling_steps
        if self.sampling_method in fixed or self.sampling_method == "ab3":
            calls = steps if self.sampling_method == "ab3" else fixed[self.sampling_method] * (steps - 1)
            return f"ODE {self.sampling_method}, {steps} grid points ({calls} model calls)"
        return f"ODE {self.sampling_method}, {steps} grid points (adaptive: the model calls are not bounded)"

    def __call__(self, transport, model_fn, z, y, *, noise_fn=None, doubled: bool = False) -> torch.Tensor:
        from disploss.transport import sample_ode

        return sample_ode(
            transport, model_fn, z, method=self.sampling_method, num_steps=self.num_sampling_steps, atol=self.atol,
            rtol=self.rtol, reverse=self.reverse, time_schedule=self.time_schedule, time_rho=self.time_rho,
            step_control=self.step_control, tied_halves=doubled, y=y,
        )[-1]  # fmt: skip


@dataclass(frozen=True)
class SDEConfig(_Sampler):
    """`MODE SDE`: the reverse-time SDE (the reference's flags and defaults)."""

    mode: ClassVar[str] = "SDE"
    num_sampling_steps: int = option(250, "points of the time grid", check=at_least(2))
    sampling_method: str = option("Euler", "Euler-Maruyama or stochastic Heun", choices=SDE_METHODS)
    diffusion_form: str = option("sigma", "diffusion coefficient w(t) of the SDE", choices=DIFFUSION_FORMS)
    diffusion_norm: float = option(1.0, "scale of w(t)")
    last_step: str = option("Mean", "deterministic last step from 1 - last-step-size to 1", choices=LAST_STEPS)
    last_step_size: float = option(0.04, "size of the last step", check=positive)

    def __post_init__(self):
        check_options(self)

    def settings(self) -> dict:
        return {**super().settings(), "diffusion_form": self.diffusion_form, "diffusion_norm": self.diffusion_norm,
                "last_step": self.last_step, "last_step_size": self.last_step_size}  # fmt: skip

    def describe(self) -> str:
        return (f"SDE {self.sampling_method}, {self.num_sampling_steps} grid points, diffusion {self.diffusion_form}, "
                f"last step {self.last_step}")  # fmt: skip

    def __call__(self, transport, model_fn, z, y, *, noise_fn=None, doubled: bool = False) -> torch.Tensor:
        from disploss.transport import sample_sde
        from disploss.transport.integrators import default_noise

        return sample_sde(
            transport, model_fn, z, method=self.sampling_method, diffusion_form=self.diffusion_form,
            diffusion_norm=self.diffusion_norm, last_step=None if self.last_step == "None" else self.last_step,
            last_step_size=self.last_step_size, num_steps=self.num_sampling_steps, noise_fn=noise_fn or default_noise,
            y=y,
        )[-1]  # fmt: skip


@dataclass(frozen=True)
class MeanFlowConfig(_Sampler):
    """`MODE MeanFlow`: a MeanFlow model (train --objective meanflow) in N equal steps (disploss.meanflow)."""

    mode: ClassVar[str] = "MeanFlow"
    num_sampling_steps: int = option(
        1, "equal steps from noise to data, exactly one model call each (1: one-step generation)", check=at_least(1)
    )
    sampling_method: ClassVar[str] = "uniform"  # recorded as such in sample folders

    def __post_init__(self):
        check_options(self)

    def describe(self) -> str:
        n = self.num_sampling_steps
        return f"MeanFlow, {n} step{'s' if n > 1 else ''} ({n} model call{'s' if n > 1 else ''})"

    def __call__(self, transport, model_fn, z, y, *, noise_fn=None, doubled: bool = False) -> torch.Tensor:
        from disploss.meanflow import sample_meanflow  # z + u(z, r=1, t=0) in one step

        return sample_meanflow(model_fn, z, self.num_sampling_steps, y=y)[-1]


SAMPLERS: dict[str, type] = {"ODE": ODEConfig, "SDE": SDEConfig, "MeanFlow": MeanFlowConfig}
SamplerConfig = ODEConfig | SDEConfig | MeanFlowConfig


@dataclass(frozen=True)
class ModelSpec:
    """Which model to sample and how to decode it; None = the checkpoint's value (see the module docstring)."""

    ckpt: str | None = option(
        None, "SiT checkpoint: a released file (bare state dict or {'ema': ...}), one of our training checkpoints, "
        "a .safetensors export, a model folder (`disploss export`) or a hub id owner/name. Without it the reference "
        "downloads SiT-XL-2-256x256.pt; here it is read from pretrained_models/ if present", metavar="PATH|ID",
    )  # fmt: skip
    weights: str | None = option(
        None, "which weights: ema (the EMA) or model (the raw weights, e.g. early in a run, while the EMA still "
        "holds mostly its start); a file holding only the other one is refused. Default: ema when stored, else "
        "what the file holds", choices=(None, *WEIGHT_CHOICES),
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
    return {"MeanFlow": cls(sampler=MeanFlowConfig(), guidance=GuidanceConfig(cfg_scale=1.0))}
