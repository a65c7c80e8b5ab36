"""A thin distributed layer: torchrun (any number of nodes) or a single process without torchrun.

NCCL on CUDA, gloo on CPU. Rank-0-only file I/O is followed by `barrier()`. Every helper works (and is
cheap) when no process group exists, so library code calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from disploss.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, rank on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set), else run as one process.

    Args:
        device: "cuda", "cpu" or None (CUDA when available).
        timeout_minutes: collective timeout, generous because rank 0 may write a checkpoint meanwhile.
    Returns:
        DistInfo. On CUDA the process is bound to cuda:{LOCAL_RANK}, which is right on every node of a
        multi-node job (the reference used the global rank and broke there).
    """
    from disploss.runtime import resolve_device

    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            from disploss.errors import ConfigError

            raise ConfigError(
                f"--device cuda: this process is LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible; start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over processes (a new tensor; `x` is left as it is)."""
    x = x.detach().clone()
    if is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= get_world_size()
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over processes (a new tensor)."""
    x = x.detach().clone()
    if is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every process and return it."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class StoppedByAnotherProcess(UsageError):
    """Raised by `on_every_rank` on the processes whose error (or success) another process reports: the
    commands print nothing for it, so that a mistake made on every process is printed once."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def on_every_rank(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn(*args, **kwargs) on every process; if it raises on any of them, raise on all of them.

    The lowest failing rank raises its own exception (which the command prints); the others raise
    StoppedByAnotherProcess, which the commands do not print. So a mistake every process finds (a flag, the
    data folder, an unreachable hub, a run folder rank 0 could not create) is reported once, and no process
    goes on into a collective that the failed ones never join. Every process must call it at the same point
    (it is a collective). In one process it is fn itself.
    """
    if not is_initialized() or get_world_size() == 1:
        return fn(*args, **kwargs)
    error: BaseException | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except Exception as err:
        error = err
    summaries: list = [None] * get_world_size()
    dist.all_gather_object(summaries, None if error is None else f"{type(error).__name__}: {error}")
    failed = [rank for rank, summary in enumerate(summaries) if summary is not None]
    if not failed:
        return result
    first = failed[0]
    if first == get_rank():
        raise error
    raise StoppedByAnotherProcess(f"stopped: process {first} failed ({summaries[first]})", first) from error


def alike_on_every_rank(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn(*args, **kwargs), whose outcome is the same on every process (it reads only the command's flags, e.g.
    building a config), before any process group exists: a UsageError is raised as it is by rank 0 and as
    StoppedByAnotherProcess by the others, so that under torchrun it is printed once. Outside torchrun it is fn."""
    try:
        return fn(*args, **kwargs)
    except UsageError as err:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
            raise StoppedByAnotherProcess(f"stopped: process 0 reports the error ({err})", 0) from err
        raise


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) of every process along dim 0; gradients flow back to the local part only.

    Every process must pass the same shape. In one process this returns `x` itself.
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[get_rank()] = x  # keep the autograd edge for the local slice
    return torch.cat(parts, dim=0)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
