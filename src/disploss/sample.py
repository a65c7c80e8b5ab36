"""`disploss sample MODE` / `python sample.py MODE`: a grid of class-conditional samples from one checkpoint.

    python sample.py ODE --model SiT-XL/2 --image-size 256 --ckpt /path/to/model.pt
    disploss sample SDE --ckpt results/000-SiT-B-2-Linear-velocity-None/checkpoints/0400000.pt --cfg-scale 1.5

As the reference: 8 images of the ImageNet classes 207, 360, 387, 974, 88, 979, 417, 279 (for a model with
another number of classes: labels i % num_classes, i = 0..7), initial noise torch.randn on the device after
torch.manual_seed(--seed), classifier-free guidance on a doubled batch [x; x] with labels [y; null], guidance on
the first 3 channels (--guide-channels), a 2 x 4 grid PNG (2 px black padding, as torchvision's make_grid).

Differences, all deliberate: with --cfg-scale 1 the batch is not doubled (half the model calls; the SDE draws
its increments as the doubled batch would, so the samples are the same up to float rounding); checkpoints load
with weights_only=True; the model, image size, classes, VAE and transport come from our checkpoints' stored
training arguments unless given (a contradicting flag is an error); without --ckpt nothing is downloaded.

This module also holds what `disploss sample-ddp` shares: `load_for_sampling`, `guided_model_fn`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from disploss import sampling_args as sa

REFERENCE_CLASS_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
# Where the reference's download.py puts the auto-downloaded checkpoint (used when --ckpt is not given).
RELEASED_CHECKPOINT = Path("pretrained_models") / "SiT-XL-2-256x256.pt"
DEFAULT_VAE = "mse"  # the reference's sample.py default (its train.py and sample_ddp.py default to ema)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sa.add_mode_subcommands(parser, _add_sample_args)


def _add_sample_args(parser: argparse.ArgumentParser) -> None:
    sa.add_model_args(parser, default_vae=DEFAULT_VAE, default_cfg_scale=4.0)
    group = parser.add_argument_group("output")
    group.add_argument("--seed", type=int, default=0, help="torch.manual_seed before drawing the initial noise")
    group.add_argument("--class-labels", type=sa.class_labels, default=None, metavar="L1,L2,...",
                       help="labels of the images (default: the reference's 207,360,387,974,88,979,417,279 for "
                            "1000 classes, else 0..7 modulo the number of classes)")
    group.add_argument("--out", type=str, default="sample.png", help="grid PNG, written atomically")
    group.add_argument("--nrow", type=sa.at_least(1, int, "an integer"), default=4,
                       help="images per grid row (the reference: 4, i.e. 2 rows of 4)")
    sa.add_precision_arg(group, default="tf32")


# ---------------------------------------------------------------------------------------------------------
# Loading: checkpoint + stored configuration + flags -> model, codec, transport


@dataclass(frozen=True)
class SamplingModel:
    """What sampling needs, resolved from a checkpoint and the flags.

    Attributes:
        model: SiT in eval mode, on its device, without gradients.
        codec: disploss.vae codec (SD-VAE or identity) that decodes the model's samples to images in [-1, 1].
        transport: disploss.transport.Transport of the resolved path / prediction.
        settings: plain dict: model, ckpt, image_size, num_classes, vae, path_type, prediction, loss_weight,
            sample_eps, train_eps, latent_shape (C, h, w).
        sources: where each setting came from: "flag", "checkpoint" (stored training arguments), "weights"
            (tensor shapes) or "default" (the reference's).
    """

    model: torch.nn.Module
    codec: Any
    transport: Any
    settings: dict
    sources: dict


def resolve_device(name: str | None) -> torch.device:
    """--device: 'cuda' | 'cpu' | None (CUDA when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return torch.device(name)


def set_precision(precision: str) -> None:
    """TF32 matmuls for 'tf32' and 'bf16' (where the autocast leaves fp32 work), off for 'fp32'."""
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def default_class_labels(num_classes: int) -> list[int]:
    """The reference's 8 ImageNet classes for 1000 classes; else labels 0..7 modulo num_classes (8 images)."""
    if num_classes == 1000:
        return list(REFERENCE_CLASS_LABELS)
    return [i % num_classes for i in range(len(REFERENCE_CLASS_LABELS))]


def _stored_args(obj: Any) -> dict:
    # Our training checkpoints (and reference ones converted with `disploss convert-checkpoint --trust`) hold
    # the run's flags as a plain dict under 'args'; released files hold weights only.
    if isinstance(obj, Mapping) and isinstance(obj.get("args"), Mapping):
        return dict(obj["args"])
    return {}


def _pick(flag: str, explicit, stored: dict, key: str, fallback, sources: dict, *, strict: bool = True):
    """The flag's value if given (checked against the checkpoint's stored value), else the stored one, else
    the fallback; records where it came from in `sources[key]`: flag | checkpoint | weights | default."""
    if explicit is not None:
        if strict and key in stored and stored[key] is not None and explicit != stored[key]:
            raise ValueError(
                f"{flag} {explicit} contradicts the checkpoint, which was trained with {key} {stored[key]} (stored in "
                f"its training arguments); leave {flag} out to use the checkpoint's value"
            )
        sources[key] = "flag"
        return explicit
    if stored.get(key) is not None:
        sources[key] = "checkpoint"
        return stored[key]
    sources[key] = "weights" if fallback is None else "default"  # None: read from the tensor shapes later
    return fallback


def _is_preset(name: str) -> bool:
    from disploss.models import parse_model_name

    try:
        parse_model_name(name)
    except ValueError:
        return False
    return True


def _nearby(value: int, step: int) -> str:
    below = value // step * step
    return " or ".join(str(s) for s in (below, below + step) if s > 0)


def _checkpoint_source(ckpt: str | None) -> Path:
    if ckpt is not None:
        path = Path(os.path.expanduser(ckpt))
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt {ckpt}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
        return path
    if RELEASED_CHECKPOINT.is_file():
        return RELEASED_CHECKPOINT
    raise FileNotFoundError(
        f"no --ckpt given: the reference would download {RELEASED_CHECKPOINT.name}, but this tool never downloads "
        f"checkpoints. Pass --ckpt PATH (a released SiT / DispLoss file or one of our checkpoints), or place the "
        f"file at {RELEASED_CHECKPOINT} (the download link is in willisma/SiT's download.py)"
    )


def load_for_sampling(args: argparse.Namespace, device: torch.device, *, default_vae: str) -> SamplingModel:
    """Load the checkpoint and the VAE named by the flags and resolve every model / transport setting.

    Order of precedence per setting: the flag, then the checkpoint's stored training arguments (a flag that
    contradicts them is an error; --vae may swap ema <-> mse, whose decoders share one latent space), then the
    tensor shapes (model size, latent size, classes), then the reference default.

    Args:
        args: parsed flags of `disploss sample` / `sample-ddp`.
        device: where the model and the VAE run.
        default_vae: the command's --vae default when the checkpoint does not say.
    Returns:
        SamplingModel.
    Raises:
        FileNotFoundError, ValueError (incl. disploss.checkpoint errors), OSError: with a message for the user.
    """
    from disploss.checkpoint import build_sit_from_checkpoint, load_checkpoint, load_sit_weights
    from disploss.models import model_name_for, parse_model_name
    from disploss.transport import create_transport
    from disploss.vae import HUB_VAES, load_vae

    path = _checkpoint_source(args.ckpt)
    source: Any = path if path.suffix == ".safetensors" else load_checkpoint(path)
    stored = _stored_args(source)
    sources: dict = {}
    if args.model is not None:
        parse_model_name(args.model)  # a ValueError listing the valid names
    model_name = _pick("--model", args.model, stored, "model", None, sources)
    if model_name is not None and args.model is None and not _is_preset(model_name):
        model_name = None  # a stored name we do not know: the shapes (and the stored model_config) decide
    image_size = _pick("--image-size", args.image_size, stored, "image_size", None, sources)
    num_classes = _pick("--num-classes", args.num_classes, stored, "num_classes", None, sources)
    vae_spec = _pick("--vae", args.vae, stored, "vae", default_vae, sources, strict=False)
    path_type = _pick("--path-type", args.path_type, stored, "path_type", "Linear", sources)
    prediction = _pick("--prediction", args.prediction, stored, "prediction", "velocity", sources)
    stored_lw = {"loss_weight": sa.loss_weight_value(stored["loss_weight"])} if "loss_weight" in stored else {}
    loss_weight = sa.loss_weight_value(
        _pick("--loss-weight", sa.loss_weight_value(args.loss_weight), stored_lw, "loss_weight", None, sources)
    )

    _, file_cfg = load_sit_weights(source)
    if vae_spec in HUB_VAES and file_cfg["in_channels"] != 4:
        raise ValueError(
            f"the checkpoint's model takes {file_cfg['in_channels']} input channels, but --vae {vae_spec} gives "
            f"4-channel latents" + (": pass --vae none for a pixel-space model" if file_cfg["in_channels"] == 3 else "")
        )
    codec = load_vae(vae_spec, device)
    factor = codec.downsample_factor
    patch = parse_model_name(model_name)[3] if model_name else file_cfg["patch_size"]
    if image_size is not None and image_size % (factor * patch):
        step = factor * patch
        raise ValueError(
            f"--image-size {image_size} is not divisible by the VAE downsampling factor {factor} (--vae {vae_spec}) "
            f"times the patch size {patch} = {step}; valid sizes nearby: {_nearby(image_size, step)}"
        )
    try:
        model, config = build_sit_from_checkpoint(source, model_name=model_name, image_size=image_size,
                                                  num_classes=num_classes, vae_factor=factor)
    except ValueError as err:  # name the file rather than "the given state" (we pass the loaded dict)
        raise ValueError(str(err).replace("the given state", str(path))) from err
    if codec.latent_channels != model.in_channels:
        raise ValueError(
            f"--vae {vae_spec} gives {codec.latent_channels}-channel latents but the model takes "
            f"{model.in_channels} input channels" + (": pass --vae none for a pixel-space model"
                                                      if model.in_channels == 3 else "")
        )
    transport = create_transport(path_type, prediction, loss_weight, args.train_eps, args.sample_eps)
    model = model.to(device).eval().requires_grad_(False)
    settings = {
        "model": model_name or model_name_for(config) or "custom",
        "ckpt": str(path),
        "image_size": model.input_size * factor,
        "num_classes": model.num_classes,
        "vae": vae_spec,
        "path_type": path_type,
        "prediction": prediction,
        "loss_weight": loss_weight,
        "sample_eps": transport.sample_eps,
        "train_eps": transport.train_eps,
        "latent_shape": (model.in_channels, model.input_size, model.input_size),
    }
    return SamplingModel(model=model, codec=codec, transport=transport, settings=settings, sources=sources)


def describe(sm: SamplingModel) -> str:
    """One line: the resolved settings and where each came from."""
    keys = ("model", "image_size", "num_classes", "vae", "path_type", "prediction")
    labels = {"flag": "flag", "checkpoint": "stored args", "weights": "from the weights", "default": "default"}
    parts = [f"{k}={sm.settings[k]} ({labels[sm.sources.get(k, 'default')]})" for k in keys]
    return f"checkpoint {sm.settings['ckpt']}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Guidance


def check_guidance(model: torch.nn.Module, guide_channels: int | None) -> None:
    """--guide-channels must not exceed the model's output channels (ValueError naming the valid values)."""
    if guide_channels is not None and guide_channels > model.in_channels:
        raise ValueError(
            f"--guide-channels {guide_channels} exceeds the model's {model.in_channels} output channels; "
            f"valid values: 1..{model.in_channels} or all"
        )


def guided_model_fn(
    model: torch.nn.Module, cfg_scale: float, guide_channels: int | None, bf16: bool = False
) -> tuple[Callable, bool]:
    """The function the solver calls, and whether it expects the doubled batch [x; x] with labels [y; null].

    cfg_scale > 1: model.forward_with_cfg (the reference's layout); cfg_scale == 1: plain model.forward on
    the undoubled batch (uncond + 1 * (cond - uncond) = cond: the same field for half the cost).

    Args:
        bf16: run the model under bfloat16 autocast, returning float32 to the solver.
    Returns:
        (fn(x, t, y) -> field, doubled).
    """
    doubled = cfg_scale > 1.0
    if doubled:
        def fn(x, t, y):
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_channels=guide_channels)
    else:
        def fn(x, t, y):
            return model(x, t, y)
    if not bf16:
        return fn, doubled

    def autocast_fn(x, t, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return fn(x, t, y).float()

    return autocast_fn, doubled


def cfg_batch(z: torch.Tensor, y: torch.Tensor, null_class: int, doubled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, y) as the solver sees them: [z; z] and [y; null] when doubled. z (B, C, h, w), y (B,)."""
    if not doubled:
        return z, y
    return torch.cat([z, z], 0), torch.cat([y, torch.full_like(y, null_class)], 0)  # (2B, C, h, w), (2B,)


def _as_doubled_noise(x: torch.Tensor) -> torch.Tensor:
    # SDE increments for an undoubled batch, drawn as the doubled one would be (first half kept), so that
    # --cfg-scale 1 consumes the global CPU generator exactly as the reference's always-doubled batch does.
    from disploss.transport.integrators import default_noise

    return default_noise(torch.cat([x, x], 0))[: x.shape[0]]


# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from disploss.imageio import save_grid, to_uint8

    try:
        device = resolve_device(args.device)
        set_precision(args.precision)
        sm = load_for_sampling(args, device, default_vae=DEFAULT_VAE)
        model = sm.model
        check_guidance(model, args.guide_channels)
        labels = args.class_labels if args.class_labels is not None else default_class_labels(model.num_classes)
        if max(labels) >= model.num_classes:
            raise ValueError(
                f"--class-labels {','.join(map(str, labels))}: labels must lie in [0, {model.num_classes - 1}] "
                f"(the model has {model.num_classes} classes)"
            )
        model_fn, doubled = guided_model_fn(model, args.cfg_scale, args.guide_channels, args.precision == "bf16")
        sample_fn = sa.build_sample_fn(args, sm.transport, noise_fn=None if doubled else _as_doubled_noise)
    except (ValueError, OSError) as err:
        print(f"disploss sample: error: {err}", file=sys.stderr)
        return 2
    print(describe(sm))

    n = len(labels)
    torch.manual_seed(args.seed)
    z = torch.randn(n, *sm.settings["latent_shape"], device=device)  # (B, C, h, w)
    y = torch.tensor(labels, device=device)
    z, y = cfg_batch(z, y, model.num_classes, doubled)
    start = time.time()
    with torch.no_grad():
        latents = sample_fn(z, model_fn, y=y)[-1][:n]  # (B, C, h, w): the guided half
        images = sm.codec.decode(latents)  # (B, 3, H, W) in [-1, 1]
    print(f"Sampling took {time.time() - start:.2f} seconds.")
    pixels = to_uint8(images, args.pixel_conversion)  # (B, H, W, 3) uint8
    save_grid(pixels, args.out, nrow=args.nrow)
    rows = -(-n // args.nrow)
    print(f"wrote {args.out}: {rows} x {min(n, args.nrow)} grid of {pixels.shape[1]}x{pixels.shape[2]} images, "
          f"labels {','.join(map(str, labels))}, {args.mode} {args.sampling_method}, cfg {args.cfg_scale}")
    return 0
