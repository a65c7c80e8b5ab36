"""Experiment folders: reference naming, race-free creation, pre-flight disk checks, the lock of a run folder."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from disploss.processes import boot_id, process_start
from disploss.training.run import folder as run_folder
from disploss.training.run import lock as run_lock


def test_reference_layout(tmp_path):
    first = run_folder.create_experiment_dir(tmp_path / "results", "SiT-XL/2", "Linear", "velocity", None)
    assert first.name == "000-SiT-XL-2-Linear-velocity-None"
    assert (first / "checkpoints").is_dir()
    (tmp_path / "results" / "notes.txt").write_text("x")  # any entry counts, like the reference's glob
    second = run_folder.create_experiment_dir(tmp_path / "results", "SiT-B/4", "GVP", "score", "likelihood")
    assert second.name == "002-SiT-B-4-GVP-score-likelihood"


def test_used_index_is_skipped(tmp_path):
    (tmp_path / "001-SiT-S-2-Linear-velocity-None").mkdir()  # index 1 taken, 1 entry in the folder
    made = run_folder.create_experiment_dir(tmp_path, "SiT-S/2", "Linear", "velocity", None)
    assert made.name == "002-SiT-S-2-Linear-velocity-None"


def _create(results_dir: str, queue) -> None:
    queue.put(str(run_folder.create_experiment_dir(results_dir, "SiT-XL/2", "Linear", "velocity", None)))


def test_concurrent_threads_never_share(tmp_path, monkeypatch):
    # Make every caller see the same (stale) directory listing, as two processes starting together would.
    real_iterdir = Path.iterdir
    snapshot = list(real_iterdir(tmp_path))
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(snapshot) if self == tmp_path else real_iterdir(self))
    results, barrier = [], threading.Barrier(8)

    def work():
        barrier.wait()
        results.append(run_folder.create_experiment_dir(tmp_path, "SiT-XL/2", "Linear", "velocity", None))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in results}) == 8
    assert sorted(p.name[:3] for p in results) == [f"{i:03d}" for i in range(8)]


def test_concurrent_processes_never_share(tmp_path):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    names = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len(set(names)) == 4


def test_check_writable_ok(tmp_path):
    free = run_folder.check_writable(tmp_path / "new" / "dir", min_free_bytes=1)
    assert free > 0 and (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe is removed


def test_check_writable_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_folder.NotWritableError, match="cannot create the folder .*file/sub"):
        run_folder.check_writable(tmp_path / "file" / "sub")


def test_check_writable_read_only(tmp_path, monkeypatch):
    # Tests may run as root, which chmod does not stop: simulate a read-only mount at open().
    import builtins

    real_open = builtins.open

    def ro_open(file, mode="r", *a, **k):
        if ".write-probe-" in str(file) and any(c in mode for c in "wax+"):
            raise OSError(30, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", ro_open)
    with pytest.raises(run_folder.NotWritableError) as err:
        run_folder.check_writable(tmp_path)
    assert str(tmp_path) in str(err.value) and "Read-only file system" in str(err.value)
    assert isinstance(err.value, PermissionError)


def test_check_writable_disk_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    need = free * 1000 + 12345
    with pytest.raises(run_folder.InsufficientDiskSpaceError) as err:
        run_folder.check_writable(tmp_path, min_free_bytes=need)
    message = str(err.value)
    assert str(tmp_path) in message and f"{need} bytes needed" in message and "bytes free" in message


def test_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path):
    from disploss.checkpoint import save_checkpoint
    from disploss.models import SiT

    model = SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])).sum().backward()
    opt.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(
        tmp_path / "c.pt", {"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "args": {"a": 1}}
    )
    estimate = run_folder.checkpoint_size_bytes(model)
    actual = path.stat().st_size
    assert actual <= estimate <= actual + (2 << 20)
    assert run_folder.checkpoint_size_bytes(model, with_opt=False) < estimate


def test_format_bytes():
    assert run_folder.format_bytes(512) == "512 B"
    assert run_folder.format_bytes(3 * 1024**3) == "3.00 GiB"


# -- the run folder's lock (RunLock) -------------------------------------------------------------------------------
def write_lock(folder: Path, **holder) -> Path:
    """A lock file as another job would have left it."""
    import json

    path = folder / run_lock.LOCK_NAME
    content = {"host": "other-host", "pid": 1234, "started": "2026-01-01 00:00:00", "lease": 0.0, "token": "t0"}
    path.write_text(json.dumps({**content, **holder}))
    return path


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_the_live_holder_and_is_released(tmp_path):
    first = run_lock.RunLock(tmp_path).acquire()
    with pytest.raises(run_lock.RunFolderLockedError, match=rf"being trained by pid {os.getpid()} on host .* since 20"):
        run_lock.RunLock(tmp_path).acquire()  # a second job, same host, the first one alive
    first.release()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()
    with run_lock.RunLock(tmp_path):
        assert (tmp_path / run_lock.LOCK_NAME).is_file()


def test_lock_of_a_dead_process_on_this_host_is_stale(tmp_path):
    import socket

    write_lock(tmp_path, host=socket.gethostname(), boot_id=boot_id(), pid=dead_pid(), lease=time.time())
    with run_lock.RunLock(tmp_path) as lock:  # at once: no waiting on a lease
        assert lock._read()["pid"] == os.getpid()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    import socket

    start = process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc here: a pid's start time is unknown")
    write_lock(tmp_path, host=socket.gethostname(), boot_id=boot_id(), pid=os.getpid(), pid_start=start - 1)
    with run_lock.RunLock(tmp_path) as lock:  # our pid, but not the process that took the lock
        assert lock._read()["token"] == lock.token


def test_lock_of_another_host_stale_after_its_lease(tmp_path):
    write_lock(tmp_path, lease=time.time() - 11)
    with run_lock.RunLock(tmp_path, refresh_s=1, stale_s=10) as lock:
        assert lock._read()["token"] == lock.token


def test_lock_of_another_host_waits_for_the_lease(tmp_path):
    """A fresh lease of another host: refreshed meanwhile (a live job) -> error; never refreshed -> taken once it is
    older than stale_s by the waiting job's own clock."""
    import json

    path = write_lock(tmp_path, lease=time.time())
    stop = threading.Event()

    def refresher():  # the other job, alive
        while not stop.wait(0.1):
            path.write_text(json.dumps({**json.loads(path.read_text()), "lease": time.time()}))

    thread = threading.Thread(target=refresher)
    thread.start()
    try:
        with pytest.raises(run_lock.RunFolderLockedError, match="pid 1234 on host other-host"):
            run_lock.RunLock(tmp_path, refresh_s=0.2, stale_s=30).acquire()
    finally:
        stop.set()
        thread.join()
    notes = []
    start = time.monotonic()
    with run_lock.RunLock(tmp_path, refresh_s=0.2, stale_s=1.0, notify=notes.append) as lock:  # now nobody refreshes
        assert lock._read()["token"] == lock.token
    assert 0.8 <= time.monotonic() - start < 20
    assert notes and "waiting up to 1 s" in notes[0]


def test_lease_is_refreshed_and_a_taken_lock_is_noticed(tmp_path):
    import json

    lock = run_lock.RunLock(tmp_path, refresh_s=0.05).acquire()
    first = lock._read()["lease"]
    time.sleep(0.3)
    assert lock._read()["lease"] > first  # the thread keeps the lease fresh
    lock.check()
    (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({"host": "h2", "pid": 7, "token": "other"}))
    time.sleep(0.3)
    with pytest.raises(run_lock.RunFolderLockedError, match="was taken by pid 7 on host h2"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["token"] == "other"  # not ours to remove
