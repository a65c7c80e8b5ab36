"""Stopping a run cleanly on a signal, and time-based checkpoints.

- SIGTERM (what SLURM and Kubernetes send before they preempt; SIGKILL follows after a grace period) and SIGUSR1
  (what SLURM sends ahead of the time limit with `--signal=USR1@120`): every process finishes its current step,
  rank 0 writes a checkpoint at that step, the log says why the run stopped, and the process exits with status
  75 (EXIT_PREEMPTED). The same command with `--ckpt latest` continues exactly.
- SIGINT (Ctrl-C): the same, exit status 130 (EXIT_INTERRUPTED) and a one-line message instead of a traceback. A
  second Ctrl-C, SECOND_SIGINT_S or more after the first (torchrun forwards the terminal's at once), stops at once
  without a checkpoint. A process stuck inside a collective runs no Python handler at all: only SIGKILL ends it.
- Before the first step nothing is lost: SIGINT raises KeyboardInterrupt and SIGTERM / SIGUSR1 raise `Stopped`
  at once, so a run waiting on a download or a lock stops without delay.

Why 75: it is EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"), distinct from 0 (done),
1 (non-finite loss), 2 (a user error) and from the 128 + N a shell reports for a process killed by signal N (137,
143: killed without a checkpoint). A requeue wrapper, or a Kubernetes podFailurePolicy on exit code 75, can tell
"stopped cleanly, run the same command again" from a failure. A person's Ctrl-C gets the shell's 130: nothing
should requeue what a person stopped.

Agreement: a signal may reach the processes of a torchrun job at different steps (or only some of them). After
every step each process contributes [the signal it received, whether --ckpt-every-minutes is due on its clock] to
one all-reduce (MAX) of two int64 on the CPU (gloo) and all act on the result, so they checkpoint and stop at the
same step. With NCCL the reduction runs on a separate gloo group, so it never waits for the GPU stream. Cost:
one small CPU collective per step, 0.4-0.5 ms for 2 processes on our loaded 2-core CPU (BENCHMARKS.md), under
0.1% of a SiT-XL/2 step on a GPU; a single process does no collective.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from disploss import distributed as dist

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped cleanly with a checkpoint; run the same command again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
SECOND_SIGINT_S = 2.0  # a later SIGINT is a second Ctrl-C, not the copy torchrun forwards
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "STOP_SIGNALS", "StopPoll", "Stopped", "stop_signals"]


class Stopped(BaseException):
    """The run stopped on a signal before its last step (not an error: the command exits with `exit_status`).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.

    Attributes:
        signal_name: "SIGTERM", "SIGUSR1" or "SIGINT".
        step: the step of the checkpoint written, or None when it stopped before the first step.
        checkpoint: that checkpoint's path (None before the first step).
        exit_status: EXIT_PREEMPTED, or EXIT_INTERRUPTED for SIGINT.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint=None, again: bool = False):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint = step, checkpoint
        self.exit_status = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED
        if again:
            text = f"stopped by a second {self.signal_name} at once, without a checkpoint; the last one written stays"
        elif step is None:
            text = f"stopped by {self.signal_name} before the first step; nothing to save"
        else:
            text = (
                f"stopped by {self.signal_name} at step {step}; checkpoint {checkpoint} written; run the same "
                "command with --ckpt latest to continue"
            )
        super().__init__(text)


class _Received:
    """The first stop signal this process received, and whether the loop has started (armed)."""

    def __init__(self):
        self.signum = 0
        self.armed = False
        self.first_sigint: float | None = None

    def handler(self, signum, frame):
        if not self.armed:  # nothing trained yet: stop now instead of after setup (once: then only the flag)
            self.armed = True
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Stopped(signum)
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.first_sigint is not None and now - self.first_sigint >= SECOND_SIGINT_S:
                raise Stopped(signum, again=True)
            self.first_sigint = self.first_sigint or now
        self.signum = self.signum or signum


_received: _Received | None = None


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Handle SIGTERM, SIGUSR1 and SIGINT as described above while the block runs; the previous handlers come
    back afterwards. Outside the main thread (where Python cannot set handlers) it does nothing."""
    global _received
    if threading.current_thread() is not threading.main_thread() or _received is not None:
        yield
        return
    _received = _Received()
    previous = {s: signal.signal(s, _received.handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None


@dataclass(frozen=True)
class Decision:
    """What every process does after a step: `save` a checkpoint now (a signal or the clock), `signum`: stop
    after it (0: go on)."""

    save: bool
    signum: int


class StopPoll:
    """After each step: did any process receive a stop signal, or is a time-based checkpoint due on any clock?

    Creating it arms the signal handlers (from then on a signal only sets a flag that `poll` reads); all
    processes must create it (a collective with NCCL) and call `poll` after every step.

    Args:
        ckpt_every_minutes: minutes between time-based checkpoints (None: none).
        world_size: number of processes.
    """

    def __init__(self, ckpt_every_minutes: float | None, world_size: int):
        self.interval_s = None if ckpt_every_minutes is None else 60.0 * ckpt_every_minutes
        self.last_save = self._now()
        self.group = None
        self.collective = world_size > 1 and dist.is_initialized()
        if self.collective and torch.distributed.get_backend() != "gloo":
            self.group = torch.distributed.new_group(backend="gloo")  # CPU tensors: no wait on the GPU stream
        if _received is not None:
            _received.armed = True

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def poll(self) -> Decision:
        """One all-reduce (MAX) of [signal, time due] over the processes; the same Decision on all of them."""
        signum = _received.signum if _received is not None else 0
        due = self.interval_s is not None and self._now() - self.last_save >= self.interval_s
        if self.collective:
            flags = torch.tensor([signum, int(due)], dtype=torch.int64)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
            signum, due = int(flags[0]), bool(flags[1])
        return Decision(save=bool(signum) or due, signum=signum)

    def saved(self) -> None:
        """A checkpoint was written: the --ckpt-every-minutes clock starts again."""
        self.last_save = self._now()
