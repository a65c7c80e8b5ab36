"""The experiment folder of a training run: race-free creation, pre-flight checks of the disk, and the lock that
gives a folder to one job at a time (RunLock).

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

from disploss import distributed as dist
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
    """Estimated size of one training checkpoint of `model`: model + EMA copy (+ two Adam moments and a step).

    Args:
        model: the (unwrapped) model.
        with_opt: count the AdamW state: two moments and a 0-d step per trainable parameter (frozen ones such as
            pos_embed get none).
    Returns:
        Bytes: the tensors, ~512 bytes per tensor for its zip record, pickle entry and checksum, and 64 KiB for the
        args and the random states (within 0.4% of a real SiT-T/2 checkpoint, above it).
    """
    state = list(model.state_dict().values())
    total = 2 * sum(t.numel() * t.element_size() for t in state)  # model + ema
    records = 2 * len(state)
    if with_opt:
        trainable = [p for p in model.parameters() if p.requires_grad]
        total += sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
        records += 3 * len(trainable)
    return int(total + 512 * records + (64 << 10))


# -- the run folder -----------------------------------------------------------------------------------------------
def prepare_run_dir(cfg, resume, model: torch.nn.Module, is_main: bool, on_exit):
    """Rank 0 checks the disk, creates a new experiment folder (or takes the resumed one) and locks it for this
    job (the lock is released by `on_exit`, a contextlib.ExitStack); every rank gets the path, or rank 0's error
    to raise, so that no rank waits forever for a folder that never comes.

    Returns:
        (run folder, its RunLock on rank 0 / None elsewhere).
    """
    import sys

    from disploss.training.run.lock import RunLock

    result: str | Exception | None = None
    lock = None
    run_dir = resume.run_dir
    if is_main:
        try:
            # Before anything is created: an unwritable --results-dir or a full disk stops the run here. Two
            # checkpoints fit at once: the last one and the one being written beside it; their real size is the
            # resumed checkpoint's, else the estimate from the model and the optimizer state.
            size = Path(resume.path).stat().st_size if resume.step else checkpoint_size_bytes(model)
            check_writable(run_dir or cfg.results_dir, min_free_bytes=2 * size)
            if run_dir is None:
                # A MeanFlow run says so in its folder's name: 000-SiT-B-2-Linear-meanflow-None
                prediction = cfg.prediction if cfg.objective == "flow" else "meanflow"
                run_dir = create_experiment_dir(cfg.results_dir, cfg.model, cfg.path_type, prediction, cfg.loss_weight)
            lock = RunLock(run_dir, notify=lambda line: print(line, file=sys.stderr, flush=True)).acquire()
            on_exit.callback(lock.release)
            _remove_stale_temporaries(run_dir / "checkpoints")  # after the lock: never another job's save
            result = str(run_dir)
        except Exception as err:  # raised below, on every rank
            result = err
    result = dist.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return Path(result), lock


def _remove_stale_temporaries(checkpoint_dir: Path) -> None:
    # A run killed while writing a checkpoint leaves `.{step:07d}.pt.*.tmp` (as big as a checkpoint); nothing
    # reads them, and repeated kills would fill the disk.
    for tmp in checkpoint_dir.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
