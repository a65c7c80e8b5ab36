"""The lock that gives a run folder to one job at a time (RunLock): `{run_dir}/train.lock`, JSON with the host,
pid, start time and a lease; a dead holder's lock never blocks."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

from disploss.errors import UsageError
from disploss.processes import boot_id, pid_alive, process_start

__all__ = ["LOCK_NAME", "RunFolderLockedError", "RunLock", "describe_holder"]

LOCK_NAME = "train.lock"
LEASE_REFRESH_S = 60.0  # the job training a folder rewrites its lease this often
LEASE_STALE_S = 600.0  # a lock of another host whose lease is older than this is stale: its job died


class RunFolderLockedError(UsageError, RuntimeError):
    """Another live job trains this run folder."""


def describe_holder(holder: dict) -> str:
    """`pid 123 on host h since 2026-01-01 10:00:00 (SLURM job 77)` from a lock file's content."""
    job = f" (SLURM job {holder['job']})" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}{job}"


class RunLock:
    """A run folder's lock: `{run_dir}/train.lock`, JSON with the host, pid, start time and a lease.

    Taken with an atomic hard link (or O_EXCL where links are not supported), so two jobs never both get it; held
    until `release` (the training's end, an error or a stop on a signal). A kill -9 leaves the file behind, but it
    never blocks for ever: on the same host (and boot) the lock of a dead pid is stale at once; the lock of another
    host holds a lease that a thread refreshes every LEASE_REFRESH_S while the job lives, and is stale when the
    lease is older than LEASE_STALE_S (hosts' clocks are assumed to agree within a minute, as NTP keeps them). A
    job finding a fresh lease of another host waits until it is either refreshed (a live job: error) or stale.

    Args:
        run_dir: the run folder.
        refresh_s, stale_s: the lease's refresh period and age at which it is stale.
        notify: called with a line of text while waiting (e.g. print).
    """

    def __init__(self, run_dir, refresh_s: float | None = None, stale_s: float | None = None, notify=None):
        import socket

        self.path = Path(run_dir) / LOCK_NAME
        self.refresh_s = LEASE_REFRESH_S if refresh_s is None else refresh_s
        self.stale_s = LEASE_STALE_S if stale_s is None else stale_s
        self.notify = notify or (lambda line: None)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: dict | None = None  # the holder that replaced us (a refresh found another token)

    # -- the file ----------------------------------------------------------------------------------------------
    def _content(self, started: str) -> dict:
        return {
            "host": self.host, "boot_id": boot_id(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "started": started, "lease": time.time(), "token": self.token,
            "job": os.environ.get("SLURM_JOB_ID") or None,
        }  # fmt: skip

    def _write_tmp(self, content: dict) -> Path:
        from disploss.fileio import file_mode

        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}.{uuid.uuid4().hex[:6]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: judged by the file's age below

    def _create(self) -> bool:
        tmp = self._write_tmp(self._content(time.strftime("%Y-%m-%d %H:%M:%S")))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: O_EXCL
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(tmp.read_bytes())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    # -- liveness ------------------------------------------------------------------------------------------------
    def _state(self, holder: dict) -> str:
        """'live', 'stale' or 'lease' (another host's lease, not yet stale: wait and watch it)."""
        if not holder:  # unreadable: a job killed between creating and filling the file (the O_EXCL fallback)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "stale"
            return "stale" if age > 10 else "lease"
        same_machine = holder.get("host") == self.host and holder.get("boot_id") == boot_id()
        if same_machine:
            return "live" if pid_alive(int(holder.get("pid", -1)), holder.get("pid_start")) else "stale"
        if holder.get("host") == self.host:  # same name, another boot: every process of that boot is gone
            return "stale"
        return "stale" if time.time() - float(holder.get("lease", 0)) > self.stale_s else "lease"

    def _break(self, holder: dict) -> None:
        # Move the stale lock aside, then make sure it was the one judged stale (not a new job's fresh lock).
        aside = self.path.with_name(f".{LOCK_NAME}.{self.token}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token"):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # put the other job's lock back
        aside.unlink(missing_ok=True)

    # -- public ----------------------------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock (breaking a stale one; waiting on another host's lease); start refreshing the lease.

        Raises:
            RunFolderLockedError: a live job holds it; the message names its host, pid and start time.
        """
        watched: dict | None = None
        deadline = None
        while True:
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            state = self._state(holder)
            if state == "stale":
                self._break(holder)
                continue
            if state == "live" or (watched and holder.get("token") == watched.get("token")
                                   and holder.get("lease") != watched.get("lease")):  # fmt: skip
                raise RunFolderLockedError(
                    f"the run folder {self.path.parent} is being trained by {describe_holder(holder)} (lock file "
                    f"{self.path}); two jobs never write into one run folder: wait for that job to end, or give "
                    "this one another --results-dir"
                )
            if watched is None or holder.get("token") != watched.get("token"):
                watched = holder
                deadline = time.monotonic() + self.stale_s + self.refresh_s
                self.notify(
                    f"the run folder {self.path.parent} is locked by {describe_holder(holder)}; waiting up to "
                    f"{self.stale_s:.0f} s for its lease to be refreshed (a live job: stop) or to expire (a dead one)"
                )
            if time.monotonic() > deadline:
                self._break(holder)  # not refreshed for stale_s of our own clock: dead whatever the clocks say
                continue
            time.sleep(min(self.refresh_s / 4, 5.0))
        self._thread = threading.Thread(target=self._refresh_loop, name="disploss-run-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the lease if the lock is still ours (else record who took it in `lost`)."""
        holder = self._read()
        if holder is not None and holder.get("token") != self.token:
            self.lost = holder
            return
        content = dict(holder or self._content(time.strftime("%Y-%m-%d %H:%M:%S")), lease=time.time())
        try:
            os.replace(self._write_tmp(content), self.path)
        except OSError:
            pass  # a full disk must not kill the run here; the lease just ages

    def check(self) -> None:
        """Raise RunFolderLockedError if another job took the lock (this one was paused longer than stale_s)."""
        if self.lost is not None:
            raise RunFolderLockedError(
                f"the lock of the run folder {self.path.parent} was taken by {describe_holder(self.lost)} while this "
                "job was not refreshing it; stopping without writing into that folder"
            )

    def release(self) -> None:
        """Stop refreshing and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
