"""`disploss train` arguments: the reference's flags are all there, unknown flags are an error (reference bug 9),
and every bad value is one line `disploss train: error: ...` naming the flag and the valid values, exit 2,
before any training; run() turns user errors into that line and lets bugs keep their traceback."""

from __future__ import annotations

import errno

import pytest
import torch

from disploss import distributed
from disploss.checkpoint import save_checkpoint
from disploss.commands import report, train
from disploss.commands.main import build_parser
from disploss.commands.main import main as cli_main
from disploss.errors import ConfigError, HubUnavailableError
from disploss.models import create_model
from disploss.training import NonFiniteError
from trainkit import SHIM, error_line, run_python, save_tiny_vae, tiny_flags, train_cli

REFERENCE_FLAGS = [
    "--data-path", "d", "--results-dir", "r", "--model", "SiT-B/2", "--image-size", "512", "--num-classes", "10",
    "--epochs", "3", "--global-batch-size", "64", "--global-seed", "1", "--vae", "mse", "--num-workers", "2",
    "--log-every", "5", "--ckpt-every", "6", "--sample-every", "7", "--cfg-scale", "1.5", "--wandb", "--ckpt", "c.pt",
    "--disp", "--path-type", "GVP", "--prediction", "noise", "--loss-weight", "likelihood", "--sample-eps", "0.01",
    "--train-eps", "0.02",
]  # fmt: skip


def test_every_reference_flag_parses():
    args = build_parser("train").parse_args(REFERENCE_FLAGS)
    assert (args.model, args.image_size, args.global_batch_size, args.vae) == ("SiT-B/2", 512, 64, "mse")
    assert args.wandb and args.disp and args.ckpt == "c.pt" and args.loss_weight == "likelihood"
    assert build_parser("train").parse_args(["--loss-weight", "None"]).loss_weight is None  # the reference's literal


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--data-path", "d", "--bogus-flag", "1"])
    assert exit_info.value.code == 2
    assert "disploss train: error: unrecognized arguments: --bogus-flag 1" in capsys.readouterr().err


def test_unknown_flag_through_the_train_py_shim(tmp_path):
    proc = run_python([SHIM, "--model", "SiT-T/2", "--data-path", "d", "--dispp"], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "unrecognized arguments: --dispp" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flag, choices",
    [
        ("--path-type", ["Linear", "GVP", "VP"]),
        ("--prediction", ["velocity", "score", "noise"]),
        ("--loss-weight", ["velocity", "likelihood"]),
        ("--disp-variant", ["infonce_l2", "infonce_cosine", "hinge", "covariance"]),
        ("--on-nonfinite", ["error", "skip"]),
        ("--on-bad-image", ["skip", "error"]),
        ("--precision", ["fp32", "tf32", "bf16"]),
    ],
)
def test_unknown_choice_names_the_flag_and_the_choices(capsys, flag, choices):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--data-path", "d", flag, "Bogus"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"disploss train: error: argument {flag}: invalid choice: 'Bogus'")
    assert all(c in line for c in choices)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"model": "SiT-Q/2"}, ["--model 'SiT-Q/2'", "SiT-XL/2", "SiT-S/8", "SiT-T/2"]),
        ({"cfg_scale": 0.5}, ["--cfg-scale", ">= 1"]),
        ({"image_size": 9}, ["--image-size 9", "patch size 2", "8 or 10"]),
        ({"disp": True, "disp_block": 6}, ["--disp-block 6", "6 blocks", "0..5", "-6..-1"]),
        ({"global_batch_size": 0}, ["--global-batch-size", "at least 1"]),
        ({"data_path": None}, ["--data-path is required"]),
        ({"ckpt": "/nonexistent/x.pt"}, ["checkpoint not found: /nonexistent/x.pt"]),
    ],
)
def test_bad_values_are_one_line_errors(images, tmp_path, capsys, overrides, expected):
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, **overrides)) == 2
    line = error_line(capsys)
    assert all(e in line for e in expected), line
    assert not (tmp_path / "results").exists()  # nothing created


def test_global_batch_not_divisible_by_processes(images, tmp_path, monkeypatch, capsys):
    three = distributed.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "init", lambda *a, **k: three)
    assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 2  # batch 8 over 3 processes
    assert "--global-batch-size 8 is not divisible by the number of processes 3" in error_line(capsys)


def test_corrupt_checkpoint_is_one_line(images, tmp_path, capsys):
    path = tmp_path / "0000001.pt"
    model = create_model("SiT-T/2", input_size=8, in_channels=3, num_classes=3)
    save_checkpoint(path, {"model": model.state_dict()})
    path.write_bytes(path.read_bytes()[:1000])
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, ckpt=path)) == 2
    assert "truncated" in error_line(capsys)


# -- a checkpoint of another model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A training checkpoint of SiT-T/2, 8 px pixels, 3 classes."""
    model = create_model("SiT-T/2", input_size=8, in_channels=3, num_classes=3)
    path = tmp_path_factory.mktemp("ckpt") / "0000001.pt"
    return save_checkpoint(
        path, {"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "args": {"model": "SiT-T/2"}}
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"num_classes": 5}, ["--num-classes 3"]),
        ({"model": "SiT-T/1"}, ["SiT-T/2", "--model"]),
        ({"image_size": 16}, ["--image-size 8"]),
    ],
)
def test_checkpoint_of_another_model(images, ckpt, tmp_path, capsys, overrides, expected):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, ckpt=ckpt, **overrides)) == 2
    line = error_line(capsys)
    assert f"--ckpt {ckpt} does not fit" in line and all(e in line for e in expected), line


# -- image sizes and the VAE ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    pytest.importorskip("diffusers")
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.mark.parametrize(
    "model, size, expected",
    [
        ("SiT-T/2", 9, ["--image-size 9", "VAE downsampling factor 2", "8 or 10"]),
        ("SiT-T/4", 12, ["--image-size 12", "latents of side 6", "patch size 4", "8 or 16"]),
    ],
)
def test_image_size_the_vae_and_patch_do_not_divide(images, vae, tmp_path, capsys, model, size, expected):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, vae=vae, model=model, image_size=size)) == 2
    line = error_line(capsys)
    assert all(e in line for e in expected), line


# -- run(): user errors are one line, bugs keep their traceback ----------------------------------------------------
@pytest.mark.parametrize(
    "error, status",
    [
        (ConfigError("bad value"), 2),  # every user error the library raises is a UsageError
        (ValueError("a bug's ValueError"), None),  # a bare ValueError is not the user's: traceback
        (FileNotFoundError("no such file"), 2),
        (OSError(errno.ENOSPC, "No space left on device"), 2),
        (HubUnavailableError("could not fetch the VAE"), 2),  # offline hub: the message says what to do
        (NonFiniteError("non-finite flow loss at step 3"), 1),
        (RuntimeError("internal"), None),
        (KeyError("internal"), None),
        (OSError(errno.EIO, "Input/output error"), None),
    ],
)
def test_run_catches_user_errors_only(monkeypatch, capsys, error, status):
    def fail(cfg):
        raise error

    monkeypatch.setattr(train, "train", fail)
    args = build_parser("train").parse_args(["--data-path", "d"])
    if status is None:
        with pytest.raises(type(error)):
            train.run(args)
        assert capsys.readouterr().err == ""
    else:
        assert train.run(args) == status
        assert error_line(capsys)


def test_worker_traceback_becomes_one_line():
    wrapped = ValueError(
        "Caught UnreadableImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ndisploss.data.UnreadableImageError: cannot read image file /d/a.png: broken'
    )
    assert report.one_line(wrapped) == "cannot read image file /d/a.png: broken"


def test_wandb_without_its_variables(images, tmp_path, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_KEY", "WANDB_API_KEY", "PROJECT", "ENTITY"):
        monkeypatch.delenv(name, raising=False)
    assert train_cli(tiny_flags(images, tmp_path, steps=1, wandb=True)) == 2
    line = error_line(capsys)
    assert "WANDB_KEY" in line and "PROJECT" in line and "WANDB_MODE=offline" in line
