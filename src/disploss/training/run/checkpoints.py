"""A run's checkpoints: `save_training_checkpoint` (every process's random state, rank 0 writes atomically with
checksums, a failed write is one line naming the last good checkpoint on every process), which checkpoints a
run keeps: `--keep-last K` (the newest K) and `--keep-every N` (milestones kept for ever), and
`names_the_last_checkpoint`: a full disk met by any other write of the run (log.txt, metrics.jsonl, a sample grid,
config.json, the loss curve) names the last good checkpoint too.

Retention is applied by rank 0 only after a new checkpoint is complete (renamed into place), so a failed or killed
save never costs an older checkpoint. The default keeps every checkpoint, as the reference does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.errors import UsageError

CHECKPOINT_FORMAT = "disploss-train-v1"


# -- checkpoints --------------------------------------------------------------------------------------------------
def save_training_checkpoint(
    run_dir: Path, step: int, epoch: int, model, ema, opt, config: dict, device, world: int, skipped: int, logger,
    lock=None,
) -> Path:  # fmt: skip
    """Every process sends its random state; rank 0 writes `checkpoints/{step:07d}.pt` atomically, with each
    tensor's checksum, then applies --keep-last / --keep-every; every process gets rank 0's outcome, so a failed
    write (a full disk: one line naming the last good checkpoint) stops them all instead of leaving them waiting.

    Returns:
        The checkpoint's path.
    """
    from disploss.checkpoint import checkpoint_path, save_checkpoint
    from disploss.training.run.resume import rng_state

    rng = [rng_state(device)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = [{k: v.cpu() for k, v in s.items()} for s in gathered]
    path = checkpoint_path(run_dir / "checkpoints", step)
    error: Exception | None = None
    if dist.is_main():
        try:
            if lock is not None:
                lock.check()  # never write into a folder another job took over
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": config,
                "step": step, "epoch": epoch, "rng": rng, "skipped_steps": skipped, "format": CHECKPOINT_FORMAT,
            }  # fmt: skip
            save_checkpoint(path, state, checksums=True)
            logger.info(f"saved checkpoint {path}")
            prune_checkpoints(path.parent, config.get("keep_last"), config.get("keep_every"), step, logger)
        except OSError as err:
            error = _write_failure(path, err)
        except Exception as err:  # sent to the other processes, then raised here with its traceback
            error = err
    if world > 1:  # also the barrier after rank 0's write
        sent = error if error is None or isinstance(error, (OSError, UsageError)) else RuntimeError(
            f"process 0 failed to write checkpoint {path}: {type(error).__name__}: {error}"
        )  # fmt: skip
        shared = dist.broadcast_object(sent)
        if not dist.is_main() and shared is not None:  # printed once, by rank 0; the others stop quietly
            error = dist.StoppedByAnotherProcess(f"stopped: process 0 failed ({shared})", 0)
    if error is not None:
        raise error
    return path


def _write_failure(path: Path, err: OSError) -> Exception:
    """A one-line error for a checkpoint that could not be written, naming the last good one."""
    import errno

    from disploss.checkpoint import CheckpointWriteError, find_latest

    if not isinstance(err, CheckpointWriteError) and err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return err
    last = find_latest(path.parent)
    return CheckpointWriteError(
        err.errno or errno.EIO,
        f"cannot write checkpoint {path}: {err.strerror or err}; the last good checkpoint is "
        f"{last if last is not None else 'none yet'}: free some space (or pass --keep-last K), then run the same "
        "command with --ckpt latest",
    )


class RunDiskFullError(UsageError, OSError):
    """A write of a training run failed for lack of space; the message names the file, the space and the last good
    checkpoint. Built as RunDiskFullError(errno, message)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextlib.contextmanager
def names_the_last_checkpoint(run_dir: Path) -> Iterator[None]:
    """Inside: a full disk or quota (an OSError with ENOSPC / EDQUOT, e.g. a disploss.fileio.DiskFullError naming the
    file) becomes one line that also names the last good checkpoint of `run_dir` and how to continue; a checkpoint
    write says so already (save_training_checkpoint) and passes through."""
    from disploss.fileio import DISK_FULL_ERRNOS

    try:
        yield
    except OSError as err:
        from disploss.checkpoint import CheckpointWriteError, find_latest

        if isinstance(err, (CheckpointWriteError, RunDiskFullError)) or err.errno not in DISK_FULL_ERRNOS:
            raise
        last = find_latest(Path(run_dir) / "checkpoints")
        what = str(err) if err.filename is None or str(err.filename) in str(err) else f"{err.filename}: {err}"
        raise RunDiskFullError(
            err.errno,
            f"{what}; the last good checkpoint is {last if last is not None else 'none yet'}: free some space (or pass "
            "--keep-last K), then run the same command with --ckpt latest",
        ) from err


# -- retention ----------------------------------------------------------------------------------------------------
def checkpoints_to_remove(steps: list[int], keep_last: int | None, keep_every: int | None, newest: int) -> list[int]:
    """The steps to delete among `steps`.

    Args:
        steps: the steps of the complete checkpoints in the folder.
        keep_last: keep the K highest steps (None: keep all).
        keep_every: keep the steps divisible by N (None: no milestones).
        newest: the step just written, never removed (even if a higher one was left by an abandoned run).
    Returns:
        Steps to remove, ascending.
    """
    if keep_last is None:
        return []
    kept = set(sorted(steps, reverse=True)[:keep_last]) | {newest}
    if keep_every is not None:
        kept |= {s for s in steps if s % keep_every == 0}
    return sorted(s for s in steps if s not in kept)


def prune_checkpoints(
    checkpoint_dir: Path, keep_last: int | None, keep_every: int | None, newest: int, logger=None
) -> list[Path]:
    """Delete the checkpoints of `checkpoint_dir` that `checkpoints_to_remove` names; returns their paths."""
    from disploss.checkpoint import checkpoint_path, checkpoint_step

    steps = [s for s in (checkpoint_step(p) for p in Path(checkpoint_dir).iterdir()) if s is not None]
    removed = []
    for step in checkpoints_to_remove(steps, keep_last, keep_every, newest):
        path = checkpoint_path(checkpoint_dir, step)
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed and logger is not None:
        logger.info(f"removed {len(removed)} old checkpoint(s) (--keep-last {keep_last}): {removed[0].name} ...")
    return removed
