"""Is the process behind a lock or a claim still running? (Linux /proc; elsewhere only os.kill's answer.)

A pid can be reused after its process ends: a lock records the process's start time (field 22 of /proc/PID/stat,
clock ticks since boot) and the boot id beside the pid, so a new process that got the same number is told apart.
"""

from __future__ import annotations

import os

__all__ = ["boot_id", "pid_alive", "process_start"]


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str | None:
    """This boot's id (a pid and its start time mean nothing across reboots); None where /proc cannot tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_alive(pid: int, start: int | str | None) -> bool:
    """True when process `pid` runs on this machine and, if `start` is known, is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = process_start(pid)
    return start is None or now is None or str(now) == str(start)
