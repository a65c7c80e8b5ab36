"""The demo (`disploss demo`, behind `make demo`): a small SiT with dispersive loss on scikit-learn's bundled digits,
in pixel space on the CPU, in minutes. Leaves in its run folder a sample grid (a row per digit), a loss
curve with the flow and dispersive terms, and a checkpoint that `sample.py` reads."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from disploss.dispersive import ALL_VARIANTS
from disploss.options import at_least, check_options, option, positive
from disploss.runtime import DEVICES
from disploss.training import DIGITS, TrainConfig, train

# The embedded default: every value a researcher would want to see in one place. 8 px: the digits' own resolution
# (16 px would be a bilinear upsample of the same images at 4x the cost per step); grids enlarge them. EMA 0.99 (half-life ~70 steps):
# with the reference's 0.9999, or even 0.999, the EMA after 1500 steps still holds much of the initial weights
# and samples noise.
# The dispersive variant is InfoNCE with cosine distance (a variant of the paper, section 3), not the release's
# InfoNCE-L2: on a model this small, InfoNCE-L2 at lambda 0.25, tau 1 reaches its floor -log B by inflating the
# hidden activations about 5x and the samples stop following their class (experiments/digits: feature-FID 252
# against 89 for the baseline at 800 steps); the cosine variant cannot inflate norms. `--disp-variant
# infonce_l2 --disp-tau 1` runs the release's settings.
DEMO = dict(
    data_path=DIGITS, vae="none", image_size=8, model="SiT-T/2", num_classes=10, global_batch_size=64,
    lr=1e-3, ema_decay=0.99, disp=True, disp_variant="infonce_cosine", disp_weight=0.25, disp_tau=0.5,
    num_workers=0, log_every=50,
    cfg_scale=2.0, precision="fp32", sample_steps=50,
)  # fmt: skip


@dataclass(frozen=True)
class DemoConfig:
    """The flags of `disploss demo`: what a user changes about the demo; everything else is DEMO's."""

    results_dir: str = option("results/demo", "parent folder of the run")
    steps: int = option(1500, "training steps", check=at_least(1))
    no_disp: bool = option(False, "train the baseline, without dispersive loss")
    disp_variant: str = option(DEMO["disp_variant"], "dispersive variant", choices=ALL_VARIANTS)
    disp_weight: float = option(DEMO["disp_weight"], "lambda", check=positive)
    disp_tau: float = option(DEMO["disp_tau"], "temperature", check=positive)
    seed: int = option(0, "global seed")
    device: str = option("cpu", "device", choices=DEVICES)
    threads: int = option(
        1, "torch CPU threads. 1 never stalls: with more, torch's thread pool waits for any thread that another "
        "process keeps off its core (2-30x slower steps on a busy 2-core machine, BENCHMARKS.md)", check=at_least(1),
    )  # fmt: skip

    def __post_init__(self):
        check_options(self)


def demo_config(
    results_dir: str, steps: int, disp: bool = True, seed: int = 0, device: str = "cpu", **disp_settings
) -> TrainConfig:
    """The demo's TrainConfig: checkpoints and the sample grid at the last step only.

    disp_settings: disp_variant / disp_weight / disp_tau overrides.
    """
    return dataclasses.replace(
        TrainConfig(**DEMO), results_dir=results_dir, max_steps=steps, ckpt_every=steps, sample_every=steps,
        disp=disp, global_seed=seed, device=device, **disp_settings,
    )  # fmt: skip


def run_demo(cfg: DemoConfig, log=print) -> Path:
    """Train the demo, plot its losses; returns the run folder."""
    import torch

    start = time.time()
    tc = demo_config(
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
        f"  sample again: python sample.py ODE --ckpt {ckpt} --cfg-scale {DEMO['cfg_scale']} --out samples/digits.png"
        f"  (the grid's guidance scale; sample.py's default 4.0 is the reference's for ImageNet)"
    )
    return run_dir
