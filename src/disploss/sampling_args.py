"""Command-line options shared by `disploss sample` and `disploss sample-ddp` (the reference's sample.py and
sample_ddp.py), and the one place that turns them into a sampling function.

MODE is a positional sub-command, as in the reference (`sample.py ODE --model ...`): each mode has its own
flags (`--sampling-method` means a torchdiffeq method for ODE and Euler / Heun for SDE, with different defaults).

The model flags (--model, --image-size, --num-classes, --vae) and the transport flags (--path-type,
--prediction, --loss-weight) default to None, which means: from the checkpoint's stored training arguments
(our checkpoints, and converted reference ones), else from the checkpoint's tensor shapes, else the reference
default. `disploss.sample.load_for_sampling` does that resolution.
"""

from __future__ import annotations

import argparse
from typing import Callable

from disploss.imageio import PIXEL_CONVERSIONS
from disploss.transport import DIFFUSION_FORMS, PATH_TYPES, PREDICTIONS, SDE_METHODS
from disploss.transport.sampler import TORCHDIFFEQ_METHODS as ODE_METHODS

MODES = ("ODE", "SDE")
LAST_STEPS = ("None", "Mean", "Tweedie", "Euler")  # 'None' as the reference spells it on the command line
LOSS_WEIGHTS = ("None", "velocity", "likelihood")
PRECISIONS = ("fp32", "tf32", "bf16")
REFERENCE_GUIDE_CHANNELS = 3


# ---------------------------------------------------------------------------------------------------------
# argparse value types: a bad value is a one-line error naming the flag (argparse adds the flag name).


def at_least(minimum: int | float, kind: Callable, what: str) -> Callable[[str], int | float]:
    """argparse type: `kind(text)` (else "is not {what}") that must be >= minimum."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = what
    return parse


def cfg_scale(text: str) -> float:
    """--cfg-scale: a float >= 1 (1 disables guidance; below 1 the reference refuses too)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be >= 1.0 (1 disables guidance; the published numbers use 1.5 or 4.0), got {text}"
        )
    return value


def guide_channels(text: str) -> int | None:
    """--guide-channels: a positive int (3: the reference) or 'all' (-> None: the standard form)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: valid values are a positive integer (3: the reference) or 'all'")
    return int(text)


def class_labels(text: str) -> list[int]:
    """--class-labels: comma-separated non-negative ints, e.g. '207,360,387'."""
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 207,360") from None
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one class label, each >= 0")
    return labels


# ---------------------------------------------------------------------------------------------------------
# Flag groups


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # Shows "(default: X)" only where the help text does not already explain a None default.
    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_mode_subcommands(
    parser: argparse.ArgumentParser, add_common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """MODE positional (ODE | SDE) with, for each mode, the common flags, the transport flags and its own.

    Args:
        parser: the command's parser.
        add_common: adds the command's own flags (model, output...) to each mode's parser.
    """
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True,
                                help="ODE (probability flow, torchdiffeq) or SDE (Euler-Maruyama / Heun)")
    parser.epilog = f"the flags of each mode: {parser.prog} ODE --help, {parser.prog} SDE --help"
    for mode in MODES:
        what = "probability-flow ODE" if mode == "ODE" else "reverse-time SDE"
        mode_parser = sub.add_parser(mode, help=f"sample with the {what}", description=parser.description,
                                     formatter_class=_HelpFormatter)
        add_common(mode_parser)
        add_transport_args(mode_parser)
        (add_ode_args if mode == "ODE" else add_sde_args)(mode_parser)


def add_model_args(parser: argparse.ArgumentParser, *, default_vae: str, default_cfg_scale: float) -> None:
    """--model --vae --image-size --num-classes --ckpt --cfg-scale --guide-channels --num-sampling-steps
    --device --pixel-conversion."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", type=str, default=None, metavar="PATH",
                       help="SiT checkpoint: a released file (bare state dict or {'ema': ...}), one of our training "
                            "checkpoints, or a .safetensors export. Without it the reference downloads "
                            "SiT-XL-2-256x256.pt; here it is read from pretrained_models/ if present")
    group.add_argument("--model", type=str, default=None, metavar="NAME",
                       help="model preset, e.g. SiT-XL/2 (default: from the checkpoint's stored arguments, else "
                            "from its tensor shapes)")
    group.add_argument("--vae", type=str, default=None, metavar="SPEC",
                       help=f"ema | mse (stabilityai/sd-vae-ft-*) | a local AutoencoderKL folder | none (pixel "
                            f"space) (default: the checkpoint's, else {default_vae} as the reference)")
    group.add_argument("--image-size", type=at_least(1, int, "an integer"), default=None, metavar="PX",
                       help="image side in pixels (default: the checkpoint's, else its latent size times the VAE "
                            "factor; released files: 256)")
    group.add_argument("--num-classes", type=at_least(1, int, "an integer"), default=None, metavar="N",
                       help="number of classes (default: the checkpoint's; released files: 1000)")
    group.add_argument("--cfg-scale", type=cfg_scale, default=default_cfg_scale,
                       help="classifier-free guidance scale (>= 1; 1 runs the model once per step, unbatched)")
    group.add_argument("--guide-channels", type=guide_channels, default=REFERENCE_GUIDE_CHANNELS, metavar="K|all",
                       help="guide the first K output channels only (3: the reference's DiT legacy behind the "
                            "published numbers) or all of them (the standard form)")
    group.add_argument("--num-sampling-steps", type=at_least(2, int, "an integer"), default=250,
                       help="points of the time grid (bounds the model calls of fixed-step methods only)")
    group.add_argument("--device", type=str, default=None, choices=("cuda", "cpu"),
                       help="where to run (default: cuda when available)")
    group.add_argument("--pixel-conversion", type=str, default="truncate", choices=PIXEL_CONVERSIONS,
                       help="[-1,1] -> uint8: truncate = the reference's clamp(127.5 x + 128, 0, 255).to(uint8) "
                            "(bit-comparable npz); round = clamp(round(127.5 (x + 1)), 0, 255)")


def add_transport_args(parser: argparse.ArgumentParser) -> None:
    """--path-type --prediction --loss-weight --sample-eps --train-eps (None: the checkpoint's / reference's)."""
    group = parser.add_argument_group("transport (default: the checkpoint's stored values, else the reference's)")
    group.add_argument("--path-type", type=str, default=None, choices=PATH_TYPES, help="default: Linear")
    group.add_argument("--prediction", type=str, default=None, choices=PREDICTIONS, help="default: velocity")
    group.add_argument("--loss-weight", type=str, default=None, choices=LOSS_WEIGHTS,
                       help="default: None (has no effect on sampling)")
    group.add_argument("--sample-eps", type=float, default=None,
                       help="default: the reference's effective value (0 for velocity on Linear/GVP, else 1e-3)")
    group.add_argument("--train-eps", type=float, default=None,
                       help="default: the reference's effective value (no effect on sampling)")


def add_ode_args(parser: argparse.ArgumentParser) -> None:
    """The reference's ODE flags: --sampling-method dopri5 --atol 1e-6 --rtol 1e-3 --reverse."""
    group = parser.add_argument_group("ODE")
    group.add_argument("--sampling-method", type=str, default="dopri5", choices=ODE_METHODS, metavar="METHOD",
                       help=f"torchdiffeq method, one of {', '.join(ODE_METHODS)}; euler and heun2 use exactly "
                            "(steps - 1) or 2 (steps - 1) model calls")
    group.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (adaptive methods)")
    group.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (adaptive methods)")
    group.add_argument("--reverse", action="store_true", help="integrate from data to noise")


def add_sde_args(parser: argparse.ArgumentParser) -> None:
    """The reference's SDE flags (its CLI defaults: Euler, sigma, 1.0, Mean, 0.04)."""
    group = parser.add_argument_group("SDE")
    group.add_argument("--sampling-method", type=str, default="Euler", choices=SDE_METHODS,
                       help="Euler-Maruyama or stochastic Heun")
    group.add_argument("--diffusion-form", type=str, default="sigma", choices=DIFFUSION_FORMS,
                       help="diffusion coefficient w(t) of the SDE")
    group.add_argument("--diffusion-norm", type=float, default=1.0, help="scale of w(t)")
    group.add_argument("--last-step", type=str, default="Mean", choices=LAST_STEPS,
                       help="deterministic last step from 1 - last-step-size to 1")
    group.add_argument("--last-step-size", type=float, default=0.04, help="size of the last step")


def add_precision_arg(parser: argparse.ArgumentParser, default: str | None, note: str = "") -> None:
    """--precision fp32 | tf32 (fp32 with TF32 matmuls, the reference) | bf16 (autocast of the model)."""
    parser.add_argument("--precision", type=str, default=default, choices=PRECISIONS,
                        help="fp32; tf32 = fp32 with TF32 matmuls on Ampere+ GPUs (the reference); bf16 = the "
                             "model under bfloat16 autocast (the solver state and the VAE stay fp32)" + note)


# ---------------------------------------------------------------------------------------------------------
# From parsed flags to the sampler


def loss_weight_value(text: str | None) -> str | None:
    """'None' (the reference's spelling) -> None."""
    return None if text in (None, "None") else text


def sampler_settings(args: argparse.Namespace) -> dict:
    """The mode's sampler flags as a plain dict (recorded in sample folders and compared on resume)."""
    settings = {"mode": args.mode, "sampling_method": args.sampling_method,
                "num_sampling_steps": args.num_sampling_steps}
    if args.mode == "ODE":
        settings.update(atol=args.atol, rtol=args.rtol, reverse=args.reverse)
    else:
        settings.update(diffusion_form=args.diffusion_form, diffusion_norm=args.diffusion_norm,
                        last_step=args.last_step, last_step_size=args.last_step_size)
    return settings


def build_sample_fn(args: argparse.Namespace, transport, noise_fn: Callable | None = None) -> Callable:
    """The sampling function of the chosen mode: fn(x, model_fn, **model_kwargs), whose [-1] is the sample.

    Args:
        args: parsed flags (mode, sampler flags, --num-sampling-steps).
        transport: a disploss.transport.Transport.
        noise_fn: SDE only: draws the standard normals of the Brownian increments for a state x
            (default: the reference's, on the global CPU generator).
    """
    from disploss.transport import Sampler
    from disploss.transport.integrators import default_noise

    sampler = Sampler(transport)
    if args.mode == "ODE":
        return sampler.sample_ode(sampling_method=args.sampling_method, num_steps=args.num_sampling_steps,
                                  atol=args.atol, rtol=args.rtol, reverse=args.reverse, keep_trajectory=False)
    return sampler.sample_sde(sampling_method=args.sampling_method, diffusion_form=args.diffusion_form,
                              diffusion_norm=args.diffusion_norm,
                              last_step=None if args.last_step == "None" else args.last_step,
                              last_step_size=args.last_step_size, num_steps=args.num_sampling_steps,
                              noise_fn=noise_fn or default_noise, keep_trajectory=False)
