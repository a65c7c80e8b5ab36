"""SiT weights from any known checkpoint layout, their configuration from the tensor shapes, and messages that
explain a mismatch with what the command line asked for.

Released checkpoints (SiT-XL-2-256x256.pt holds a bare state dict, the DispLoss files hold {'ema': ...}), our
training checkpoints ({'model', 'ema', ...}) and safetensors exports all load through `load_sit_weights` /
`build_sit_from_checkpoint`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from disploss.checkpoint.io import CheckpointError, CorruptCheckpointError, import_safetensors, load_checkpoint
from disploss.errors import ConfigError
from disploss.statedict import shape_differences as _shape_diff

# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WEIGHT_CHOICES = ("ema", "model")


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def select_weights(obj: Any, prefer: str, source: str, strict: bool = False) -> tuple[dict, str]:
    """The SiT weights of a loaded checkpoint and which part they are: (state dict, "ema" | "model" | "state_dict").

    Args:
        obj: a bare state dict, a dict holding 'ema' and/or 'model', or a flat dict of 'ema.'/'model.' names.
        prefer: "ema" or "model": the part taken when both are stored.
        source: the file, for messages.
        strict: the other part is not a substitute: a file holding only 'model' when "ema" is asked for (or the
            reverse) is a CheckpointError (a bare state dict is taken as it is).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__qualname__}, not a state dict or a dict of them")
    other = "model" if prefer == "ema" else "ema"
    found = [key for key in (prefer, other) if isinstance(obj.get(key), Mapping)]
    prefixed: dict = {}
    # Flat files with prefixed names, e.g. a safetensors file holding 'ema.pos_embed' or 'model.pos_embed'.
    for key in (prefer, other):
        prefix = key + "."
        sub = {k[len(prefix) :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
        if not found and "pos_embed" in _strip_wrapper_prefixes(sub):
            prefixed[key] = sub
    parts = found or list(prefixed)
    if parts:
        if strict and parts[0] != prefer:
            raise CheckpointError(
                f"{source} holds only the {parts[0]} weights, not the {prefer} ones: pass --weights {parts[0]}"
            )
        key = parts[0]
        return (dict(obj[key]) if found else prefixed[key]), key
    if "pos_embed" in _strip_wrapper_prefixes({k: v for k, v in obj.items() if isinstance(k, str)}):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, "state_dict"
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    raise CheckpointError(
        f"{source} holds no SiT weights: expected a state dict (with 'pos_embed', 'blocks.0...') or a dict with "
        f"'ema' and/or 'model'; its top-level keys are {keys}"
    )


def _stored_config(obj: Any) -> dict:
    # Model configuration stored beside the weights: our checkpoints carry 'model_config' (or 'config' with a
    # 'model_config' / 'model' entry); the reference's carry args with the model name.
    if not isinstance(obj, Mapping):
        return {}
    found: dict = {}
    for holder in (obj, obj.get("config"), obj.get("args")):
        if isinstance(holder, argparse.Namespace):
            holder = vars(holder)
        if not isinstance(holder, Mapping):
            continue
        if isinstance(holder.get("model_config"), Mapping):
            found = {**dict(holder["model_config"]), **found}
        if isinstance(holder.get("model"), str) and "model_name" not in found:
            found["model_name"] = holder["model"]
    return found


def _heads_for(hidden_size: int, model_name: str | None) -> int | None:
    from disploss.models import ARCHS, parse_model_name

    if model_name:
        return parse_model_name(model_name)[2]
    for _depth, hidden, heads in ARCHS.values():
        if hidden == hidden_size:
            return heads
    return None


def infer_sit_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """The SiT constructor arguments that produce the shapes of `state_dict` (official key names).

    Args:
        state_dict: SiT weights, wrapper prefixes already stripped.
        num_heads: heads, which shapes cannot tell; None takes the reference value for the width
            (384: 6, 768: 12, 1024: 16, 1152: 16) and leaves None for other widths.
    Returns:
        dict with input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
        class_dropout_prob, num_classes, learn_sigma, meanflow (a MeanFlow model: it has `r_embedder`, the second
        time input; disploss.meanflow). class_dropout_prob is 0.1 (the reference) when the label
        table has a null-class row; it cannot be told apart from other positive values.
    Raises:
        CheckpointError: a required tensor is missing or shapes are inconsistent.
    """
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"not a SiT state dict: missing {', '.join(missing)}")
    _, tokens, hidden = state_dict["pos_embed"].shape
    hidden_x, in_channels, patch, patch_w = state_dict["x_embedder.proj.weight"].shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens or patch != patch_w or hidden_x != hidden:
        raise CheckpointError(
            f"inconsistent SiT shapes: pos_embed {tuple(state_dict['pos_embed'].shape)}, "
            f"x_embedder.proj.weight {tuple(state_dict['x_embedder.proj.weight'].shape)}"
        )
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    out_channels, rest = divmod(out_features, patch * patch)
    if rest or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear has {out_features} outputs, not {patch}x{patch}x{in_channels} or "
            f"{patch}x{patch}x{2 * in_channels}"
        )
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = len(block_ids)
    mlp_ratio = 4.0
    if "blocks.0.mlp.fc1.weight" in state_dict:
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": num_heads if num_heads is not None else _heads_for(hidden, None),
        "mlp_ratio": mlp_ratio,
        "class_dropout_prob": 0.1,
        "num_classes": rows - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "meanflow": "r_embedder.mlp.0.weight" in state_dict,
    }


def load_folder(folder: str | os.PathLike) -> dict:
    """A model folder (disploss.hub: config.json + model.safetensors, from `disploss export` or SiT.save_pretrained)
    as the dict a checkpoint would be: {"ema" or "model": weights} (the part config.json says was exported; a bare
    state dict when it does not say), "args" (the training settings it records, for sampling) and "model_config"
    (its constructor arguments). The weights are checked finite (disploss.hub.read_folder).

    Args:
        folder: a local model folder (hub ids are resolved by disploss.hub.resolve first).
    """
    from disploss.hub import CONFIG_NAME, INFO_KEY, constructor_args, read_folder
    from disploss.models import SiT

    folder = Path(folder)
    state, config = read_folder(folder)
    info = config.get(INFO_KEY) if isinstance(config.get(INFO_KEY), Mapping) else {}
    args = dict(info.get("training") or {})
    if info.get("model_name"):
        args["model"] = info["model_name"]
    part = info.get("weights")
    out: dict = {part: state} if part in WEIGHT_CHOICES else dict(state)
    out["args"] = args
    out["model_config"] = constructor_args(config, SiT, folder / CONFIG_NAME)
    return out


def load_sit_weights(
    path_or_state: str | os.PathLike | Mapping, prefer: str = "ema", strict: bool = False, source: str | None = None
) -> tuple[dict, dict]:
    """SiT weights and their configuration from any of the known checkpoint layouts.

    Accepts a bare state dict (SiT-XL-2-256x256.pt), a dict holding 'ema' and/or 'model' (DispLoss releases,
    our training checkpoints), a `.safetensors` file (ours, with the config in its metadata, or flat files with
    'ema.' / 'model.' prefixed names), a model folder (`load_folder`), with names wrapped by DDP ('module.') or
    torch.compile ('_orig_mod.'). Files are checked finite on load (a NonFiniteCheckpointError names the tensor).

    Args:
        path_or_state: a file path (.pt / .pth / .safetensors), a model folder, or an already loaded object.
        prefer: "ema" or "model": which weights to take when both are present (the other one otherwise).
        strict: the other one is not taken instead (see `select_weights`).
        source: the file an already loaded object came from, named in the errors.
    Returns:
        (state_dict, config): state dict with official key names; SiT constructor arguments inferred from the
        shapes (num_heads from a stored config / model name, else the reference value for the width).
    Raises:
        ValueError: bad `prefer`; CheckpointError (a ValueError) when no SiT weights are found, a weight is not
            floating point, or the shapes do not make a SiT (each naming the file).
    """
    if prefer not in WEIGHT_CHOICES:
        raise ConfigError(f"prefer={prefer!r}; valid choices: {', '.join(WEIGHT_CHOICES)}")
    stored: dict = {}
    if isinstance(path_or_state, Mapping):
        obj, source = path_or_state, source or "the given state"
    else:
        path = Path(path_or_state)
        source = str(path)
        if path.is_dir():
            obj = load_folder(path)
        elif path.suffix == ".safetensors":
            obj, stored = import_safetensors(path)
        else:
            obj = load_checkpoint(path)
    stored = {**_stored_config(obj), **stored}
    weights, _ = select_weights(obj, prefer, source, strict=strict)
    weights = _strip_wrapper_prefixes(weights)
    model_name = stored.get("model_name")
    heads = stored.get("num_heads")
    if heads is None and model_name:
        try:
            heads = _heads_for(0, model_name)
        except ValueError:
            heads = None
    not_float = next(((k, v.dtype) for k, v in weights.items() if not v.is_floating_point()), None)
    if not_float is not None:
        raise CorruptCheckpointError(
            f"{source}: {not_float[0]} is {str(not_float[1]).removeprefix('torch.')}, but every SiT weight is floating "
            "point: the file is damaged or not a SiT checkpoint"
        )
    try:
        config = infer_sit_config(weights, num_heads=heads)
    except CheckpointError as err:
        raise type(err)(f"{source}: {err}") from None
    if "class_dropout_prob" in stored:
        config["class_dropout_prob"] = stored["class_dropout_prob"]
    return weights, config


def describe_config(config: dict) -> str:
    from disploss.models import model_name_for

    name = model_name_for(config)
    shape = f"hidden_size {config['hidden_size']}, depth {config['depth']}, patch_size {config['patch_size']}"
    return f"{name} ({shape})" if name else shape


def mismatch_causes(file_cfg: dict, model_cfg: dict, image_size: int | None, vae_factor: int) -> list[str]:
    causes = []
    if any(file_cfg[k] != model_cfg[k] for k in ("hidden_size", "depth", "patch_size")):
        causes.append(
            f"model size: the checkpoint is {describe_config(file_cfg)}, the model asked for is "
            f"{describe_config(model_cfg)} (pass the matching --model)"
        )
    if file_cfg["input_size"] != model_cfg["input_size"] and file_cfg["patch_size"] == model_cfg["patch_size"]:
        t_file = (file_cfg["input_size"] // file_cfg["patch_size"]) ** 2
        t_model = (model_cfg["input_size"] // model_cfg["patch_size"]) ** 2
        built = f"--image-size {image_size}" if image_size else f"input size {model_cfg['input_size']}"
        causes.append(
            f"pos_embed has {t_file} tokens, the model built for {built} has {t_model}: the checkpoint was "
            f"trained at {file_cfg['input_size'] * vae_factor} px (pass --image-size "
            f"{file_cfg['input_size'] * vae_factor})"
        )
    if file_cfg["in_channels"] != model_cfg["in_channels"]:
        causes.append(
            f"the checkpoint takes {file_cfg['in_channels']} input channels, the model "
            f"{model_cfg['in_channels']} (latent vs pixel space?)"
        )
    if file_cfg["num_classes"] != model_cfg["num_classes"]:
        causes.append(
            f"the checkpoint has {file_cfg['num_classes']} classes (y_embedder.embedding_table has "
            f"{file_cfg['num_classes'] + 1} rows with the null class), the model was built with --num-classes "
            f"{model_cfg['num_classes']} (pass --num-classes {file_cfg['num_classes']})"
        )
    if file_cfg.get("meanflow", False) != model_cfg.get("meanflow", False):
        kind = "a MeanFlow model (it has r_embedder)" if file_cfg.get("meanflow") else "a flow-matching model"
        causes.append(
            f"the checkpoint is {kind}: pass --objective {'meanflow' if file_cfg.get('meanflow') else 'flow'}"
        )
    if file_cfg["learn_sigma"] != model_cfg["learn_sigma"] and file_cfg["in_channels"] == model_cfg["in_channels"]:
        c = file_cfg["in_channels"]
        causes.append(
            f"the checkpoint was trained with learn_sigma={file_cfg['learn_sigma']} "
            f"({2 * c if file_cfg['learn_sigma'] else c} output channels), the model was built with "
            f"learn_sigma={model_cfg['learn_sigma']}"
        )
    return causes


def build_sit_from_checkpoint(
    path: str | os.PathLike | Mapping,
    model_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    vae_factor: int = 8,
    prefer: str = "ema",
    learn_sigma: bool | None = None,
    strict_weights: bool = False,
) -> tuple[torch.nn.Module, dict]:
    """Build a disploss.models.SiT for a checkpoint and load its weights strictly.

    Every argument left None is taken from the file; the ones given must agree with it, otherwise a
    ValueError lists the differing keys with both shapes and the likely cause (trained at another image size,
    another number of classes, learn_sigma, another model size).

    Args:
        path: checkpoint path (.pt or .safetensors) or a loaded checkpoint dict.
        model_name: e.g. "SiT-XL/2" (also fixes num_heads, which shapes cannot tell).
        image_size: image side in pixels; the latent input size is image_size // vae_factor.
        num_classes: number of classes the model is built with.
        vae_factor: pixels per latent (8 for the SD-VAE; 1 in pixel space).
        prefer: "ema" or "model" weights when both are stored.
        learn_sigma: output 2*C channels (True for the released checkpoints); None: as in the file.
        strict_weights: the `prefer`red part only, never the other one instead (see `select_weights`).
    Returns:
        (model in eval mode on the CPU, the constructor arguments used).
    """
    from disploss.models import SiT, create_model

    state, file_cfg = load_sit_weights(path, prefer=prefer, strict=strict_weights)
    want = dict(file_cfg)
    if image_size is not None:
        if image_size % vae_factor:
            raise ConfigError(f"--image-size {image_size} is not divisible by the VAE factor {vae_factor}")
        want["input_size"] = image_size // vae_factor
    if num_classes is not None:
        want["num_classes"] = num_classes
    if learn_sigma is not None:
        want["learn_sigma"] = learn_sigma
    kwargs = {
        k: want[k]
        for k in ("input_size", "in_channels", "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma")
    }
    kwargs["meanflow"] = want.get("meanflow", False)  # from the weights: r_embedder present
    if model_name is not None:
        model = create_model(model_name, **kwargs)
    else:
        if want["num_heads"] is None:
            raise ConfigError(
                f"cannot tell the number of attention heads of a checkpoint with hidden_size "
                f"{want['hidden_size']} (not a registered SiT width): pass the model name"
            )
        model = SiT(
            patch_size=want["patch_size"],
            hidden_size=want["hidden_size"],
            depth=want["depth"],
            num_heads=want["num_heads"],
            **kwargs,
        )
    model_sd = model.state_dict()
    diff = _shape_diff(state, model_sd)
    if diff:
        model_cfg = infer_sit_config(model_sd, num_heads=model.num_heads)
        causes = mismatch_causes(file_cfg, model_cfg, image_size, vae_factor)
        source = path if not isinstance(path, Mapping) else "the given state"
        shown = diff[:12] + ([f"  ... and {len(diff) - 12} more"] if len(diff) > 12 else [])
        raise ConfigError(
            f"checkpoint {source} does not match the model asked for:\n"
            + "\n".join(shown)
            + "\nlikely cause: "
            + ("; ".join(causes) if causes else "a different architecture")
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, model.config()
