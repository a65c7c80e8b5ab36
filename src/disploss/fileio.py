"""Atomic file writes: every file a run writes goes through here, so no reader ever sees half a file.

Also the checks made before expensive work, which create nothing: that an output folder could be created and
written into, and that an output file would neither fail to be written nor overwrite an input.

Files get the mode a plain `open()` would give them (0644 under the usual umask 022), not mkstemp's 0600: the
checkpoints, grids and .npz files of a run are meant to be read by teammates and by other jobs.

A write that fails for lack of space (ENOSPC, EDQUOT) raises `DiskFullError`, one line naming the file, the space
free and the space it needed, instead of a bare "[Errno 28] No space left on device"; files that grow by lines
(`LineFile`: log.txt, metrics.jsonl) never keep half a line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from disploss.errors import ConfigError, UsageError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UsageError, OSError):
    """A file could not be written for lack of space (a full disk or a quota); nothing half-written was left.

    `strerror` is the reason with the space free and needed; str() is the whole line, naming the file.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def disk_full_error(path: str | os.PathLike, err: OSError, needed: int | None = None) -> DiskFullError:
    """The DiskFullError of a failed write of `path` (err: the OSError with ENOSPC or EDQUOT).

    Args:
        needed: the bytes the file needed when known (else unsaid).
    """
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free} bytes free in {folder}"
    except OSError:
        free = f"the free space of {folder} unknown"
    wanted = f", at least {needed} bytes needed" if needed is not None else ""
    reason = os.strerror(err.errno) if err.errno else "No space left on device"
    return DiskFullError(err.errno or errno.ENOSPC, f"{reason} ({free}{wanted})", str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The rename is atomic on POSIX file systems, so `path` either keeps its old content or gets the new one
    whole. On an exception the temporary file is removed and `path` is untouched; a full disk or quota is a
    `DiskFullError` naming `path` (with `size`, the bytes it needs when known, else those written before it failed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # writers that reopen the path by name (torch.save) keep this mode
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS or isinstance(err, DiskFullError):
            raise
        if size is None:
            with contextlib.suppress(OSError):
                size = tmp_path.stat().st_size  # what was written before it failed: at least that much is needed
                size = None if size == 0 else size
        raise disk_full_error(path, err, size) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the bits of the process's umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `mkdir(path)` gives a new folder: 0o777 without the bits of the process's umask."""
    return 0o777 & ~_umask()


def _umask() -> int:
    # Linux shows the umask in /proc without changing it; elsewhere set-and-restore (not thread-safe, but brief).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any], size: int | None = None) -> None:
    """Call `writer(tmp_path)` to produce the file, then move it atomically to `path` (`size`: its bytes, when known
    beforehand, for the message of a full disk)."""
    with atomic_path(path, size) as tmp:
        writer(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda p: p.write_bytes(data), len(data))


class LineFile:
    """A file that grows by whole lines (a log): each line is appended with one os.write on an O_APPEND descriptor
    (no buffer to flush), and a line that could not be written whole (a full disk) is cut off again, so that a
    reader, or a killed process, never leaves half a line.

    Args:
        path: the file, created if missing (with the mode `open()` would give it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, line: str) -> None:
        """Append `line` (which ends with a newline) whole, or not at all.

        Raises:
            DiskFullError: naming the file, with the space free and the line's size; the file is as before.
            OSError: any other failure, after the same repair.
        """
        data = line.encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)  # needs no space: the partial line goes
            if err.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(self.path, err, len(data)) from err
            raise

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json_object(path: str | os.PathLike, name: str | None = None, fix: str = "") -> dict:
    """The JSON object in `path`; ConfigError starting with `name` (default: the path; e.g. the flag and the path)
    when the file is unreadable, not JSON or not an object, with `fix` (what to do) appended."""
    name = str(path) if name is None else name
    fix = f"; {fix}" if fix else ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{name} is not readable JSON ({err}){fix}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{name} holds a JSON {type(data).__name__}, not an object{fix}")
    return data


class OutputPathError(UsageError, OSError):
    """An output path that could not be written, or that names an input; the message names the flag."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_folder_creatable(folder: str | os.PathLike, flag: str = "") -> Path:
    """Fail now, creating nothing, when `folder` could not be created (with its missing parents) and written into.

    A probe file is created and removed in the nearest existing folder, so read-only mounts are caught (and,
    unlike `os.access`, this is right when running as root).

    Args:
        folder: the folder a command will create or write into.
        flag: what named it, shown beside it in the message (e.g. "--results-dir").
    Returns:
        The nearest existing folder (`folder` itself when it exists), e.g. for `shutil.disk_usage`.
    Raises:
        OutputPathError: naming the folder, and what is in the way.
    """
    folder = Path(folder)
    label = f"{folder} ({flag})" if flag else str(folder)
    anchor = folder
    while not os.path.lexists(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputPathError(f"cannot create the folder {label}: Not a directory ({anchor} is a file)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        if anchor == folder:
            raise OutputPathError(f"cannot write into the folder {label}: {reason}") from err
        raise OutputPathError(f"cannot create the folder {label}: {reason} (in {anchor})") from err
    return anchor


def check_output_file(path: str | os.PathLike, flag: str, inputs: dict[str, Any] | None = None) -> None:
    """Fail now, before the work whose result goes to `path`, when it could not be written there or would
    overwrite an input.

    Args:
        path: the file a command will write (atomically, at the end).
        flag: the flag that named it, e.g. "--out".
        inputs: {description: path or None} of the command's input files, e.g. {"reference batch": ref}.
    Raises:
        OutputPathError: `path` is one of the inputs, an existing folder, or its folder cannot be created or
            written into.
    """
    path = Path(path)
    for what, other in (inputs or {}).items():
        if other is not None and _same_file(path, Path(other)):
            raise OutputPathError(
                f"{flag} {path} is the {what}: writing it would overwrite an input; choose another path"
            )
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give the name of a file to write")
    check_folder_creatable(path.parent, f"for {flag} {path}")
