"""Finding checkpoints: `{run_dir}/checkpoints/{step:07d}.pt` (the reference's names), the newest complete one
of a folder, and the newest one over the run folders of a --results-dir (`--ckpt latest`)."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from disploss.checkpoint.io import CheckpointError, CorruptCheckpointError, load_checkpoint

_CKPT_NAME = re.compile(r"^(\d+)\.pt$")


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
    for _step, path in _candidates(Path(checkpoint_dir)):
        ok = _is_complete(path)
        if ok and full_check:
            try:
                load_checkpoint(path)
            except (CheckpointError, OSError):
                ok = False
        if ok:
            return path
        warnings.warn(
            f"skipping incomplete or corrupt checkpoint {path}; trying the previous one", RuntimeWarning, stacklevel=2
        )
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
    for _step, path in _candidates(Path(checkpoint_dir)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CorruptCheckpointError as err:
            warnings.warn(f"skipping corrupt checkpoint: {err}; trying the previous one", RuntimeWarning, stacklevel=2)
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
    runs = latest_of_runs(results_dir, model_name)
    return runs[0] if runs else None


def latest_of_runs(results_dir: str | os.PathLike, model_name: str) -> list[Path]:
    """The newest complete checkpoint of each experiment folder of `model_name` in `results_dir`, newest first
    (the order of `find_latest_run`); folders without one are left out."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    pattern = _run_folder_pattern(model_name)
    found: list[tuple[float, int, int, Path]] = []
    for folder in results_dir.iterdir():
        match = pattern.match(folder.name)
        if not match or not folder.is_dir():
            continue
        path = find_latest(folder / "checkpoints")
        if path is not None:
            found.append((path.stat().st_mtime, int(match.group(1)), checkpoint_step(path) or 0, path))
    return [entry[3] for entry in sorted(found, key=lambda e: e[:3], reverse=True)]
