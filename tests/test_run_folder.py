"""The run folder (training/run/folder.py, lock.py, preflight.py): the reference's naming and race-free creation, the
pre-flight writability and disk checks, the lock of a run folder (live holder, dead or reused pid, another host's
lease); a run folder belongs to one experiment and one job at a time, and a run never writes where the user did not
ask: `--ckpt latest` resumes only a run with this command's experiment flags; a folder being trained is locked (a
kill -9 leaves no lock that blocks); `--ckpt PATH` outside a run folder of ours, or of another experiment, starts a
new run under --results-dir and never writes next to PATH.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from disploss.processes import boot_id, process_start
from disploss.training.config import EXPERIMENT_FIELDS, TrainConfig, experiment_differences
from disploss.training.run import folder as run_folder
from disploss.training.run import lock as run_lock
from trainkit import SHIM, env, error_line, load, max_abs_diff, only_run, run_dirs, tiny_flags, torchrun, train_cli


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


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- one experiment per folder ------------------------------------------------------------------------------------
def test_ckpt_latest_resumes_only_the_run_of_the_same_experiment(images, tmp_path, capsys):
    a = dict(disp=True, global_seed=0)
    b = dict(global_seed=1)  # another experiment in the same --results-dir, trained last
    assert train_cli(tiny_flags(images, tmp_path, steps=2, **a)) == 0
    assert train_cli(tiny_flags(images, tmp_path, steps=2, **b)) == 0
    run_a, run_b = run_dirs(tmp_path)
    before_b = snapshot(run_b)

    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path, steps=3, ckpt="latest", **a)) == 0  # a requeue of job A
    out = capsys.readouterr().out
    assert f"resumed from {run_a / 'checkpoints' / '0000002.pt'} at step 2" in out
    assert (
        f"passed over the run(s) of other experiments: {run_b.name} (--global-seed 1 (this command: 0), "
        "--disp False (this command: True))" in out
    )
    assert names(run_a / "checkpoints") == ["0000001.pt", "0000002.pt", "0000003.pt"]
    assert snapshot(run_b) == before_b  # B's folder untouched
    assert json.loads((run_a / "config.json").read_text())["disp"] is True

    assert train_cli(tiny_flags(images, tmp_path, steps=3, ckpt="latest", **b)) == 0  # a requeue of job B
    assert names(run_b / "checkpoints") == ["0000001.pt", "0000002.pt", "0000003.pt"]

    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path, steps=1, ckpt="latest", lr=2e-4, **b)) == 0  # a third experiment
    out = capsys.readouterr().out
    assert "WARNING: --ckpt latest: no run of SiT-T/2" in out and "--lr 0.0001 (this command: 0.0002)" in out
    assert len(run_dirs(tmp_path)) == 3 and "resumed from" not in out


def test_experiment_fields_are_flags_of_train_config():
    fields = {f for f in TrainConfig.__dataclass_fields__}
    assert set(EXPERIMENT_FIELDS) <= fields
    stored = TrainConfig(data_path="d").as_dict()
    for name in ("max_steps", "log_every", "ckpt_every", "num_workers", "device", "precision", "keep_last"):
        assert name not in EXPERIMENT_FIELDS  # may change between restarts of one run
    changed = TrainConfig(data_path="d", max_steps=9, num_workers=0, log_every=5, disp_weight=0.5)
    assert experiment_differences(stored, changed) == []  # disp is off: its weight does not matter
    assert experiment_differences({"model": "SiT-B/2"}, changed) == ["--model SiT-B/2 (this command: SiT-XL/2)"]


# -- one job per folder -------------------------------------------------------------------------------------------
def test_a_run_folder_being_trained_is_locked(images, tmp_path, capsys):
    results = tmp_path / "results"
    command = tiny_flags(images, results, steps=100_000, ckpt_every=5, keep_last=2, ckpt="latest")
    job = subprocess.Popen([sys.executable, SHIM, *command], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(results.glob("*/checkpoints/*.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        run = only_run(results)
        holder = json.loads((run / "train.lock").read_text())
        assert holder["pid"] == job.pid

        capsys.readouterr()
        assert train_cli(command) == 2  # a second job with the same command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"disploss train: error: the run folder {run} is being trained by pid {job.pid} on host")
        assert "\n" not in err and "Traceback" not in err
        assert run_dirs(results) == [run]  # no second folder either
    finally:
        job.send_signal(signal.SIGTERM)
        _, job_err = job.communicate(timeout=120)
    assert job.returncode == 75, job_err[-3000:]
    assert not (run / "train.lock").exists()
    stopped = max(int(p.stem) for p in (run / "checkpoints").glob("*.pt"))
    assert train_cli(tiny_flags(images, results, steps=stopped + 1, ckpt_every=5, ckpt="latest")) == 0  # now free
    assert (run / "checkpoints" / f"{stopped + 1:07d}.pt").is_file()


KILL_AT_STEP = textwrap.dedent(
    """
    import os, signal, sys
    import disploss.transport.transport as transport_module
    from disploss.commands.main import leave, run_command

    real, count = transport_module.Transport.training_losses, [0]

    def losses(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    transport_module.Transport.training_losses = losses
    sys.exit(leave(run_command("train", sys.argv[1:])))  # as train.py ends
    """
)


def test_kill_9_leaves_a_lock_that_does_not_block(images, tmp_path, capsys):
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT_STEP)
    command = tiny_flags(images, tmp_path / "results", steps=4, ckpt="latest")
    proc = subprocess.Popen([sys.executable, script, *command], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == -9, err[-3000:]
    run = only_run(tmp_path / "results")
    assert json.loads((run / "train.lock").read_text())["pid"] == proc.pid  # left behind by the kill
    capsys.readouterr()
    assert train_cli(command) == 0  # same host, dead pid: stale at once
    assert "resumed from" in capsys.readouterr().out
    assert not (run / "train.lock").exists()


# -- never write where the user did not ask -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_and_four(images, tmp_path_factory):
    """A 2-step run (its checkpoint 2) and an uninterrupted 4-step run (its checkpoint 4)."""
    root = tmp_path_factory.mktemp("runs")
    assert train_cli(tiny_flags(images, root / "two", steps=2, disp=True)) == 0
    assert train_cli(tiny_flags(images, root / "four", steps=4, disp=True)) == 0
    return only_run(root / "two") / "checkpoints" / "0000002.pt", load(
        only_run(root / "four") / "checkpoints" / "0000004.pt"
    )


@pytest.mark.parametrize("layout", ["ckpts/x.pt", "elsewhere/checkpoints/0000002.pt"])
def test_ckpt_path_outside_a_run_folder_continues_under_results_dir(images, tmp_path, capsys, two_and_four, layout):
    """A training checkpoint copied out of its run folder (also into a `checkpoints/` folder that is not ours):
    a new run folder under --results-dir continues it exactly; nothing is written next to it."""
    ckpt, four = two_and_four
    copy = tmp_path / "outside" / layout
    copy.parent.mkdir(parents=True)
    shutil.copy(ckpt, copy)
    before = snapshot(tmp_path / "outside")

    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=4, disp=True, ckpt=copy)) == 0
    out = capsys.readouterr().out
    assert f"--ckpt {copy} is not in a run folder of ours: a new run folder continues it (its optimizer, step 2" in out
    assert snapshot(tmp_path / "outside") == before  # not a byte written next to it
    run = only_run(tmp_path / "results")
    assert names(run / "checkpoints") == ["0000003.pt", "0000004.pt"]
    final = load(run / "checkpoints" / "0000004.pt")
    assert max_abs_diff(final["model"], four["model"]) <= 1e-5  # optimizer, step and data order continued
    assert max_abs_diff(final["ema"], four["ema"]) <= 1e-5


def test_ckpt_path_of_another_experiment_takes_only_the_weights(images, tmp_path, capsys, two_and_four):
    ckpt, _ = two_and_four
    home, before = ckpt.parent.parent, snapshot(ckpt.parent.parent)
    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path, steps=2, disp=True, lr=3e-4, ckpt=ckpt)) == 0
    out = capsys.readouterr().out
    assert f"WARNING: --ckpt {ckpt} was trained with other experiment flags (--lr 0.0001 (this command: 0.0003))" in out
    assert "a new run takes only its weights (step 0, a new optimizer)" in out
    assert snapshot(home) == before  # its own folder is not continued
    run = only_run(tmp_path)
    assert names(run / "checkpoints") == ["0000001.pt", "0000002.pt"]  # from step 0
    first = load(run / "checkpoints" / "0000001.pt")
    assert first["step"] == 1 and json.loads((run / "config.json").read_text())["lr"] == 3e-4


def test_results_dir_under_a_regular_file(images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train_cli(tiny_flags(images, blocker / "results", steps=1)) == 2
    assert "cannot create the folder" in error_line(capsys)


@pytest.mark.timeout(180)
def test_results_dir_error_reaches_every_process(images, tmp_path):
    """Only rank 0 checks and creates the run folder; its error reaches rank 1, which would otherwise wait for
    the folder's name until the collective timeout (30 minutes), and it is printed once: by rank 0, rank 1
    quiet. On one node rank 1 then exits with 0 before rank 0 exits with 2, so torchrun's summary names rank 0's
    line as the root cause and lists no other failure (issue 19: torchrun's report stays short); neither aborts."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = torchrun(2, [SHIM, *tiny_flags(images, blocker / "results", steps=1)], tmp_path, timeout=150)
    assert proc.returncode != 0
    printed = [line for line in proc.stderr.splitlines() if line.startswith("disploss train: error: ")]
    assert len(printed) == 1 and "cannot create the folder" in printed[0], proc.stderr[-3000:]
    assert "traceback : disploss train: error: cannot create the folder" in proc.stderr, proc.stderr[-3000:]
    assert "<NO_OTHER_FAILURES>" in proc.stderr and "rank      : 1 (local_rank: 1)" not in proc.stderr
    assert "terminate called" not in proc.stderr  # no process exits with its process group alive


def test_each_run_gets_its_own_folder(images, tmp_path):
    for _ in range(2):
        assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 0
    assert [p.name[:4] for p in run_dirs(tmp_path)] == ["000-", "001-"]
