"""Helpers of the training tests (test_train, test_resume, test_reliability, test_cli): a tiny ImageFolder,
the flags of a tiny CPU run, running `disploss train` in process, in a subprocess or under torchrun, and
comparing checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "train.py"  # the reference's entry point: `torchrun ... train.py --model ... --data-path ... --disp`


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 8, seed: int = 0) -> Path:
    """root/class_{k}/{i}.png: random RGB PNGs (a few larger than `size`, so the centre crop runs)."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = size if i % 3 else size + 4
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_flags(data: Path | str, results: Path | str, steps: int = 4, **overrides) -> list[str]:
    """Flags of a tiny CPU run: SiT-T/2 on 8 px pixels, 3 classes, batch 8, a checkpoint and a log line per
    step, no sample grids. `overrides` replace or add flags: ckpt_every=2 -> --ckpt-every 2; True -> a switch."""
    flags = {
        "model": "SiT-T/2", "data_path": data, "vae": "none", "image_size": 8, "num_classes": 3,
        "global_batch_size": 8, "num_workers": 0, "max_steps": steps, "log_every": 1, "ckpt_every": 1,
        "sample_every": 0, "results_dir": results, "device": "cpu",
    }  # fmt: skip
    flags.update(overrides)
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def train_cli(argv: list[str]) -> int:
    """`disploss train ARGV` in this process; returns the exit status."""
    from disploss.commands.main import main

    return main(["train", *map(str, argv)])


def env(**extra: str) -> dict:
    """Environment of a child process: one thread per process (two cores are shared), no GPU."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in launcher}  # a child decides its own world
    out.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run_python(args: list, cwd: Path, timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process (text output captured)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env(**extra_env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def torchrun(nproc: int, args: list, cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nnodes=1 --nproc_per_node=N ARGS` (gloo on CPU). --standalone picks a free
    port, so concurrent test sessions do not collide on 29500."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    return run_python([*launcher, *args], cwd, timeout=timeout, **extra_env)


def run_dirs(results: Path) -> list[Path]:
    """The experiment folders in a --results-dir, by name."""
    return sorted(p for p in Path(results).iterdir() if p.is_dir())


def only_run(results: Path) -> Path:
    (folder,) = run_dirs(results)
    return folder


def load(path: Path) -> dict:
    """A checkpoint, loaded the strict way (no code can run)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def save_tiny_vae(folder: Path, scaling_factor: float | None = None, latent_channels: int = 4) -> Path:
    """A tiny random diffusers AutoencoderKL (downsampling factor 2) saved to `folder` with save_pretrained;
    diffusers' default scaling_factor (the SD value) unless one is given."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kwargs = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
        sample_size=16, **kwargs,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def error_line(capsys) -> str:
    """The one line `disploss train` printed to stderr (asserting it is one line, not a traceback)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("disploss train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err
