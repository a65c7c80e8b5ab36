"""Checkpoint I/O: plain, atomic, safe to load, and compatible with the released SiT / DispLoss files.

What a checkpoint is here:
- A dict of tensors and plain containers only (dict, list, tuple, str, int, float, bool, None), so that it
  loads with `torch.load(weights_only=True)`: loading cannot run code. `save_checkpoint` refuses anything else
  (the reference pickled an argparse.Namespace, which torch >= 2.6 refuses to load by default).
- Written atomically (temporary file + rename): a killed run leaves the previous checkpoint intact.
- Training checkpoints live in `{run_dir}/checkpoints/{step:07d}.pt` (the reference's names).

Released checkpoints (SiT-XL-2-256x256.pt holds a bare state dict, the DispLoss files hold {'ema': ...}) load
through `load_sit_weights` / `build_sit_from_checkpoint`, which infer the model configuration from the tensor
shapes and explain any mismatch with what was asked on the command line.

Old pickled checkpoints are converted once, by someone who trusts the file:
`disploss convert-checkpoint IN OUT --trust`. Inference weights export to safetensors with the model
configuration (JSON) in the metadata: `disploss convert-checkpoint IN OUT.safetensors --to-safetensors`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from disploss.fileio import atomic_path

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_path",
    "checkpoint_step",
    "find_latest",
    "load_latest",
    "find_latest_run",
    "load_sit_weights",
    "infer_sit_config",
    "build_sit_from_checkpoint",
    "to_plain",
    "export_safetensors",
    "import_safetensors",
    "add_arguments",
    "run",
]

CONVERT_COMMAND = "disploss convert-checkpoint IN OUT --trust"
_CKPT_NAME = re.compile(r"^(\d+)\.pt$")
_PLAIN_SCALARS = (str, int, float, bool, type(None))
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WEIGHT_CHOICES = ("ema", "model")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (base class of the errors below)."""


class UnsafeCheckpointError(CheckpointError):
    """The file is a pickle that carries code (or classes) and was refused by the weights-only loader."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty, or not a PyTorch checkpoint at all."""


# ---------------------------------------------------------------------------------------------------------
# Save / load


def _check_plain(obj: Any, where: str) -> None:
    # Exact types on purpose: subclasses (namedtuple, numpy.float64, Path...) are pickled as their own class,
    # which the weights-only loader refuses. torch.Size / dtype / device are allow-listed by torch itself.
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_SCALARS:
        return
    if isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(
                    f"checkpoint key {key!r} at {where} is a {type(key).__module__}.{type(key).__qualname__}; "
                    "dict keys must be str, int, float, bool or None"
                )
            _check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    hint = " (use vars(args) or dataclasses.asdict(config))" if isinstance(obj, argparse.Namespace) or (
        dataclasses.is_dataclass(obj)
    ) else ""
    raise TypeError(
        f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints may hold only "
        f"tensors and plain containers (dict, list, tuple, str, int, float, bool, None){hint}"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` to `path` atomically, after checking that it holds only what `weights_only=True` loads.

    Args:
        path: destination file (its folder is created if needed).
        state: dict of tensors and plain containers (dict, list, tuple, str, int, float, bool, None),
            e.g. {"model": ..., "ema": ..., "opt": ..., "args": vars(args), "train_steps": 50000}.
    Returns:
        The path written.
    Raises:
        TypeError: naming the key path of the first entry that is not plain, e.g. `state['args']`.
    """
    if type(state) not in (dict, collections.OrderedDict):
        raise TypeError(f"a checkpoint must be a dict, got {type(state).__qualname__}")
    _check_plain(state, "state")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _unpickler_reason(message: str) -> str:
    # torch's message is long; keep the one line that says which global or opcode was refused.
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if not match:
        return message.strip().splitlines()[0] if message.strip() else "refused by the weights-only unpickler"
    reason = match.group(1).strip()
    reason = re.sub(r"\s+was not an allowed global by default.*", "", reason)
    return reason or "refused by the weights-only unpickler"


def _looks_like_pickle_container(path: Path) -> bool:
    # A torch zip archive or a raw/legacy pickle (protocol >= 2 starts with 0x80): a refusal by the weights-only
    # unpickler then means "carries code"; for anything else it means "not a checkpoint".
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `torch.load(weights_only=True)`: loading never runs code from the file.

    Args:
        path: a `.pt` file written by `save_checkpoint` (or any plain torch checkpoint, e.g. the released ones).
        map_location: passed to torch.load ("cpu" by default).
    Returns:
        The stored object (normally a dict).
    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file pickles classes or code (e.g. an argparse.Namespace of an old train.py);
            the message gives the command that converts a TRUSTED file.
        CorruptCheckpointError: the file is empty, truncated or not a PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        raise CorruptCheckpointError(
            f"{path} is a safetensors file, not a training checkpoint; load model weights from it with "
            "disploss.checkpoint.load_sit_weights / build_sit_from_checkpoint (training cannot resume from it)"
        )
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (0 bytes): it was not written completely")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of non-torch pickles before refusing them anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _looks_like_pickle_container(path):
            raise CorruptCheckpointError(f"{path} is not a PyTorch checkpoint ({_unpickler_reason(str(err))})") from err
        raise UnsafeCheckpointError(
            f"{path} is not a plain checkpoint: it holds pickled Python objects "
            f"({_unpickler_reason(str(err))}), and loading it could run code, so it was refused for safety. "
            f"If you TRUST where the file comes from, convert it once with:\n"
            f"    disploss convert-checkpoint {path} {path.with_name(path.stem + '-plain.pt')} --trust\n"
            f"(usage: {CONVERT_COMMAND}) and use the converted file."
        ) from err
    except PermissionError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, AttributeError, TypeError) as err:
        # torch reports a damaged file through many exception types (miniz RuntimeError, EOFError, KeyError...).
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is truncated, corrupt or not a "
            f"PyTorch checkpoint ({type(err).__name__}: {first})"
        ) from err


def checkpoint_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """`{checkpoint_dir}/{step:07d}.pt`, the reference's checkpoint name."""
    return Path(checkpoint_dir) / f"{int(step):07d}.pt"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step encoded in a checkpoint file name `{step:07d}.pt`, or None for any other name.

    Args:
        path: file path; temporary files of an interrupted save (`.0050000.pt.xxxx.tmp`) give None.
    Returns:
        The step as an int, or None.
    """
    match = _CKPT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def _candidates(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for entry in checkpoint_dir.iterdir():
        step = checkpoint_step(entry)
        if step is not None and entry.is_file():
            found.append((step, entry))
    return sorted(found, reverse=True)


def _is_complete(path: Path) -> bool:
    # Cheap structural check of a torch zip archive: the central directory (at the end of the file) parses,
    # and the pickle record is present with a valid CRC. Truncated files fail the first test.
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return False
            archive.read(names[0])
        return True
    except (zipfile.BadZipFile, OSError, KeyError, EOFError, zipfile.LargeZipFile):
        return False


def find_latest(checkpoint_dir: str | os.PathLike, full_check: bool = False) -> Path | None:
    """The newest complete checkpoint `{step:07d}.pt` in `checkpoint_dir`.

    Temporary files are ignored. A newest file that is incomplete (truncated, empty, not a torch archive) is
    skipped with a warning and the previous one is returned.

    Args:
        checkpoint_dir: folder holding `{step:07d}.pt` files (a missing folder gives None).
        full_check: also load each candidate with `load_checkpoint` (slow for big models; `load_latest` does
            this while keeping the loaded state).
    Returns:
        The path, or None when there is no usable checkpoint.
    """
    for step, path in _candidates(Path(checkpoint_dir)):
        ok = _is_complete(path)
        if ok and full_check:
            try:
                load_checkpoint(path)
            except (CheckpointError, OSError):
                ok = False
        if ok:
            return path
        warnings.warn(f"skipping incomplete or corrupt checkpoint {path}; trying the previous one", RuntimeWarning)
    return None


def load_latest(checkpoint_dir: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """Load the newest checkpoint of `checkpoint_dir` that loads, falling back to older ones with a warning.

    Args:
        checkpoint_dir: folder holding `{step:07d}.pt` files.
        map_location: passed to torch.load.
    Returns:
        (path, state) or None when there is no usable checkpoint.
    Raises:
        UnsafeCheckpointError: the newest file holds pickled objects (not skipped silently: it needs converting).
    """
    for step, path in _candidates(Path(checkpoint_dir)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping corrupt checkpoint: {err}; trying the previous one", RuntimeWarning)
    return None


def _run_folder_pattern(model_name: str) -> re.Pattern:
    return re.compile(r"^(\d{3,})-" + re.escape(model_name.replace("/", "-")) + r"-")


def find_latest_run(results_dir: str | os.PathLike, model_name: str) -> Path | None:
    """For `--ckpt latest`: the newest checkpoint over the experiment folders of `model_name` in `results_dir`.

    Experiment folders are named `{index:03d}-{model with / replaced by -}-{path}-{prediction}-{loss_weight}`
    (see disploss.rundir). "Newest" is the complete checkpoint written last (modification time), ties broken by
    the folder index and then the step.

    Args:
        results_dir: the --results-dir of the runs.
        model_name: e.g. "SiT-XL/2" (SiT-XL/4 folders do not match).
    Returns:
        Path of the checkpoint, or None when no folder of this model has one.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return None
    pattern = _run_folder_pattern(model_name)
    best: tuple[float, int, int, Path] | None = None
    for folder in results_dir.iterdir():
        match = pattern.match(folder.name)
        if not match or not folder.is_dir():
            continue
        path = find_latest(folder / "checkpoints")
        if path is None:
            continue
        key = (path.stat().st_mtime, int(match.group(1)), checkpoint_step(path) or 0, path)
        if best is None or key[:3] > best[:3]:
            best = key
    return None if best is None else best[3]


# ---------------------------------------------------------------------------------------------------------
# Released-checkpoint loader


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _select_weights(obj: Any, prefer: str, source: str) -> tuple[dict, str]:
    # Returns (state dict, which part was taken: "ema" | "model" | "state_dict").
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__qualname__}, not a state dict or a dict of them")
    order = (prefer, "model" if prefer == "ema" else "ema")
    for key in order:
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key]), key
    # Flat files with prefixed names, e.g. a safetensors file holding 'ema.pos_embed' or 'model.pos_embed'.
    for key in order:
        prefix = key + "."
        sub = {k[len(prefix):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
        if "pos_embed" in _strip_wrapper_prefixes(sub):
            return sub, key
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
    for depth, hidden, heads in ARCHS.values():
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
        class_dropout_prob, num_classes, learn_sigma. class_dropout_prob is 0.1 (the reference) when the label
        table has a null-class row; it cannot be told apart from other positive values.
    Raises:
        CheckpointError: a required tensor is missing or shapes are inconsistent.
    """
    required = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight")
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
    }


def load_sit_weights(path_or_state: str | os.PathLike | Mapping, prefer: str = "ema") -> tuple[dict, dict]:
    """SiT weights and their configuration from any of the known checkpoint layouts.

    Accepts a bare state dict (SiT-XL-2-256x256.pt), a dict holding 'ema' and/or 'model' (DispLoss releases,
    our training checkpoints), a `.safetensors` file (ours, with the config in its metadata, or flat files with
    'ema.' / 'model.' prefixed names), with names wrapped by DDP ('module.') or torch.compile ('_orig_mod.').

    Args:
        path_or_state: a file path (.pt / .pth / .safetensors) or an already loaded object.
        prefer: "ema" or "model": which weights to take when both are present (the other one otherwise).
    Returns:
        (state_dict, config): state dict with official key names; SiT constructor arguments inferred from the
        shapes (num_heads from a stored config / model name, else the reference value for the width).
    Raises:
        ValueError: bad `prefer`; CheckpointError (a ValueError) when no SiT weights are found.
    """
    if prefer not in _WEIGHT_CHOICES:
        raise ValueError(f"prefer={prefer!r}; valid choices: {', '.join(_WEIGHT_CHOICES)}")
    stored: dict = {}
    if isinstance(path_or_state, Mapping):
        obj, source = path_or_state, "the given state"
    else:
        path = Path(path_or_state)
        source = str(path)
        if path.suffix == ".safetensors":
            obj, stored = import_safetensors(path)
        else:
            obj = load_checkpoint(path)
    stored = {**_stored_config(obj), **stored}
    weights, _ = _select_weights(obj, prefer, source)
    weights = _strip_wrapper_prefixes(weights)
    model_name = stored.get("model_name")
    heads = stored.get("num_heads")
    if heads is None and model_name:
        try:
            heads = _heads_for(0, model_name)
        except ValueError:
            heads = None
    config = infer_sit_config(weights, num_heads=heads)
    if "class_dropout_prob" in stored:
        config["class_dropout_prob"] = stored["class_dropout_prob"]
    return weights, config


def _describe(config: dict) -> str:
    from disploss.models import model_name_for

    name = model_name_for(config)
    shape = f"hidden_size {config['hidden_size']}, depth {config['depth']}, patch_size {config['patch_size']}"
    return f"{name} ({shape})" if name else shape


def _mismatch_causes(file_cfg: dict, model_cfg: dict, image_size: int | None, vae_factor: int) -> list[str]:
    causes = []
    if any(file_cfg[k] != model_cfg[k] for k in ("hidden_size", "depth", "patch_size")):
        causes.append(f"model size: the checkpoint is {_describe(file_cfg)}, the model asked for is "
                      f"{_describe(model_cfg)} (pass the matching --model)")
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
        causes.append(f"the checkpoint takes {file_cfg['in_channels']} input channels, the model "
                      f"{model_cfg['in_channels']} (latent vs pixel space?)")
    if file_cfg["num_classes"] != model_cfg["num_classes"]:
        causes.append(
            f"the checkpoint has {file_cfg['num_classes']} classes (y_embedder.embedding_table has "
            f"{file_cfg['num_classes'] + 1} rows with the null class), the model was built with --num-classes "
            f"{model_cfg['num_classes']} (pass --num-classes {file_cfg['num_classes']})"
        )
    if file_cfg["learn_sigma"] != model_cfg["learn_sigma"] and file_cfg["in_channels"] == model_cfg["in_channels"]:
        c = file_cfg["in_channels"]
        causes.append(
            f"the checkpoint was trained with learn_sigma={file_cfg['learn_sigma']} "
            f"({2 * c if file_cfg['learn_sigma'] else c} output channels), the model was built with "
            f"learn_sigma={model_cfg['learn_sigma']}"
        )
    return causes


def _shape_diff(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> list[str]:
    lines = []
    for key in model_sd:
        if key not in file_sd:
            lines.append(f"  {key}: missing in the checkpoint (model {tuple(model_sd[key].shape)})")
        elif tuple(file_sd[key].shape) != tuple(model_sd[key].shape):
            lines.append(f"  {key}: checkpoint {tuple(file_sd[key].shape)}, model {tuple(model_sd[key].shape)}")
    for key in file_sd:
        if key not in model_sd:
            lines.append(f"  {key}: in the checkpoint {tuple(file_sd[key].shape)}, not in the model")
    return lines


def build_sit_from_checkpoint(
    path: str | os.PathLike | Mapping,
    model_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    vae_factor: int = 8,
    prefer: str = "ema",
    learn_sigma: bool | None = None,
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
    Returns:
        (model in eval mode on the CPU, the constructor arguments used).
    """
    from disploss.models import SiT, create_model

    state, file_cfg = load_sit_weights(path, prefer=prefer)
    want = dict(file_cfg)
    if image_size is not None:
        if image_size % vae_factor:
            raise ValueError(f"--image-size {image_size} is not divisible by the VAE factor {vae_factor}")
        want["input_size"] = image_size // vae_factor
    if num_classes is not None:
        want["num_classes"] = num_classes
    if learn_sigma is not None:
        want["learn_sigma"] = learn_sigma
    kwargs = {k: want[k] for k in ("input_size", "in_channels", "mlp_ratio", "class_dropout_prob",
                                   "num_classes", "learn_sigma")}
    if model_name is not None:
        model = create_model(model_name, **kwargs)
    else:
        if want["num_heads"] is None:
            raise ValueError(
                f"cannot tell the number of attention heads of a checkpoint with hidden_size "
                f"{want['hidden_size']} (not a registered SiT width): pass the model name"
            )
        model = SiT(patch_size=want["patch_size"], hidden_size=want["hidden_size"], depth=want["depth"],
                    num_heads=want["num_heads"], **kwargs)
    model_sd = model.state_dict()
    diff = _shape_diff(state, model_sd)
    if diff:
        model_cfg = infer_sit_config(model_sd, num_heads=model.num_heads)
        causes = _mismatch_causes(file_cfg, model_cfg, image_size, vae_factor)
        source = path if not isinstance(path, Mapping) else "the given state"
        shown = diff[:12] + ([f"  ... and {len(diff) - 12} more"] if len(diff) > 12 else [])
        raise ValueError(
            f"checkpoint {source} does not match the model asked for:\n" + "\n".join(shown) + "\nlikely cause: "
            + ("; ".join(causes) if causes else "a different architecture")
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, model.config()


# ---------------------------------------------------------------------------------------------------------
# Conversion of trusted pickles, safetensors export / import


def to_plain(obj: Any, where: str = "state", notes: list[str] | None = None) -> Any:
    """A copy of `obj` made of tensors and plain containers only (what `save_checkpoint` accepts).

    argparse.Namespace and dataclasses become dicts, Paths and enums strings / values, numpy scalars and arrays
    Python numbers and tensors, sets sorted lists, namedtuples dicts; any other object its `vars()` (or its
    repr when it has none).

    Args:
        obj: object loaded from a trusted pickle.
        where: key path used in `notes`.
        notes: if given, receives one line per converted entry ("state['args']: argparse.Namespace -> dict").
    Returns:
        The plain copy (tensors are shared, not copied).
    """
    def note(kind: str) -> None:
        if notes is not None:
            notes.append(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} -> {kind}")

    if isinstance(obj, torch.Tensor):
        plain_tensor = type(obj) is torch.Tensor or isinstance(obj, torch.nn.Parameter)
        return obj if plain_tensor else obj.as_subclass(torch.Tensor)
    if type(obj) in _PLAIN_SCALARS or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)()
        for key, value in obj.items():
            plain_key = key if type(key) in _PLAIN_SCALARS else str(key)
            out[plain_key] = to_plain(value, f"{where}[{key!r}]", notes)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]", notes) for i, v in enumerate(obj))
    if isinstance(obj, argparse.Namespace):
        note("dict")
        return to_plain(dict(vars(obj)), where, notes)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        note("dict")
        return to_plain({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where, notes)
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        note("dict")
        return to_plain(dict(obj._asdict()), where, notes)
    if isinstance(obj, enum.Enum):
        note("value")
        return to_plain(obj.value, where, notes)
    if isinstance(obj, os.PathLike):
        note("str")
        return os.fspath(obj)
    for base in (bool, int, float, str):  # subclasses of plain types, e.g. numpy.float64
        if isinstance(obj, base):
            note(base.__name__)
            return base(obj)
    if isinstance(obj, Mapping):
        note("dict")
        return to_plain(dict(obj), where, notes)
    if isinstance(obj, (list, tuple)):
        note("list")
        return to_plain(list(obj), where, notes)
    if isinstance(obj, (set, frozenset)):
        note("list")
        return to_plain(sorted(obj, key=repr), where, notes)
    module = type(obj).__module__
    if module == "numpy" or module.startswith("numpy."):
        if hasattr(obj, "shape") and getattr(obj, "shape", ()) != ():
            note("tensor")
            return torch.as_tensor(obj)
        note("number")
        return obj.item()
    if hasattr(obj, "__dict__"):
        note("dict of its attributes")
        return to_plain(dict(vars(obj)), where, notes)
    note("str")
    return repr(obj)


def export_safetensors(
    path_or_state: str | os.PathLike | Mapping,
    out: str | os.PathLike,
    prefer: str = "ema",
    model_name: str | None = None,
) -> dict:
    """Write the EMA (or model) weights of a checkpoint to a safetensors file, with the model config.

    The metadata holds "model_config" (JSON of the SiT constructor arguments), "model_name" when it is a
    registered preset, "weights" (which part was exported) and "format": "pt".

    Args:
        path_or_state: a plain checkpoint path or loaded dict (see `load_sit_weights`).
        out: destination `.safetensors` file (written atomically).
        prefer: "ema" or "model".
        model_name: registered name, used for num_heads when the file does not say.
    Returns:
        The config written.
    """
    from safetensors.torch import save_file

    from disploss.models import model_name_for, parse_model_name

    obj = load_checkpoint(path_or_state) if not isinstance(path_or_state, Mapping) else path_or_state
    state, config = load_sit_weights(obj, prefer=prefer)
    if model_name is not None:
        depth, hidden, heads, patch = parse_model_name(model_name)
        if (depth, hidden, patch) != (config["depth"], config["hidden_size"], config["patch_size"]):
            raise ValueError(f"--model {model_name} does not match the checkpoint: it is {_describe(config)}")
        config["num_heads"] = heads
    _, part = _select_weights(obj, prefer, "checkpoint")
    name = model_name or model_name_for(config)
    metadata = {"model_config": json.dumps(config, sort_keys=True), "weights": part, "format": "pt",
                "producer": "disploss"}
    if name:
        metadata["model_name"] = name
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return config


def import_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a safetensors file and the model configuration stored in its metadata.

    Args:
        path: a `.safetensors` file (ours, or any other: the config is then {}).
    Returns:
        (tensors by name as stored, config dict: SiT constructor arguments plus "model_name" when known).
    """
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise CorruptCheckpointError(f"cannot read safetensors file {path}: {err}") from err
    config: dict = {}
    for field in ("model_config", "config", "meta"):
        if field not in metadata:
            continue
        try:
            value = json.loads(metadata[field])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("model_config"), dict):
            value = value["model_config"]
        if isinstance(value, dict) and "hidden_size" in value:
            config = dict(value)
            break
    if "model_name" in metadata:
        config["model_name"] = metadata["model_name"]
    return tensors, config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `disploss convert-checkpoint IN OUT [--trust] [--to-safetensors]`."""
    parser.add_argument("input", metavar="IN", help="checkpoint to convert")
    parser.add_argument("output", metavar="OUT", help="plain .pt checkpoint or .safetensors file to write")
    parser.add_argument("--trust", action="store_true",
                        help="load IN with weights_only=False (RUNS CODE from the file: only for files you trust)")
    parser.add_argument("--to-safetensors", action="store_true",
                        help="export the EMA (or --weights) weights to safetensors with the model config "
                             "(implied when OUT ends in .safetensors)")
    parser.add_argument("--weights", choices=_WEIGHT_CHOICES, default="ema",
                        help="weights to export with --to-safetensors when both are stored (default: ema)")
    parser.add_argument("--model", default=None,
                        help="model name (e.g. SiT-XL/2) recorded with --to-safetensors when the file does not say")


def _load_any(path: Path, trust: bool) -> Any | None:
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError as err:
        if not trust:
            reason = _unpickler_reason(str(err.__cause__)) if err.__cause__ else "pickled Python objects"
            print(
                f"convert-checkpoint: {path} is not a plain checkpoint ({reason}). Converting it means loading it "
                "with weights_only=False, which can execute arbitrary code stored in the file, so it was refused "
                "for safety. Re-run with --trust only if you trust where the file comes from:\n"
                f"    disploss convert-checkpoint {path} OUT --trust",
                file=sys.stderr,
            )
            return None
    # Trusted by the user: the one place where weights_only=False is allowed.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except RuntimeError:
        with open(path, "rb") as f:
            if f.read(4).startswith(b"PK"):
                raise
            f.seek(0)
            return pickle.load(f)  # a plain pickle.dump of a state dict, not a torch file


def run(args: argparse.Namespace) -> int:
    """Run `disploss convert-checkpoint`; returns the exit status (2 when an untrusted pickle was refused)."""
    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        print(f"convert-checkpoint: IN and OUT are the same file ({src}); choose another OUT", file=sys.stderr)
        return 2
    obj = _load_any(src, args.trust)
    if obj is None:
        return 2
    notes: list[str] = []
    plain = to_plain(obj, "state", notes)
    for line in notes:
        print(f"converted {line}")
    if args.to_safetensors or dst.suffix == ".safetensors":
        config = export_safetensors(plain, dst, prefer=args.weights, model_name=args.model)
        print(f"wrote {dst} (weights: {args.weights} if present; config: {json.dumps(config, sort_keys=True)})")
        return 0
    if type(plain) not in (dict, collections.OrderedDict):
        plain = {"state_dict": plain}
    save_checkpoint(dst, plain)
    load_checkpoint(dst)  # proves the result loads with weights_only=True
    print(f"wrote {dst}: a plain checkpoint that loads with weights_only=True")
    return 0
