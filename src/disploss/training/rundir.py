"""The experiment folder of a training run: race-free creation and pre-flight checks of the disk.

Layout (the reference's): `{results_dir}/{index:03d}-{model with / replaced by -}-{path}-{prediction}-{loss_weight}/`
with `checkpoints/` inside. Only rank 0 creates it; the other ranks receive the path (e.g. with
`disploss.distributed.broadcast_object`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from disploss.errors import UsageError

__all__ = [
    "experiment_name",
    "create_experiment_dir",
    "check_writable",
    "checkpoint_size_bytes",
    "format_bytes",
    "NotWritableError",
    "InsufficientDiskSpaceError",
]


class NotWritableError(UsageError, PermissionError):
    """A folder in which the run cannot create files."""


class InsufficientDiskSpaceError(UsageError, OSError):
    """Less free disk space than a run needs."""


def experiment_name(index: int, model: str, path_type: str, prediction: str, loss_weight: str | None) -> str:
    """`{index:03d}-{model with / replaced by -}-{path_type}-{prediction}-{loss_weight}` (None prints as None)."""
    return f"{index:03d}-{model.replace('/', '-')}-{path_type}-{prediction}-{loss_weight}"


def create_experiment_dir(
    results_dir: str | os.PathLike,
    model: str,
    path_type: str,
    prediction: str,
    loss_weight: str | None,
) -> Path:
    """Create a new experiment folder (with `checkpoints/`) and return it; two runs never get the same one.

    The index starts, like the reference, at the number of entries already in `results_dir`; indices already
    used by an existing folder are skipped, and the folder is created with an exclusive `os.mkdir`, moving on to
    the next index when another process created it first.

    Args:
        results_dir: parent folder (created if missing).
        model: model name, e.g. "SiT-XL/2".
        path_type, prediction: transport settings, e.g. "Linear", "velocity".
        loss_weight: e.g. None, "velocity", "likelihood".
    Returns:
        Path of the new folder.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    entries = [e.name for e in results_dir.iterdir()]
    index = len(entries)
    used = {name[: name.index("-")] for name in entries if "-" in name}
    while True:
        if f"{index:03d}" in used:
            index += 1
            continue
        folder = results_dir / experiment_name(index, model, path_type, prediction, loss_weight)
        try:
            os.mkdir(folder)
        except FileExistsError:
            index += 1
            continue
        break
    (folder / "checkpoints").mkdir()
    return folder


def format_bytes(n: float) -> str:
    """Human-readable size, e.g. 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def check_writable(path: str | os.PathLike, min_free_bytes: int = 0) -> int:
    """Fail early when a run could not write into `path`: not creatable, not writable, or too little disk.

    The probe creates and deletes a small file (so it also catches read-only mounts and, unlike
    `os.access`, is right when running as root).

    Args:
        path: the folder (created if missing).
        min_free_bytes: bytes the run needs, e.g. a few times `checkpoint_size_bytes(model)`.
    Returns:
        Free bytes in the folder's file system.
    Raises:
        NotWritableError: naming the folder and the reason.
        InsufficientDiskSpaceError: naming the folder, the free bytes and the needed bytes.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotWritableError(f"cannot create the folder {path}: {err.strerror or err}") from err
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise NotWritableError(f"cannot write into the folder {path}: {err.strerror or err}") from err
    finally:
        try:
            probe.unlink()
        except FileNotFoundError:
            pass
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise InsufficientDiskSpaceError(
            f"not enough free disk space in {path}: {free} bytes free ({format_bytes(free)}), "
            f"{int(min_free_bytes)} bytes needed ({format_bytes(min_free_bytes)}); free some space or choose "
            "another --results-dir"
        )
    return free


def checkpoint_size_bytes(model: torch.nn.Module, with_opt: bool = True) -> int:
    """Estimated size of one training checkpoint of `model`: model + EMA copy (+ two Adam moments).

    Args:
        model: the (unwrapped) model.
        with_opt: count the AdamW state: two moments per trainable parameter (frozen ones such as pos_embed
            get none).
    Returns:
        Bytes, plus 1 MiB for the pickle, the args and the archive headers.
    """
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    total = 2 * state_bytes  # model + ema
    if with_opt:
        total += 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(total + (1 << 20))
