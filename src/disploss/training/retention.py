"""Which checkpoints a run keeps: `--keep-last K` (the newest K) and `--keep-every N` (milestones kept for ever).

Applied by rank 0 only after a new checkpoint is complete (renamed into place), so a failed or killed save never
costs an older checkpoint. The default keeps every checkpoint, as the reference does.
"""

from __future__ import annotations

from pathlib import Path


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
