"""Claims on blocks of image indices, so that launches sharing one sample folder split the work.

Two `sample-ddp` launches of the same command on one folder (two SLURM jobs, a requeue while the first still
runs) would otherwise each sample every missing image. A process claims a block of BLOCK_SIZE indices by
creating the file `.claim-{block:06d}` in the folder with O_EXCL (atomic on POSIX file systems, NFS v3+
included), samples the block's missing images, and removes the file. A claim whose owner is gone is taken over:

- on the same host, when its process no longer exists (a kill -9 is recovered at once);
- from any host, when it has not been refreshed for LEASE_S seconds (a thread refreshes its owner's claims
  every HEARTBEAT_S seconds while it runs).

A stale claim is taken over by renaming it to a unique name first, so of two processes that find it stale one
wins. Whichever process samples an index, it gets the same image (each index has its own random stream). The
same mechanism guards the writing of the .npz (`claim_name("npz")`), so it is written once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from disploss.processes import pid_alive, process_start

BLOCK_SIZE = 32  # indices per claim; the same in every launch, so that claims of different launches exclude
LEASE_S = 300.0  # a claim not refreshed for this long is stale, whoever holds it
HEARTBEAT_S = 30.0
PREFIX = ".claim-"


def claim_name(block: int | str) -> str:
    """File name of the claim on a block (an int) or on a named step such as "npz"."""
    return f"{PREFIX}{block:06d}" if isinstance(block, int) else f"{PREFIX}{block}"


class Claims:
    """The claims this process holds in one folder, refreshed by a heartbeat thread until `close()`.

    Args:
        folder: the sample folder.
        lease_s: seconds after which an unrefreshed claim of any host is stale.
        heartbeat_s: seconds between refreshes of the claims held here.
    """

    def __init__(self, folder: Path, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S):
        self.folder = Path(folder)
        self.lease_s = lease_s
        self.owner = {
            "host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
            "token": uuid.uuid4().hex,
        }  # fmt: skip
        self.held: dict[str, int | str] = {}  # claim file name -> block
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    # -- taking and giving back -----------------------------------------------------------------------------
    def take(self, block: int | str) -> bool:
        """Claim a block (or a named step); False when another live process holds it."""
        name = claim_name(block)
        path = self.folder / name
        if self._create(path, block):
            return True
        if not self.is_stale(path):
            return False
        if not self._remove_stale(path):
            return False
        return self._create(path, block)

    def remove_stale(self) -> int:
        """Remove every stale claim in the folder (of processes killed after their last image, whose blocks nobody
        claims again) and the leftovers of a take-over killed midway; returns how many. Called once the folder is
        complete."""
        removed = 0
        for path in self.folder.glob(PREFIX + "*"):
            if ".stale-" in path.name:  # renamed away by a take-over that was killed before removing it
                path.unlink(missing_ok=True)
                removed += 1
            elif path.name not in self.held and self.is_stale(path) and self._remove_stale(path):
                removed += 1
        return removed

    def _remove_stale(self, path: Path) -> bool:
        # Of two processes that found a claim stale, only one renames it away (and then removes it).
        moved = path.with_name(f"{path.name}.stale-{self.owner['token']}")
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            return False
        moved.unlink(missing_ok=True)
        return True

    def release(self, block: int | str) -> None:
        """Give a claim back: its file is removed, unless another process took it over meanwhile."""
        name = claim_name(block)
        with self._lock:
            self.held.pop(name, None)
        path = self.folder / name
        if (_read_owner(path) or {}).get("token") == self.owner["token"]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def holder(self, block: int | str) -> str | None:
        """'host pid' of the live holder of a claim, None when it is free or stale."""
        path = self.folder / claim_name(block)
        if not path.exists() or self.is_stale(path):
            return None
        owner = _read_owner(path) or {}
        return f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"

    def close(self) -> None:
        """Stop the heartbeat and give back every claim still held."""
        self._stop.set()
        self._thread.join(timeout=5)
        for block in list(self.held.values()):
            self.release(block)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- staleness ------------------------------------------------------------------------------------------
    def is_stale(self, path: Path) -> bool:
        """A claim is stale when its owner's process is gone (same host) or it was not refreshed for the lease."""
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: free, not stale
        if age > self.lease_s:
            return True
        owner = _read_owner(path)
        if owner is None:
            return age > 5.0  # being written right now, or garbage left by a crash
        if owner.get("host") == self.owner["host"]:
            return not pid_alive(int(owner.get("pid", -1)), owner.get("start"))
        return False

    # -- internals ------------------------------------------------------------------------------------------
    def _create(self, path: Path, block: int | str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        with self._lock:
            self.held[path.name] = block
        return True

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                names = list(self.held)
            for name in names:
                try:
                    os.utime(self.folder / name)
                except FileNotFoundError:
                    pass


def _read_owner(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
