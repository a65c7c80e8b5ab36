"""Stopping on a signal (issue 13, part 1): SIGTERM, SIGUSR1 and SIGINT sent to a real `python train.py` and to a
2-process torchrun stop every process at one step with a checkpoint, the exit status says so (75; 130 for Ctrl-C),
and the same command with `--ckpt latest` ends with the weights of a run that was never interrupted. Also
`--ckpt-every-minutes`, agreed on by every process, and a signal before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from disploss.training import loader
from disploss.training.run import preemption
from trainkit import (
    SHIM,
    env,
    load,
    max_abs_diff,
    only_run,
    run_dirs,
    tiny_flags,
    torchrun,
    train_cli,
)

STEPS = 40  # long enough that a signal sent after the second log line arrives mid-run
COMMON = dict(steps=STEPS, disp=True, ckpt_every=1000, ckpt="latest")  # the only checkpoints: the stop and the end
DDP_STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    results = tmp_path_factory.mktemp("straight")
    assert train_cli(tiny_flags(images, results, **COMMON)) == 0
    return load(only_run(results) / "checkpoints" / f"{STEPS:07d}.pt")


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def signal_after_second_log_line(cmd: list, cwd, signum: int, timeout: float = 240) -> tuple[int, str, str]:
    """Start `cmd`, send it `signum` once it has logged step 2, and wait: (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, *map(str, cmd)], cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "(step=0000002" in line:  # "(step=0000002/0000040 ...)" with --log-every 1
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + out, err


def stopped_step(run) -> int:
    (name,) = checkpoints(run)
    return int(name[:7])


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_to_python_train_py_then_same_command_resumes_exactly(
    images, tmp_path, capsys, uninterrupted, signum, status
):
    command = tiny_flags(images, tmp_path / "results", **COMMON)
    code, out, err = signal_after_second_log_line([SHIM, *command], tmp_path, signum)
    name = signal.Signals(signum).name
    assert code == status, err[-3000:]
    run = only_run(tmp_path / "results")
    step = stopped_step(run)  # the stop wrote a checkpoint at the step it reached (--ckpt-every is 1000)
    assert 2 <= step < STEPS
    line = f"stopped by {name} at step {step}; checkpoint {run / 'checkpoints' / f'{step:07d}.pt'} written"
    assert err.strip() == f"disploss train: {line}; run the same command with --ckpt latest to continue"
    assert "Traceback" not in err
    assert line in (run / "log.txt").read_text()  # the run's log says why it stopped
    assert not (run / "train.lock").exists()  # released on the way out

    capsys.readouterr()
    assert train_cli(command) == 0  # the same command
    assert f"resumed from {run / 'checkpoints' / f'{step:07d}.pt'} at step {step}" in capsys.readouterr().out
    assert only_run(tmp_path / "results") == run  # same folder
    final = load(run / "checkpoints" / f"{STEPS:07d}.pt")
    assert max_abs_diff(final["model"], uninterrupted["model"]) <= 1e-5  # same data order, same weights
    assert max_abs_diff(final["ema"], uninterrupted["ema"]) <= 1e-5
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


# -- a 2-process torchrun -----------------------------------------------------------------------------------------
def test_sigterm_to_torchrun_then_same_command_resumes_exactly(images, tmp_path):
    """SIGTERM to the launcher, which forwards it to both workers: they stop at one step, rank 0 writes it; the same
    torchrun command ends with the weights of an uninterrupted 2-process run."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    common = {**COMMON, "steps": DDP_STEPS}
    straight = torchrun(2, [SHIM, *tiny_flags(images, tmp_path / "straight", **common)], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    command = [SHIM, *tiny_flags(images, tmp_path / "results", **common)]
    code, out, err = signal_after_second_log_line([*launcher, *command], tmp_path, signal.SIGTERM)
    assert code != 0  # torchrun itself reports the signal it got
    run = only_run(tmp_path / "results")
    step = stopped_step(run)
    assert 2 <= step < DDP_STEPS
    assert err.count(f"disploss train: stopped by SIGTERM at step {step};") == 1  # rank 0 says it, once
    assert len(load(run / "checkpoints" / f"{step:07d}.pt")["rng"]) == 2  # both processes' random states

    resumed = torchrun(2, command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout
    final = load(run / "checkpoints" / f"{DDP_STEPS:07d}.pt")
    want = load(only_run(tmp_path / "straight") / "checkpoints" / f"{DDP_STEPS:07d}.pt")
    assert max_abs_diff(final["model"], want["model"]) <= 1e-5
    assert max_abs_diff(final["ema"], want["ema"]) <= 1e-5


# Rank 1 alone: its --ckpt-every-minutes clock runs ahead from step 2 on, and it gets SIGUSR1 (from itself) during
# step 4; rank 0 gets neither. Without agreement rank 1 would wait alone in the checkpoint's collective.
ONE_RANK = textwrap.dedent(
    """
    import os, signal, sys
    import disploss.transport.transport as transport_module
    from disploss.commands.main import leave, run_command
    from disploss.training.run import preemption

    rank, count = int(os.environ["RANK"]), [0]
    real = transport_module.Transport.training_losses

    def losses(self, *args, **kwargs):
        count[0] += 1
        if rank == 1 and count[0] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *args, **kwargs)

    transport_module.Transport.training_losses = losses
    if rank == 1:
        preemption.StopPoll._now = staticmethod(lambda: 0.0 if count[0] < 2 else 1e9)
    sys.exit(leave(run_command("train", sys.argv[1:])))  # as train.py ends
    """
)


def test_processes_agree_on_stop_and_time_checkpoints(images, tmp_path):
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK)
    flags = tiny_flags(images, tmp_path / "results", steps=8, ckpt_every=1000, ckpt_every_minutes=1)
    proc = torchrun(2, [script, *flags], tmp_path)
    run = only_run(tmp_path / "results")
    assert checkpoints(run) == ["0000002.pt", "0000004.pt"], proc.stderr[-3000:]  # rank 1's clock, rank 1's signal
    for step in (2, 4):
        assert len(load(run / "checkpoints" / f"{step:07d}.pt")["rng"]) == 2  # both took part
    assert proc.stderr.count("disploss train: stopped by SIGUSR1 at step 4;") == 1
    assert "exitcode  : 75" in proc.stderr  # torchrun's summary of the workers


# -- one process: the clock, and a signal before the first step ----------------------------------------------------
def test_ckpt_every_minutes(images, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 40))  # 40 s per call: due every other step with --ckpt-every-minutes 1
    monkeypatch.setattr(preemption.StopPoll, "_now", staticmethod(lambda: float(next(clock))))
    assert train_cli(tiny_flags(images, tmp_path, steps=5, ckpt_every=1000, ckpt_every_minutes=1)) == 0
    assert checkpoints(only_run(tmp_path)) == ["0000002.pt", "0000004.pt", "0000005.pt"]


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_before_the_first_step_stops_at_once(images, tmp_path, monkeypatch, capsys, signum, status):
    real = loader.build_data

    def build_data(*args, **kwargs):
        os.kill(os.getpid(), signum)  # e.g. while the VAE downloads
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "build_data", build_data)
    before = signal.getsignal(signum)
    assert train_cli(tiny_flags(images, tmp_path, steps=3)) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("disploss train: ") and "before the first step; nothing to save" in err, err
    assert "\n" not in err and "Traceback" not in err
    assert run_dirs(tmp_path) == []
    assert signal.getsignal(signum) is before  # the caller's handler is back


def test_stop_signals_restores_handlers_and_ignores_other_threads():
    before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    with preemption.stop_signals():
        assert all(signal.getsignal(s) is not before[s] for s in preemption.STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before
    seen = []

    def in_a_thread():
        with preemption.stop_signals():  # Python cannot set handlers here: a no-op, not an error
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [before[signal.SIGTERM]]


def test_a_second_ctrl_c_stops_at_once(images, tmp_path, monkeypatch, capsys):
    import disploss.transport.transport as transport_module

    real, count = transport_module.Transport.training_losses, [0]

    def losses(self, *args, **kwargs):
        count[0] += 1
        if count[0] == 2:  # Ctrl-C, then Ctrl-C again (SECOND_SIGINT_S is 0 here) in the middle of step 2
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(transport_module.Transport, "training_losses", losses)
    monkeypatch.setattr(preemption, "SECOND_SIGINT_S", 0.0)
    assert train_cli(tiny_flags(images, tmp_path, steps=4)) == 130
    err = capsys.readouterr().err.strip()
    assert err == "disploss train: stopped by a second SIGINT at once, without a checkpoint; the last one written stays"
    assert checkpoints(only_run(tmp_path)) == ["0000001.pt"]
