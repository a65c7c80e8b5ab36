"""Checkpoint files: plain, atomic, safe to load.

What a checkpoint is here:
- A dict of tensors and plain containers only (dict, list, tuple, str, int, float, bool, None), so that it
  loads with `torch.load(weights_only=True)`: loading cannot run code. `save_checkpoint` refuses anything else
  (the reference pickled an argparse.Namespace, which torch >= 2.6 refuses to load by default).
- Written atomically (temporary file + rename): a killed run leaves the previous checkpoint intact.
- Checked on load: each tensor's CRC-32, stored under 'checksums' when saved (torch.load does not check the CRC of
  its zip records: a flipped byte loads silently), and every floating-point value finite. Files without checksums
  (older ones, released ones) still load.

Old pickled checkpoints are converted once, by someone who trusts the file:
`disploss convert-checkpoint IN OUT --trust` (disploss.checkpoint.convert).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from disploss.errors import MissingFileError, NonFiniteWeightsError, UsageError
from disploss.fileio import atomic_path
from disploss.statedict import first_nonfinite, iter_tensors
from disploss.statedict import tensor_crc32 as _crc32

CONVERT_COMMAND = "disploss convert-checkpoint IN OUT --trust"
PLAIN_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(UsageError, ValueError):
    """A checkpoint file that cannot be used (base class of the errors below)."""


class UnsafeCheckpointError(CheckpointError):
    """The file is a pickle that carries code (or classes) and was refused by the weights-only loader."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty, or not a PyTorch checkpoint at all."""


class NonFiniteCheckpointError(CorruptCheckpointError, NonFiniteWeightsError):
    """The file holds NaN or infinite values (a diverged run's weights, or damage)."""


class CheckpointWriteError(UsageError, OSError):
    """The checkpoint could not be written (a full disk, a quota, an I/O error); nothing was left behind.

    Built as CheckpointWriteError(errno, message); prints as the message alone."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


CHECKSUMS_KEY = "checksums"
CHECKSUM_ALGORITHM = "crc32"


def _tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    # Every tensor of a plain checkpoint with its place, its own checksums left out.
    return iter_tensors(obj, where, skip=(CHECKSUMS_KEY,))


def tensor_checksums(state: Mapping[str, Any]) -> dict:
    """{'algorithm': 'crc32', 'tensors': {place: crc}} over every tensor of `state` (what save_checkpoint stores)."""
    return {"algorithm": CHECKSUM_ALGORITHM, "tensors": {where: _crc32(t) for where, t in _tensors(state, "")}}


def verify_checkpoint(state: Any, path: str | os.PathLike = "checkpoint") -> None:
    """Check the stored checksums (if any) and that every floating-point tensor is finite.

    Raises:
        CorruptCheckpointError: a tensor whose bytes changed since it was saved, or one missing or added.
        NonFiniteCheckpointError: naming the file and the first tensor holding NaN or infinity, with the counts.
    """
    if not isinstance(state, Mapping):
        return
    stored = state.get(CHECKSUMS_KEY)
    tensors = dict(_tensors(state, ""))
    if isinstance(stored, Mapping) and stored.get("algorithm") == CHECKSUM_ALGORITHM:
        expected = stored.get("tensors", {})
        if expected.keys() != tensors.keys():
            missing = sorted(set(expected) - set(tensors)) or sorted(set(tensors) - set(expected))
            raise CorruptCheckpointError(
                f"checkpoint {path} does not hold the tensors it was saved with ({missing[0]})"
            )
        for where, tensor in tensors.items():
            if _crc32(tensor) != expected[where]:
                raise CorruptCheckpointError(
                    f"checkpoint {path} is damaged: the bytes of {where} differ from those saved (CRC-32 mismatch); "
                    "use an earlier checkpoint"
                )
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"checkpoint {path} holds non-finite values in {bad}: its run had diverged, or the file is damaged; use "
            "an earlier checkpoint"
        )


def _check_plain(obj: Any, where: str) -> None:
    # Exact types on purpose: subclasses (namedtuple, numpy.float64, Path...) are pickled as their own class,
    # which the weights-only loader refuses. torch.Size / dtype / device are allow-listed by torch itself.
    if isinstance(obj, torch.Tensor) or type(obj) in PLAIN_SCALARS:
        return
    if isinstance(obj, (torch.Size, torch.dtype, torch.device)):
        return
    if type(obj) in (dict, collections.OrderedDict):
        for key, value in obj.items():
            if type(key) not in PLAIN_SCALARS:
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
    hint = (
        " (use vars(args) or dataclasses.asdict(config))"
        if isinstance(obj, argparse.Namespace) or (dataclasses.is_dataclass(obj))
        else ""
    )
    raise TypeError(
        f"checkpoint entry {where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints may hold only "
        f"tensors and plain containers (dict, list, tuple, str, int, float, bool, None){hint}"
    )


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], checksums: bool = False) -> Path:
    """Write `state` to `path` atomically, after checking that it holds only what `weights_only=True` loads.

    Args:
        path: destination file (its folder is created if needed).
        state: dict of tensors and plain containers (dict, list, tuple, str, int, float, bool, None),
            e.g. {"model": ..., "ema": ..., "opt": ..., "args": vars(args), "train_steps": 50000}.
        checksums: also store each tensor's CRC-32 under 'checksums' (`verify_checkpoint` checks them on load;
            training checkpoints do; off by default so that a converted file keeps the layout it came in).
    Returns:
        The path written.
    Raises:
        TypeError: naming the key path of the first entry that is not plain, e.g. `state['args']`.
        CheckpointWriteError: torch's writer failed (e.g. a full disk); the OSError of a Python-level write
            failure passes through. Either way the destination is untouched and no temporary file remains.
    """
    if type(state) not in (dict, collections.OrderedDict):
        raise TypeError(f"a checkpoint must be a dict, got {type(state).__qualname__}")
    _check_plain(state, "state")
    if checksums:
        state = {**state, CHECKSUMS_KEY: tensor_checksums(state)}
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as err:
        # torch's own writer reports a failed write (a full disk: "[enforce fail at inline_container.cc] unexpected
        # pos", "PytorchStreamWriter failed writing file") as a RuntimeError without the errno.
        if not _WRITE_FAILURE.search(str(err)):
            raise
        raise _write_error(path, state, err) from err
    return path


_WRITE_FAILURE = re.compile(r"PytorchStreamWriter failed|unexpected pos|file write failed|inline_container", re.I)


def _write_error(path: Path, state: Mapping[str, Any], err: BaseException) -> CheckpointWriteError:
    import errno
    import shutil

    needed = sum(t.numel() * t.element_size() for _, t in _tensors(state, ""))
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < needed:
        return CheckpointWriteError(
            errno.ENOSPC, f"No space left on device ({free} bytes free in {path.parent}, the checkpoint needs {needed})"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointWriteError(errno.EIO, f"writing failed ({free} bytes free in {path.parent}; torch: {first})")


def _unpickler_reason(message: str) -> str:
    # torch's message is long; keep the one line that says which global or opcode was refused.
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    if not match:
        return message.strip().splitlines()[0] if message.strip() else "refused by the weights-only unpickler"
    reason = match.group(1).strip()
    reason = re.sub(r"\s+was not an allowed global by default.*", "", reason)
    return reason or "refused by the weights-only unpickler"


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _pickle_streams(path: Path) -> list:
    # The object pickle of a torch zip archive (`*/data.pkl`), or the file itself (a legacy torch file or a raw
    # pickle: genops reads one pickle up to its STOP, so its leading pickles are read in turn).
    import io
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [io.BytesIO(archive.read(n)) for n in archive.namelist() if n.endswith("data.pkl")]
    return [open(path, "rb")]


def pickled_globals(path: str | os.PathLike, max_pickles: int = 4) -> list[str]:
    """The `module.name` of every global (class or function) a checkpoint's pickle refers to, in order.

    Read with pickletools, which only decodes the opcodes: nothing in the file is imported or run.

    Args:
        path: a torch checkpoint (zip archive or legacy file) or a raw pickle.
        max_pickles: consecutive pickles read from a legacy file (magic number, protocol, system info, object).
    Returns:
        The names, each once, e.g. ["collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
        "argparse.Namespace"].
    """
    import pickletools

    names: list[str] = []
    for stream in _pickle_streams(Path(path)):
        with stream:
            for _ in range(max_pickles):
                memo: dict = {}
                recent: list = []  # the last pushed strings, for STACK_GLOBAL (protocol 4+)
                try:
                    for op, arg, _pos in pickletools.genops(stream):
                        if op.name == "GLOBAL":
                            names.append(_python3_name(*arg.split(" ", 1)))
                        elif op.name == "STACK_GLOBAL" and len(recent) >= 2:
                            names.append(f"{recent[-2]}.{recent[-1]}")
                        if op.name in _STRING_OPS:
                            recent.append(arg)
                        elif op.name in _GET_OPS:
                            recent.append(memo.get(arg))
                        elif op.name == "MEMOIZE":
                            memo[len(memo)] = recent[-1] if recent else None
                        elif op.name in _PUT_OPS:
                            memo[arg] = recent[-1] if recent else None
                        elif op.name not in ("FRAME", "PROTO"):
                            recent.append(None)
                except Exception:  # the end of the pickles, or bytes that are not a pickle: stop reading
                    break
    return list(dict.fromkeys(n for n in names if n))


def _python3_name(module: str, name: str) -> str:
    # Protocol 2 pickles name Python 2 modules (__builtin__.long): the names unpickling maps them to.
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def refused_globals(path: str | os.PathLike) -> list[str]:
    """The globals of a checkpoint that `torch.load(weights_only=True)` refuses (its allow-list, plus the ones
    added with torch.serialization.add_safe_globals), e.g. ["argparse.Namespace"]."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        allowed = set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except (ImportError, AttributeError):  # another torch: its documented defaults, roughly
        allowed = {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set"}
    refused = []
    for name in pickled_globals(path):
        if name in allowed or (not allowed and name.startswith("torch.")):
            continue
        refused.append(name)
    return refused


def _refusal_reason(path: Path, err: BaseException | None) -> str:
    """What the weights-only loader refused in `path`: the refused globals by name, else torch's own reason."""
    try:
        refused = refused_globals(path)
    except OSError:
        refused = []
    if refused:
        shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
        return f"refused global{'s' if len(refused) > 1 else ''}: {shown}"
    return _unpickler_reason(str(err)) if err is not None else "pickled Python objects"


def _looks_like_pickle_container(path: Path) -> bool:
    # A torch zip archive or a raw/legacy pickle (protocol >= 2 starts with 0x80): a refusal by the weights-only
    # unpickler then means "carries code"; for anything else it means "not a checkpoint".
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", verify: bool = True) -> dict:
    """Load a checkpoint with `torch.load(weights_only=True)`: loading never runs code from the file.

    Args:
        path: a `.pt` file written by `save_checkpoint` (or any plain torch checkpoint, e.g. the released ones).
        map_location: passed to torch.load ("cpu" by default).
        verify: check the stored checksums and that every floating-point value is finite (`verify_checkpoint`).
    Returns:
        The stored object (normally a dict), without its 'checksums'.
    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file pickles classes or code (e.g. an argparse.Namespace of an old train.py);
            the message gives the command that converts a TRUSTED file.
        CorruptCheckpointError: the file is empty, truncated or not a PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
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
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not _looks_like_pickle_container(path):
            raise CorruptCheckpointError(f"{path} is not a PyTorch checkpoint ({_unpickler_reason(str(err))})") from err
        raise UnsafeCheckpointError(
            f"{path} is not a plain checkpoint: it holds pickled Python objects "
            f"({_refusal_reason(path, err)}), and loading it could run code, so it was refused for safety. "
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
    if verify:
        verify_checkpoint(state, path)
    if isinstance(state, dict):
        state.pop(CHECKSUMS_KEY, None)
    return state


def import_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a safetensors file and the model configuration stored in its metadata.

    Args:
        path: a `.safetensors` file (ours, or any other: the config is then {}).
    Returns:
        (tensors by name as stored, config dict: SiT constructor arguments plus "model_name" when known).
    Raises:
        CorruptCheckpointError: an unreadable file; NonFiniteCheckpointError: naming the first tensor holding NaN or
            infinity.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise CorruptCheckpointError(f"cannot read safetensors file {path}: {err}") from err
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"{path} holds non-finite values in {bad}: its run had diverged, or the file is damaged; use weights "
            "from an earlier checkpoint"
        )
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
