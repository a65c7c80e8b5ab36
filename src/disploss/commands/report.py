"""How a command ends: a user's mistake is one line `disploss CMD: error: ...` and exit status 2; anything else
keeps its traceback."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from disploss.errors import UsageError

# A full or read-only disk, or a folder without permission, is the user's to fix, not a bug.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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
    """`disploss COMMAND: error: MESSAGE` on stderr."""
    message = err if isinstance(err, str) else one_line(err)
    print(f"disploss {command}: error: {message}", file=sys.stderr, flush=True)


def guarded(command: str, fn: Callable[[], int | None]) -> int:
    """Run fn(); a user error becomes the one-line message and status 2, anything else propagates."""
    try:
        return int(fn() or 0)
    except Exception as err:
        if not is_user_error(err):
            raise
        print_error(command, err)
        return 2
