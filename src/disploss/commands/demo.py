"""`disploss demo` (behind `make demo`): a small SiT with dispersive loss on scikit-learn's bundled digits, in pixel
space on the CPU, in minutes (the settings: disploss.training.presets.demo). Leaves in its run folder a sample grid
(a row per digit), a loss curve with the flow and dispersive terms, and a checkpoint that `sample.py` reads."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from disploss.commands.flags import add_config_arguments, config_from_namespace
from disploss.commands.report import guarded
from disploss.dispersive import ALL_VARIANTS
from disploss.options import at_least, check_options, option, positive
from disploss.runtime import DEVICES
from disploss.training import presets, train

DEMO = presets.demo()  # the defaults shown by the flags below


@dataclass(frozen=True)
class DemoConfig:
    """The flags of `disploss demo`: what a user changes about the demo; everything else is presets.demo's."""

    results_dir: str = option(DEMO.results_dir, "parent folder of the run")
    steps: int = option(DEMO.max_steps, "training steps", check=at_least(1))
    no_disp: bool = option(False, "train the baseline, without dispersive loss")
    disp_variant: str = option(DEMO.disp_variant, "dispersive variant", choices=ALL_VARIANTS)
    disp_weight: float = option(DEMO.disp_weight, "lambda", check=positive)
    disp_tau: float = option(DEMO.disp_tau, "temperature", check=positive)
    seed: int = option(DEMO.global_seed, "global seed")
    device: str = option(DEMO.device, "device", choices=DEVICES)
    threads: int = option(
        1, "torch CPU threads. 1 never stalls: with more, torch's thread pool waits for any thread that another "
        "process keeps off its core (2-30x slower steps on a busy 2-core machine, BENCHMARKS.md)", check=at_least(1),
    )  # fmt: skip

    def __post_init__(self):
        check_options(self)


def run_demo(cfg: DemoConfig, log=print) -> Path:
    """Train the demo, plot its losses; returns the run folder."""
    import torch

    start = time.time()
    tc = presets.demo(
        cfg.results_dir, cfg.steps, disp=not cfg.no_disp, seed=cfg.seed, device=cfg.device,
        disp_variant=cfg.disp_variant, disp_weight=cfg.disp_weight, disp_tau=cfg.disp_tau,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    log(f"demo: {cfg.steps} steps of {tc.model} on the bundled digits, {cfg.threads} CPU thread(s) (--threads)")
    try:
        run_dir = train(tc)
    finally:
        torch.set_num_threads(threads)
    curve = run_dir / "loss_curve.png"  # written by train() (disploss.training.plots)
    grid = run_dir / "samples" / f"{cfg.steps:07d}.png"
    ckpt = run_dir / "checkpoints" / f"{cfg.steps:07d}.pt"
    log(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")
    log(f"  sample grid (a row per digit 0-9): {grid}")
    log(f"  loss curve:                        {curve}")
    log(f"  checkpoint:                        {ckpt}")
    log(
        f"  sample again: python sample.py ODE --ckpt {ckpt} --cfg-scale {tc.cfg_scale} --out samples/digits.png"
        f"  (the grid's guidance scale; sample.py's default 4.0 is the reference's for ImageNet)"
    )
    return run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        run_demo(config_from_namespace(DemoConfig, args))
        return 0

    return guarded("demo", go)
