"""Errors once, short, early: a batch that gives the dispersive term one sample is a preflight error before the run
folder exists; a mistake under torchrun is one line, printed once, and torchrun's own report lists no other process;
argparse's mistakes are one line without the usage block; `--ckpt latest` says when it starts fresh and names the
runs it passed over, of other models too."""

from __future__ import annotations

import pytest

from disploss.errors import ConfigError
from disploss.training import TrainConfig
from disploss.training.run.preflight import check_micro_batch
from trainkit import SHIM, error_line, only_run, run_dirs, tiny_flags, torchrun, train_cli

# What torchrun itself prints after a worker's error on one node (torch 2.14, measured 2026-12-04): two log lines,
# its Python traceback (17 lines) and the ChildFailedError summary (16 lines) naming the worker's line as the root
# cause: 35 lines, plus the one line of ours. Before these changes: 43 lines for a bad value, 111 for an unknown flag.
TORCHRUN_REPORT_LINES = 35


def test_a_single_sample_for_the_dispersive_term_is_a_preflight_error(images, tmp_path, capsys):
    results = tmp_path / "results"
    assert train_cli(tiny_flags(images, results, steps=1, disp=True, global_batch_size=1)) == 2
    err = error_line(capsys)
    assert "--disp with --global-batch-size 1 over 1 process(es) x --grad-accum-steps 1 gives the dispersive" in err
    assert "use --global-batch-size 2 or more" in err and "gather=True" not in err
    assert not results.exists()  # before the run folder, and before the first step


def test_the_micro_batch_checks_name_the_flags():
    with pytest.raises(ConfigError, match=r"micro-batches of 1 sample\(s\).*--global-batch-size 4 or more, or "
                                          r"--disp-gather"):  # fmt: skip
        check_micro_batch(TrainConfig(data_path="d", disp=True, global_batch_size=2), world=2)
    check_micro_batch(TrainConfig(data_path="d", disp=True, global_batch_size=2, disp_gather=True), world=2)
    with pytest.raises(ConfigError, match="--global-batch-size 8 or more, fewer --grad-accum-steps"):
        check_micro_batch(TrainConfig(data_path="d", disp=True, global_batch_size=4, grad_accum_steps=4), world=1)
    check_micro_batch(TrainConfig(data_path="d", global_batch_size=4, grad_accum_steps=4), world=1)  # no term
    with pytest.raises(ConfigError, match=r"not divisible by 2 process\(es\) x --grad-accum-steps 4"):
        check_micro_batch(TrainConfig(data_path="d", global_batch_size=12, grad_accum_steps=4), world=2)
    with pytest.raises(ConfigError, match="--global-batch-size 6 is not divisible by --grad-accum-steps 4"):
        TrainConfig(data_path="d", global_batch_size=6, grad_accum_steps=4)


@pytest.mark.parametrize(
    "flags, line",
    [
        (dict(image_size=7), "disploss train: error: --image-size 7 is not divisible by the patch size 2"),
        (dict(bogus_flag=True), "disploss train: error: unrecognized arguments: --bogus-flag (disploss train --help"),
    ],
)
def test_a_mistake_under_torchrun_is_one_line_and_a_short_report(images, tmp_path, flags, line):
    proc = torchrun(2, [SHIM, *tiny_flags(images, tmp_path / "results", steps=1, **flags)], tmp_path, timeout=120)
    assert proc.returncode != 0
    ours = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("disploss train")]
    assert len(ours) == 1 and ours[0].startswith(line), proc.stderr[-3000:]
    assert "usage:" not in proc.stderr and "Traceback" in proc.stderr  # torchrun's own traceback stays
    assert f"traceback : {ours[0]}" in proc.stderr  # its summary names our line as the root cause
    assert "<NO_OTHER_FAILURES>" in proc.stderr and "SIGTERM" not in proc.stderr  # rank 1 left with status 0
    total = len((proc.stdout + proc.stderr).splitlines())
    assert total <= 1 + TORCHRUN_REPORT_LINES + 4, proc.stderr  # a few lines of slack for torchrun's own versions


def test_argparse_mistakes_are_one_line(capsys):
    from disploss.commands.main import main

    with pytest.raises(SystemExit) as stop:
        main(["sample-ddp", "ODE", "--num-fid-samples", "0"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        "disploss sample-ddp ODE: error: argument --num-fid-samples: must be at least 1, got 0 (disploss sample-ddp "
        "ODE --help lists the flags)\n"
    )


def test_ckpt_latest_names_the_runs_of_other_models_it_passed_over(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, ckpt="latest")) == 0
    assert "--ckpt latest: no run with a checkpoint in" in capsys.readouterr().out  # a fresh start says so
    first = only_run(tmp_path)
    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path, steps=1, ckpt="latest", model="SiT-T/4")) == 0
    out = capsys.readouterr().out
    assert "WARNING: --ckpt latest: no run of SiT-T/4" in out and "so a fresh run starts" in out
    assert f"the newest one differs: {first.name} (--model SiT-T/2 (this command: SiT-T/4))" in out
    assert len(run_dirs(tmp_path)) == 2 and "resumed from" not in out


@pytest.mark.parametrize(
    "argv, line",
    [
        (["sample-ddp", "ODE", "--ckpt", "none.pt", "--precision", "bf16", "--no-tf32"],
         "disploss sample-ddp: error: --precision bf16 contradicts --no-tf32"),
        (["sample-ddp", "ODE", "--ckpt", "none.pt", "--bogus-flag"],
         "disploss sample-ddp: error: unrecognized arguments: --bogus-flag"),
    ],
)  # fmt: skip
def test_a_sample_ddp_mistake_under_torchrun_is_printed_once(tmp_path, argv, line):
    """The settings are built on every process before the process group exists: rank 0 prints the mistake, rank 1
    leaves quietly (a value only the settings check, and an argparse mistake)."""
    proc = torchrun(2, ["-m", "disploss", *argv, "--sample-dir", tmp_path / "samples"], tmp_path, timeout=120)
    assert proc.returncode != 0
    ours = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("disploss sample-ddp")]
    assert len(ours) == 1 and ours[0].startswith(line), proc.stderr[-3000:]
    assert "<NO_OTHER_FAILURES>" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "samples").exists()
