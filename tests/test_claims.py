"""Launches sharing one sample folder split the work (issue 13, item 8): two identical `sample-ddp` launches on
one folder sample each image once between them and write the .npz once; a claim left by a killed launch is
taken over (at once on the same host, after the lease from another host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from disploss.evaluation.npz import load_samples_npz
from disploss.sampling.claims import Claims, claim_name
from trainkit import MODEL, env, save_training_checkpoint, tiny_sit

N = 70  # three blocks of 32
ARGS = ["ODE", "--sampling-method", "euler", "--num-sampling-steps", "2", "--num-fid-samples", str(N),
        "--device", "cpu", "--per-proc-batch-size", "1"]  # fmt: skip

# `disploss sample-ddp ARGS` whose PNG writer waits until every launch of the test has started (so that they
# overlap), counts the PNGs this launch wrote (printed at exit) and, with KILL_AFTER=k, SIGKILLs itself after
# the k-th. Test-only: the package has no such hooks.
LAUNCH = textwrap.dedent(
    """
    import atexit, os, signal, sys, time
    from pathlib import Path
    from disploss import imageio

    gate, launches = Path(os.environ["GATE"]), int(os.environ["LAUNCHES"])
    (gate / str(os.getpid())).touch()
    kill_after, saved = int(os.environ.get("KILL_AFTER", "0")), [0]
    atexit.register(lambda: print(f"PNGS WRITTEN BY THIS LAUNCH: {saved[0]}", flush=True))
    real_save = imageio.save_png

    def save(array, path):
        while len(list(gate.iterdir())) < launches:
            time.sleep(0.05)
        real_save(array, path)
        saved[0] += 1
        if saved[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)

    imageio.save_png = save
    from disploss.commands.main import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_training_checkpoint(tmp_path_factory.mktemp("ckpt") / "0000100.pt", tiny_sit(0, preset=MODEL))


def launch(tmp_path, ckpt, sample_dir, launches: int, **extra_env) -> subprocess.Popen:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    (tmp_path / "gate").mkdir(exist_ok=True)
    argv = [sys.executable, str(script), "sample-ddp", *ARGS, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir)]
    environment = env(GATE=str(tmp_path / "gate"), LAUNCHES=str(launches), **extra_env)
    return subprocess.Popen(
        argv, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def the_folder(sample_dir):
    (folder,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return folder, folder.with_name(folder.name + ".npz")


def written(out: str) -> int:
    return int(out.rsplit("PNGS WRITTEN BY THIS LAUNCH: ", 1)[1].split()[0])


@pytest.mark.timeout(300)
def test_two_identical_launches_share_the_folder(tmp_path, ckpt):
    procs = [launch(tmp_path, ckpt, tmp_path / "samples", launches=2) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err[-3000:]
    counts = [written(out) for out, _ in outs]
    assert sum(counts) == N and min(counts) > 0, counts  # each image once, by one launch or the other
    for count, (out, _) in zip(counts, outs):
        assert f"sampled {count} images in this launch" in out
    text = "".join(out for out, _ in outs)
    assert text.count("Saved .npz file to") == 1 and text.count("was written by another launch") == 1
    folder, npz = the_folder(tmp_path / "samples")
    assert load_samples_npz(npz).shape == (N, 8, 8, 3)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no claim or temporary file left


@pytest.mark.timeout(300)
def test_claims_of_a_killed_launch_are_taken_over(tmp_path, ckpt):
    proc = launch(tmp_path, ckpt, tmp_path / "samples", launches=1, KILL_AFTER="3")
    proc.communicate(timeout=240)
    assert proc.returncode == -9
    folder, npz = the_folder(tmp_path / "samples")
    assert [p.name for p in folder.iterdir() if p.name.startswith(claim_name(""))] == [claim_name(0)]
    # the same command again (no gate to wait for): the dead launch's claim is taken over at once
    done = subprocess.run(
        [sys.executable, "-m", "disploss", "sample-ddp", *ARGS, "--ckpt", str(ckpt), "--sample-dir",
         str(tmp_path / "samples")], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sampled {N - 3} images in this launch" in done.stdout and "waiting" not in done.stdout
    assert load_samples_npz(npz).shape == (N, 8, 8, 3)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _foreign_claim(folder, block, host="another-host", pid=1, age_s=0.0):
    path = folder / claim_name(block)
    path.write_text(json.dumps({"host": host, "pid": pid, "start": None, "token": "theirs"}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_claim_from_another_host_is_stale_only_after_the_lease(tmp_path):
    with Claims(tmp_path, lease_s=60) as claims:
        _foreign_claim(tmp_path, 0, age_s=30)
        assert not claims.take(0) and claims.holder(0) == "another-host pid 1"
        _foreign_claim(tmp_path, 1, age_s=90)
        assert claims.take(1) and claims.holder(1) is not None  # ours now
        assert json.loads((tmp_path / claim_name(1)).read_text())["token"] == claims.owner["token"]


def test_a_claim_of_this_host_is_stale_when_its_process_is_gone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        with Claims(tmp_path, lease_s=3600) as claims:
            host = claims.owner["host"]
            _foreign_claim(tmp_path, 0, host=host, pid=sleeper.pid)
            _foreign_claim(tmp_path, 1, host=host, pid=int(gone.stdout))
            assert not claims.take(0)  # alive
            assert claims.take(1)  # dead: taken over without waiting for the lease
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_stale_keeps_only_live_and_own_claims(tmp_path):
    """Once a folder is complete, the claims of processes killed after their last image go (nobody claims those
    blocks again), with the leftovers of a take-over killed midway; live holders' and our own claims stay."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        with Claims(tmp_path, lease_s=3600) as claims:
            host = claims.owner["host"]
            _foreign_claim(tmp_path, 0, host=host, pid=sleeper.pid)  # alive
            _foreign_claim(tmp_path, 1, host=host, pid=int(gone.stdout))  # dead
            _foreign_claim(tmp_path, 2, age_s=7200)  # another host, past the lease
            _foreign_claim(tmp_path, 3, age_s=60)  # another host, within the lease
            (tmp_path / f"{claim_name(4)}.stale-abc").write_text("{}")  # a take-over killed before its unlink
            assert claims.take("npz")
            assert claims.remove_stale() == 3
            left = sorted(p.name for p in tmp_path.iterdir())
            assert left == sorted([claim_name(0), claim_name(3), claim_name("npz")])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_release_leaves_a_claim_another_process_took_over(tmp_path):
    with Claims(tmp_path) as claims:
        assert claims.take(4)
        _foreign_claim(tmp_path, 4)  # taken over meanwhile (we were thought dead)
        claims.release(4)
        assert (tmp_path / claim_name(4)).exists()


def test_heartbeat_refreshes_held_claims(tmp_path):
    with Claims(tmp_path, heartbeat_s=0.05) as claims:
        assert claims.take(2)
        old = time.time() - 1000
        os.utime(tmp_path / claim_name(2), (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / claim_name(2)).stat().st_mtime < 10
    assert not (tmp_path / claim_name(2)).exists()  # given back on close


def test_sample_claimed_waits_for_a_live_holder_then_finishes(tmp_path, monkeypatch):
    """Blocks another live process holds are waited for, not sampled twice; once the holder is gone (here its
    claim goes stale) the rest is sampled."""
    from disploss.sampling.ddp import sample_claimed

    monkeypatch.setattr("disploss.sampling.ddp.POLL_S", 0.05)
    made = []

    def sample_batch(indices):
        made.extend(indices)
        for i in indices:
            (tmp_path / f"{i:06d}.png").write_bytes(b"png")

    n = 40  # blocks 0 (0..31) and 1 (32..39)
    with Claims(tmp_path, lease_s=0.5) as claims:
        _foreign_claim(tmp_path, 1)  # held by a live process elsewhere, until its lease runs out
        log = []
        assert sample_claimed(tmp_path, n, claims, sample_batch, batch_size=8, log=log.append) == n
    assert sorted(made) == list(range(n)) and len(made) == n
    assert log and log[0].startswith("waiting for 8 images claimed by other processes (another-host pid 1)")
