"""How a command ends: a user's mistake is one line `disploss CMD: error: ...` and exit status 2; anything else
keeps its traceback.

Under torchrun a mistake that every process finds is printed once, by the lowest failing rank (normally 0):
the others raise `disploss.distributed.StoppedByAnotherProcess` and print nothing. The reporting process writes its
line to torchrun's error file (TORCHELASTIC_ERROR_FILE), so the launcher's closing `ChildFailedError` summary names
it as the root cause instead of "Signal 6" or a link to the elastic docs. On one node the quiet processes exit with
status 0 at once and the reporting one a moment later, so the summary lists no other failure (no "Signal 15" entry
per process); across nodes they exit with 2 after it (an agent whose workers all succeed would wait at torchrun's
exit barrier for the failed node). The summary itself, and the launcher's traceback above it, are torchrun's and
cannot be turned off from a worker (35 lines: docs/operations.md, "Cheap checks first, reported once").
An argparse mistake (an unknown flag, a bad value) is one line too, without the usage block.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from disploss.distributed import StoppedByAnotherProcess
from disploss.errors import UsageError

# A full or read-only disk, a folder without permission, or a path through a regular file (or naming a folder
# where a file is written) is the user's to fix, not a bug.
USER_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
    errno.ENAMETOOLONG,
}  # fmt: skip
QUIET_EXIT_DELAY_S = 3.0  # across nodes: how long a quiet process waits for the reporting one to exit first
REPORT_EXIT_DELAY_S = 2.0  # on one node: how long the reporting process waits for the quiet ones to exit first


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _one_node() -> bool:
    return os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1")


def quiet_exit_status() -> int:
    """The exit status of a process that stops because another one reports the error: 0 on one node (torchrun
    then lists only the reporting process's failure), 2 across nodes."""
    return 0 if _one_node() else 2


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
        if _under_torchrun() and _one_node():
            time.sleep(REPORT_EXIT_DELAY_S)  # the quiet processes exit first: torchrun lists no failure of theirs
        return
    if _one_node():
        return  # exits with status 0 at once (quiet_exit_status)
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


def parser_error(prog: str, message: str) -> NoReturn:
    """argparse's error, on one line: `PROG: error: MESSAGE (PROG --help lists the flags)` and status 2, without the
    usage block (dozens of lines for `train`); under torchrun printed by rank 0 only (every process parses the same
    flags), the others leaving with `quiet_exit_status`."""
    if _under_torchrun() and os.environ.get("RANK", "0") != "0":
        sys.exit(quiet_exit_status())
    line = f"{prog}: error: {message} ({prog} --help lists the flags)"
    print(line, file=sys.stderr, flush=True)
    write_launcher_error_file(line)
    if _under_torchrun() and _one_node():
        time.sleep(REPORT_EXIT_DELAY_S)
    sys.exit(2)


def guarded(command: str, fn: Callable[[], int | None]) -> int:
    """Run fn(); a user error becomes the one-line message and status 2 (a process that stops because another
    reports the error: nothing printed, `quiet_exit_status`), anything else propagates."""
    try:
        return int(fn() or 0)
    except Exception as err:
        if not is_user_error(err):
            raise
        print_error(command, err)
        return quiet_exit_status() if isinstance(err, StoppedByAnotherProcess) else 2
