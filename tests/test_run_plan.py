"""What a run says before its first step: the tokens per image, the step's model FLOPs and its estimated time (a
warning naming the flags when it would take minutes), the EMA's horizon against the run's length (and the opt-in
warm-up); what its grids sample (--sample-weights, MeanFlow's one step) and how MeanFlow's losses are labelled."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from disploss.training import TrainConfig
from disploss.training.ema import EMA, ema_decay_at, horizon_warning, initial_share
from disploss.training.run import cost
from trainkit import load, only_run, tiny_flags, train_cli

MF = dict(objective="meanflow", meanflow_ratio=0.5)


def _meta_config(name: str, side: int, channels: int = 4) -> dict:
    from disploss.models import create_model

    with torch.device("meta"):
        return create_model(name, input_size=side, in_channels=channels, num_classes=1000).config()


# -- the step's cost ------------------------------------------------------------------------------------------------
def test_step_flops_follow_the_dit_gflops():
    """docs/paper.md: SiT-XL/2 at 32x32 latents is 118.6 GMACs per forward; a training step is 3 x 2 x MACs per image
    (BENCHMARKS.md's convention), 4 x 2 with activation checkpointing."""
    config = _meta_config("SiT-XL/2", 32)
    flops = cost.step_flops(config, 32, TrainConfig(data_path="d"))
    assert flops == pytest.approx(6 * 118.6e9 * 32, rel=0.01)
    recomputed = cost.step_flops(config, 32, TrainConfig(data_path="d", grad_checkpointing=True))
    assert recomputed == pytest.approx(flops * 8 / 6)


def test_the_issues_pixel_run_has_16384_tokens_and_warns(monkeypatch):
    """SiT-T/2 on 256 px pixels (--vae none): (256 / 2)^2 = 16,384 tokens per image; at 60 GFLOP/s (what the
    2-core CPU does in matmuls) a step of batch 256 takes hours, and the warning names the flags to change."""
    import disploss.runtime

    monkeypatch.setattr(disploss.runtime, "matmul_flops_per_second", lambda device, precision="fp32": 60e9)
    cfg = TrainConfig(data_path="d", model="SiT-T/2", vae="none", image_size=256)
    config = _meta_config("SiT-T/2", 256, channels=3)
    estimate = cost.estimate(config, 256, cfg, torch.device("cpu"))
    assert estimate.tokens == 16_384
    assert estimate.seconds == pytest.approx(cost.step_flops(config, 256, cfg) / 60e9)
    assert estimate.seconds > 3600
    warning = cost.slow_step_warning(estimate, cfg, torch.device("cpu"))
    for flag in ("--image-size 128 has 4,096", "--vae ema or mse", "--model SiT-T/4", "--global-batch-size"):
        assert flag in warning, warning
    line = cost.cost_line(estimate, cfg, config, 256, torch.device("cpu"))
    assert line.startswith("SiT-T/2 sees 16,384 tokens per image (256x256 input, patch 2)") and " h per step" in line
    small = cost.estimate(_meta_config("SiT-T/2", 8, 3), 64, cfg, torch.device("cpu"))
    assert cost.slow_step_warning(small, cfg, torch.device("cpu")) is None  # the demo: well under a second


def test_the_first_lines_come_before_the_first_step(images, tmp_path, monkeypatch):
    """A run whose step is estimated over 60 s says so, with the EMA warning, before the first step's line."""
    import disploss.runtime

    monkeypatch.setattr(disploss.runtime, "matmul_flops_per_second", lambda device, precision="fp32": 1e6)
    assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 0
    lines = (only_run(tmp_path) / "log.txt").read_text().splitlines()
    first_step = next(i for i, line in enumerate(lines) if "(step=0000001" in line)
    cost_at = next(i for i, line in enumerate(lines) if "sees 16 tokens per image (8x8 input, patch 2)" in line)
    slow = next(i for i, line in enumerate(lines) if "WARNING: one training step is estimated at" in line)
    ema = next(
        i for i, line in enumerate(lines) if "WARNING: --ema-decay 0.9999 averages about the last 10,000" in line
    )
    assert max(cost_at, slow, ema) < first_step
    assert re.search(r"a step is [\d.]+ MFLOP of model FLOPs per process \(batch 8\)", lines[cost_at])
    assert "--vae ema or mse instead of --vae none" in lines[slow]


# -- the EMA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay, power, steps", [(0.9999, None, 100), (0.99, None, 300), (0.9999, 0.75, 100)])
def test_initial_share_is_what_the_ema_updates_leave(decay, power, steps):
    """Derived by running the EMA itself: a weight that starts at 0 and is then held at 1."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for s in range(steps):
        ema.update(ema_decay_at(s, decay, power))
    left = 1.0 - float(ema.model.weight)
    assert initial_share(steps, decay, power) == pytest.approx(left, abs=1e-6)


def test_the_warm_up_is_k_diffusions_form():
    """k-diffusion's EMAWarmup (inv_gamma 1): 1 - (1 + step)^-power, capped at the decay; its first update copies."""
    assert ema_decay_at(0, 0.9999, 0.75) == 0.0
    assert ema_decay_at(99, 0.9999, 0.75) == pytest.approx(1 - 100**-0.75)
    assert ema_decay_at(10**9, 0.9999, 0.75) == 0.9999
    assert ema_decay_at(5, 0.9999) == 0.9999  # without it: the reference's constant decay


def test_the_horizon_warning_names_the_fix():
    warning = horizon_warning(100, 0.9999)
    assert "averages about the last 10,000 steps, but the run is 100 step(s) long" in warning
    assert "still hold 99% of the initial weights" in warning
    assert "--ema-decay 0.97" in warning and "--ema-warmup-power" in warning and "--sample-weights model" in warning
    assert horizon_warning(1500, 0.99) is None  # the demo
    assert horizon_warning(400_000, 0.9999) is None  # ImageNet's 80 epochs
    assert horizon_warning(100, 0.9999, 0.75) is None  # warmed up


# -- the grids ------------------------------------------------------------------------------------------------------
def _grid_of(run, weights: str, sample_steps: int = 3) -> np.ndarray:
    """The training grid of the checkpoint's `weights` ('model' or 'ema'), drawn by training_grid directly."""
    from disploss.data.vae import load_vae
    from disploss.models import create_model
    from disploss.sampling.grid import training_grid
    from disploss.transport import create_transport

    config = json.loads((run / "config.json").read_text())
    model = create_model("SiT-T/2", **{k: v for k, v in config["model_config"].items() if k in (
        "input_size", "in_channels", "num_classes", "meanflow")})  # fmt: skip
    model.load_state_dict(load(run / "checkpoints" / "0000002.pt")[weights])
    path = run / f"check_{weights}.png"
    transport = create_transport("Linear", "velocity", None, None, None)
    training_grid(model, load_vae("none"), transport, num_classes=3, cfg_scale=4.0, sample_steps=sample_steps,
                  seed=0, path=path, device=torch.device("cpu"))  # fmt: skip
    return np.asarray(Image.open(path))


def test_sample_weights_model_draws_the_grid_from_the_raw_weights(images, tmp_path):
    flags = tiny_flags(images, tmp_path, steps=2, sample_every=2, sample_steps=3, sample_weights="model", lr=1e-2)
    assert train_cli(flags) == 0
    run = only_run(tmp_path)
    assert json.loads((run / "config.json").read_text())["sample_weights"] == "model"
    log = (run / "log.txt").read_text()
    assert "sampling grid 0000002.png: 24 images from the model's raw weights (--sample-weights model)" in log
    written = np.asarray(Image.open(run / "samples" / "0000002.png"))
    assert np.array_equal(written, _grid_of(run, "model"))
    assert not np.array_equal(written, _grid_of(run, "ema"))  # EMA 0.9999 after 2 steps: other images


def test_meanflow_runs_say_what_they_sample_and_log(images, tmp_path):
    assert train_cli(tiny_flags(images, tmp_path, steps=2, sample_every=2, log_every=1, disp=True, **MF)) == 0
    run = only_run(tmp_path)
    log = (run / "log.txt").read_text()
    assert "from the EMA weights, MeanFlow, 1 step (1 model call), no guidance at sampling" in log
    assert "Heun" not in log and "cfg 4.0" not in log
    assert "MeanFlow: 'loss (weighted)' is the adaptively weighted loss ||delta||^2 / (||delta||^2 + 0.001)^1" in log
    step_lines = [line for line in log.splitlines() if "(step=" in line]
    assert step_lines and all("loss (weighted): " in line and ", mse: " in line for line in step_lines)
    assert all("flow" in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())  # the file keeps it


def test_the_meanflow_plot_labels_its_losses(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.training.run.plots import plot_run

    run = tmp_path / "000-SiT-T-2-Linear-meanflow-None"
    run.mkdir()
    config = {"disp": True, "disp_weight": 0.25, "disp_variant": "infonce_l2", "objective": "meanflow"}
    (run / "config.json").write_text(json.dumps(config))
    rows = [{"step": k, "loss": 0.99 - 0.25 * 3.4, "flow": 5.0 / k, "disp": -3.4} for k in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_run(run)
    titles = [ax.get_title() for ax in figures[0].axes[:3]]
    assert titles == ["MeanFlow error (unweighted)", "dispersive loss (infonce_l2)",
                      "total = adaptively weighted MeanFlow loss + 0.25 x dispersive"]  # fmt: skip
