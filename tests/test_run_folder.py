"""A run folder belongs to one experiment and one job at a time, and a run never writes where the user did not ask
(issue 13, parts 2 and 3): `--ckpt latest` resumes only a run with this command's experiment flags; a folder
being trained is locked (a kill -9 leaves no lock that blocks); `--ckpt PATH` outside a run folder of ours, or of
another experiment, starts a new run under --results-dir and never writes next to PATH."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from disploss.training.config import EXPERIMENT_FIELDS, TrainConfig, experiment_differences
from trainkit import SHIM, env, load, max_abs_diff, only_run, run_dirs, tiny_flags, train_cli


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
    from disploss.commands.main import run_command

    real, count = transport_module.Transport.training_losses, [0]

    def losses(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)

    transport_module.Transport.training_losses = losses
    sys.exit(run_command("train", sys.argv[1:]))
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
