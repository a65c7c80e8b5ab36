"""The studies beside their results (experiments/digits, benchmarks/bench): their own command lines from the
repository root, and `disploss bench` / `disploss experiment`, which find them from disploss.__file__ (not the working
directory) and outside a checkout say so in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import disploss
from trainkit import run_python

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["-m", "disploss", "bench", "--help"], "--sections"),
        (["-m", "disploss", "experiment", "digits", "--help"], "--arms"),
        (["-m", "disploss", "experiment", "samplers", "--help"], "--samplers"),
    ],
)
def test_dispatchers_find_the_checkout_from_any_folder(tmp_path, argv, flag):
    done = run_python(argv, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert flag in done.stdout


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["-m", "benchmarks.bench", "--help"], "--sections"),
        (["-m", "benchmarks.bench.latents", "--help"], "--count"),
        (["-m", "experiments.digits", "--help"], "samplers"),
        (["-m", "experiments.digits", "--quick", "--help"], "--arms"),
        (["-m", "experiments.digits", "samplers", "--help"], "--samplers"),
    ],
)
def test_studies_run_from_the_repository_root(argv, flag):
    done = run_python(argv, ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert flag in done.stdout


@pytest.mark.parametrize("argv", [["bench", "--quick"], ["bench", "--help"], ["experiment", "digits", "--quick"]])
def test_outside_a_checkout_one_line(tmp_path, argv):
    # the package alone, as an install leaves it: no experiments/ or benchmarks/ two folders above it
    site = tmp_path / "lib" / "site-packages"
    shutil.copytree(Path(disploss.__file__).parent, site / "disploss", ignore=shutil.ignore_patterns("__pycache__"))
    done = run_python(["-m", "disploss", *argv], tmp_path, timeout=120, PYTHONPATH=str(site))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "runs from a source checkout only" in done.stderr, done.stderr
    assert "git clone" in done.stderr and not done.stdout
