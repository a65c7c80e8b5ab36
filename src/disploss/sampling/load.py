"""Loading a model for sampling: checkpoint + stored configuration + flags -> model, codec, transport.

Order of precedence per setting: the flag, then the checkpoint's stored training arguments (a flag that
contradicts them is an error; --vae may swap ema <-> mse, whose decoders share one latent space), then the
tensor shapes (model size, latent size, classes), then the reference default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disploss.errors import ConfigError, MissingFileError
from disploss.sampling.config import ModelSpec

REFERENCE_CLASS_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
# Where the reference's download.py puts the auto-downloaded checkpoint (used when --ckpt is not given).
RELEASED_CHECKPOINT = Path("pretrained_models") / "SiT-XL-2-256x256.pt"


def _loss_weight(text: str | None) -> str | None:
    # 'None' (the reference's spelling) -> None
    return None if text in (None, "None") else text


@dataclass(frozen=True)
class SamplingModel:
    """What sampling needs, resolved from a checkpoint and the flags.

    Attributes:
        model: SiT in eval mode, on its device, without gradients.
        codec: disploss.vae codec (SD-VAE or identity) that decodes the model's samples to images in [-1, 1].
        transport: disploss.transport.Transport of the resolved path / prediction.
        settings: plain dict: model, ckpt (as given: a path or a hub id), ckpt_name (its file stem or folder name),
            weights (the part taken: ema | model | state_dict), fingerprint (disploss.statedict.fingerprint of those
            weights), image_size, num_classes, vae, path_type, prediction, loss_weight, sample_eps, train_eps,
            latent_shape (C, h, w), objective (flow | meanflow: from the weights).
        sources: where each setting came from: "flag", "checkpoint" (stored training arguments), "weights"
            (tensor shapes) or "default" (the reference's).
    """

    model: torch.nn.Module
    codec: Any
    transport: Any
    settings: dict
    sources: dict


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
            raise ConfigError(
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
    # A file, a model folder, or a hub id (its snapshot in the local cache, fetched when the hub is reachable).
    if ckpt is not None:
        from disploss.hub import resolve

        path = Path(os.path.expanduser(ckpt))
        return path if path.is_file() else resolve(ckpt, flag="--ckpt")
    if RELEASED_CHECKPOINT.is_file():
        return RELEASED_CHECKPOINT
    raise MissingFileError(
        f"no --ckpt given: the reference would download {RELEASED_CHECKPOINT.name}, but this tool never downloads "
        f"checkpoints. Pass --ckpt PATH (a released SiT / DispLoss file or one of our checkpoints), or place the "
        f"file at {RELEASED_CHECKPOINT} (the download link is in willisma/SiT's download.py)"
    )


def check_mode(mode: str, meanflow: bool, ckpt) -> None:
    """A MeanFlow model (trained with --objective meanflow) samples in the MeanFlow mode only, a flow-matching model
    in ODE or SDE; anything else is a ConfigError naming the mode to use."""
    if meanflow and mode != "MeanFlow":
        raise ConfigError(
            f"{ckpt} is a MeanFlow model (trained with --objective meanflow): sample it in the MeanFlow mode "
            f"(sample.py MeanFlow --ckpt {ckpt}), not {mode}"
        )
    if not meanflow and mode == "MeanFlow":
        raise ConfigError(
            f"{ckpt} is a flow-matching model: sample it in the ODE or SDE mode (sample.py ODE --ckpt {ckpt}); the "
            "MeanFlow mode needs a model trained with --objective meanflow"
        )


def load_for_sampling(
    spec: ModelSpec, device: torch.device, *, default_vae: str, mode: str | None = None
) -> SamplingModel:
    """Load the checkpoint and the VAE named by the flags and resolve every model / transport setting.

    Order of precedence per setting: the flag, then the checkpoint's stored training arguments (a flag that
    contradicts them is an error; --vae may swap ema <-> mse, whose decoders share one latent space), then the
    tensor shapes (model size, latent size, classes), then the reference default.

    Args:
        spec: the checkpoint and the settings given (None: resolve from the checkpoint).
        device: where the model and the VAE run.
        default_vae: the command's --vae default when the checkpoint does not say.
        mode: the sampling mode, checked against the kind of model (check_mode) before the VAE is loaded.
    Returns:
        SamplingModel.
    Raises:
        FileNotFoundError, ValueError (incl. disploss.checkpoint errors), OSError: with a message for the user.
    """
    from disploss.checkpoint import build_sit_from_checkpoint, import_safetensors, load_checkpoint, load_sit_weights
    from disploss.checkpoint.sit import load_folder, select_weights
    from disploss.data.vae import HUB_VAES, load_vae
    from disploss.models import model_name_for, parse_model_name
    from disploss.statedict import fingerprint
    from disploss.transport import create_transport

    path = _checkpoint_source(spec.ckpt)
    label = spec.ckpt or str(path)  # a hub id names itself, not its snapshot in the cache
    if path.is_dir():
        source: Any = load_folder(path)
    elif path.suffix == ".safetensors":
        tensors, stored_config = import_safetensors(path)
        source = {**tensors, "model_config": stored_config}
    else:
        source = load_checkpoint(path)
    stored = _stored_args(source)
    sources: dict = {}
    if spec.model is not None:
        parse_model_name(spec.model)  # a ValueError listing the valid names
    model_name = _pick("--model", spec.model, stored, "model", None, sources)
    if model_name is not None and spec.model is None and not _is_preset(model_name):
        model_name = None  # a stored name we do not know: the shapes (and the stored model_config) decide
    image_size = _pick("--image-size", spec.image_size, stored, "image_size", None, sources)
    num_classes = _pick("--num-classes", spec.num_classes, stored, "num_classes", None, sources)
    vae_spec = _pick("--vae", spec.vae, stored, "vae", default_vae, sources, strict=False)
    path_type = _pick("--path-type", spec.path_type, stored, "path_type", "Linear", sources)
    prediction = _pick("--prediction", spec.prediction, stored, "prediction", "velocity", sources)
    stored_lw = {"loss_weight": _loss_weight(stored["loss_weight"])} if "loss_weight" in stored else {}
    loss_weight = _loss_weight(
        _pick("--loss-weight", _loss_weight(spec.loss_weight), stored_lw, "loss_weight", None, sources)
    )

    prefer, strict = spec.weights or "ema", spec.weights is not None
    weights, file_cfg = load_sit_weights(source, prefer=prefer, strict=strict, source=label)
    part = select_weights(source, prefer, label, strict=strict)[1]
    if mode is not None:
        check_mode(mode, file_cfg["meanflow"], spec.ckpt or path)
    if vae_spec in HUB_VAES and file_cfg["in_channels"] != 4:
        raise ConfigError(
            f"the checkpoint's model takes {file_cfg['in_channels']} input channels, but --vae {vae_spec} gives "
            f"4-channel latents" + (": pass --vae none for a pixel-space model" if file_cfg["in_channels"] == 3 else "")
        )
    codec = load_vae(vae_spec, device)
    factor = codec.downsample_factor
    patch = parse_model_name(model_name)[3] if model_name else file_cfg["patch_size"]
    if image_size is not None and image_size % (factor * patch):
        step = factor * patch
        raise ConfigError(
            f"--image-size {image_size} is not divisible by the VAE downsampling factor {factor} (--vae {vae_spec}) "
            f"times the patch size {patch} = {step}; valid sizes nearby: {_nearby(image_size, step)}"
        )
    try:
        model, config = build_sit_from_checkpoint(
            source, model_name=model_name, image_size=image_size, num_classes=num_classes, vae_factor=factor,
            prefer=prefer, strict_weights=strict,
        )  # fmt: skip
    except ValueError as err:  # name the file rather than "the given state" (we pass the loaded dict)
        raise ConfigError(str(err).replace("the given state", label)) from err
    if codec.latent_channels != model.in_channels:
        raise ConfigError(
            f"--vae {vae_spec} gives {codec.latent_channels}-channel latents but the model takes "
            f"{model.in_channels} input channels"
            + (": pass --vae none for a pixel-space model" if model.in_channels == 3 else "")
        )
    transport = create_transport(path_type, prediction, loss_weight, spec.train_eps, spec.sample_eps)
    model = model.to(device).eval().requires_grad_(False)
    settings = {
        "model": model_name or model_name_for(config) or "custom",
        "ckpt": label,
        "ckpt_name": path.stem if path.is_file() else Path(label).name,
        "weights": part,
        "fingerprint": fingerprint(weights),
        "image_size": model.input_size * factor,
        "num_classes": model.num_classes,
        "vae": vae_spec,
        "path_type": path_type,
        "prediction": prediction,
        "loss_weight": loss_weight,
        "sample_eps": transport.sample_eps,
        "train_eps": transport.train_eps,
        "latent_shape": (model.in_channels, model.input_size, model.input_size),
        "objective": "meanflow" if model.meanflow else "flow",
    }
    return SamplingModel(model=model, codec=codec, transport=transport, settings=settings, sources=sources)


def describe(sm: SamplingModel) -> str:
    """One line: the resolved settings and where each came from."""
    keys = ("model", "image_size", "num_classes", "vae", "path_type", "prediction")
    labels = {"flag": "flag", "checkpoint": "stored args", "weights": "from the weights", "default": "default"}
    parts = [f"{k}={sm.settings[k]} ({labels[sm.sources.get(k, 'default')]})" for k in keys]
    if sm.settings["objective"] == "meanflow":
        parts.append("objective=meanflow (from the weights)")
    kind = {"ema": "EMA", "model": "model (raw)"}.get(sm.settings["weights"], "the file's only state dict")
    parts.append(f"weights={kind} (fingerprint {sm.settings['fingerprint']})")
    return f"checkpoint {sm.settings['ckpt']}: " + ", ".join(parts)
