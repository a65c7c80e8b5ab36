"""Conversion of trusted pickles to plain checkpoints, and safetensors export / import of inference weights
(the model configuration as JSON in the metadata).

`disploss convert-checkpoint IN OUT --trust` converts a pickled checkpoint once, for someone who trusts the file;
`disploss convert-checkpoint IN OUT.safetensors` exports the EMA weights.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from disploss.checkpoint.io import (
    PLAIN_SCALARS,
    NonFiniteCheckpointError,
    UnsafeCheckpointError,
    _refusal_reason,
    load_checkpoint,
    save_checkpoint,
)
from disploss.checkpoint.sit import describe_config, load_sit_weights, select_weights
from disploss.errors import ConfigError, MissingFileError
from disploss.fileio import atomic_path, check_output_file
from disploss.statedict import first_nonfinite


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
    if type(obj) in PLAIN_SCALARS or isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return obj
    if type(obj) in (dict, collections.OrderedDict):
        out = type(obj)()
        for key, value in obj.items():
            plain_key = key if type(key) in PLAIN_SCALARS else str(key)
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
            raise ConfigError(f"--model {model_name} does not match the checkpoint: it is {describe_config(config)}")
        config["num_heads"] = heads
    _, part = select_weights(obj, prefer, "checkpoint")
    name = model_name or model_name_for(config)
    metadata = {
        "model_config": json.dumps(config, sort_keys=True),
        "weights": part,
        "format": "pt",
        "producer": "disploss",
    }
    if name:
        metadata["model_name"] = name
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return config


def _load_trusted(path: Path, trust: bool) -> Any:
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError as err:
        if not trust:
            reason = _refusal_reason(path, err.__cause__)
            raise UnsafeCheckpointError(
                f"{path} is not a plain checkpoint ({reason}). Converting it means loading it with "
                "weights_only=False, which can execute arbitrary code stored in the file, so it was refused for "
                f"safety. Re-run with --trust only if you trust where the file comes from: disploss "
                f"convert-checkpoint {path} OUT --trust"
            ) from err
    # Trusted by the user: the one place where weights_only=False is allowed.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except RuntimeError:
        with open(path, "rb") as f:
            if f.read(4).startswith(b"PK"):
                raise
            f.seek(0)
            return pickle.load(f)  # a plain pickle.dump of a state dict, not a torch file


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    trust: bool = False,
    to_safetensors: bool | None = None,
    weights: str = "ema",
    model_name: str | None = None,
) -> tuple[list[str], dict | None]:
    """Convert a checkpoint to a plain one (loads with weights_only=True), or export its weights to safetensors.

    Args:
        src: the checkpoint to read; a pickle carrying code is loaded only with trust=True.
        dst: the file to write (atomically); never the same file as src.
        trust: load src with weights_only=False (RUNS CODE from the file).
        to_safetensors: export the EMA (or `weights`) weights with the model config; None: when dst ends in
            .safetensors.
        weights: "ema" or "model" (what to export when both are stored).
        model_name: recorded with the export when the file does not say.
    Returns:
        (one line per converted entry, the exported model config or None for a .pt conversion).
    Raises:
        UnsafeCheckpointError: src carries code and trust is False.
        NonFiniteCheckpointError: src holds NaN or infinity (named); nothing is written.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MissingFileError(f"{src}: no such checkpoint file")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"IN and OUT are the same file ({src}); choose another OUT")
    check_output_file(dst, "OUT", {"input checkpoint IN": src})  # before loading (and, with --trust, running) IN
    notes: list[str] = []
    plain = to_plain(_load_trusted(src, trust), "state", notes)
    bad = first_nonfinite(plain)  # a trusted pickle was not checked on load: nothing non-finite is written
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"checkpoint {src} holds non-finite values in {bad}: its run had diverged, or the file is damaged; convert "
            "an earlier checkpoint"
        )
    if to_safetensors or (to_safetensors is None and dst.suffix == ".safetensors"):
        return notes, export_safetensors(plain, dst, prefer=weights, model_name=model_name)
    if type(plain) not in (dict, collections.OrderedDict):
        plain = {"state_dict": plain}
    save_checkpoint(dst, plain)
    load_checkpoint(dst)  # proves the result loads with weights_only=True
    return notes, None
