"""How a command ends: a user's mistake is one line `disploss CMD: error: ...` and exit status 2; anything else
keeps its traceback.

Under torchrun a mistake that every process finds is printed once, by the lowest failing rank (normally 0):
the others raise `disploss.distributed.StoppedByAnotherProcess` and print nothing. Each failing process also
writes its line to torchrun's error file (TORCHELASTIC_ERROR_FILE), so the launcher's closing `ChildFailedError`
summary shows that line instead of "Signal 6" or a link to the elastic docs; the summary itself, and the
launcher's traceback above it, are torchrun's and cannot be turned off from a worker.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable

from disploss.distributed import StoppedByAnotherProcess
from disploss.errors import UsageError

# A full or read-only disk, a folder without permission, or a path through a regular file (or naming a folder
# where a file is written) is the user's to fix, not a bug.
USER_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
    errno.ENAMETOOLONG,
}  # fmt: skip
QUIET_EXIT_DELAY_S = 3.0  # how long a quiet process waits for the reporting one to exit first (under torchrun)


def is_user_error(err: BaseException) -> bool:
    """UsageError (every error the library raises for a bad flag or input), a missing or forbidden file, or a
    full / read-only disk."""
    if isinstance(err, (UsageError, FileNotFoundError, PermissionError)):
        return True
    return isinstance(err, OSError) and err.errno in USER_ERRNOS


def one_line(err: BaseException) -> str:
    """The message of `err` on one line; for an error re-raised from a DataLoader worker (whose message is
    the worker's whole traceback), the original exception's own message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # "pkg.UnreadableImageError: msg" -> msg
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def print_error(command: str, err: BaseException | str) -> None:
    """`disploss COMMAND: error: MESSAGE` on stderr (and in torchrun's error file); nothing is printed for an
    error that another process reports (`StoppedByAnotherProcess`)."""
    message = err if isinstance(err, str) else one_line(err)
    if not isinstance(err, StoppedByAnotherProcess):
        line = f"disploss {command}: error: {message}"
        print(line, file=sys.stderr, flush=True)
        write_launcher_error_file(line)
        return
    write_launcher_error_file(f"disploss {command}: stopped: process {err.rank} reported the error", later=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # Let the reporting process exit first: torchrun then names it as the root cause of the failure (and
        # stops this one); the wait ends there, or after QUIET_EXIT_DELAY_S if it does not come.
        time.sleep(QUIET_EXIT_DELAY_S)


def write_launcher_error_file(line: str, later: bool = False) -> None:
    """Give torchrun's failure summary this process's one line (no-op outside torchrun).

    The format is the one torch.distributed.elastic's ErrorHandler writes; its `py_callstack` is what the
    summary shows as `traceback :`. torchrun names the failure with the earliest timestamp (in seconds) the
    root cause; `later` dates this one a second late, for a process that stops because of another's error.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()) + int(later))
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": stamp}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then falls back to torchrun's own text; the line was printed already


def guarded(command: str, fn: Callable[[], int | None]) -> int:
    """Run fn(); a user error becomes the one-line message and status 2, anything else propagates."""
    try:
        return int(fn() or 0)
    except Exception as err:
        if not is_user_error(err):
            raise
        print_error(command, err)
        return 2
