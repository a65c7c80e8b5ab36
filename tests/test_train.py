"""`disploss train` / `train.py` end to end on CPU: the seed README's commands (--disp, --wandb, --ckpt PATH),
what a run writes (metrics.jsonl, plain checkpoints, sample grids of the run's own classes, files as readable as
the umask allows), the dispersive flags reaching the loss, a tiny diffusers VAE through extract-latents, --latents
and --vae, and wandb's environment variables left alone without --wandb."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image

import disploss.regularizer as regularizer_module
from disploss.commands.main import main as cli_main
from disploss.models import SiTBlock
from disploss.sampling.grid import grid_labels
from trainkit import SHIM, load, make_image_folder, only_run, run_python, save_tiny_vae, tiny_flags, train_cli

METRIC_KEYS = ("loss", "flow", "disp", "steps_per_sec", "images_per_sec", "lr", "grad_norm", "peak_mem_gb")


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def grid_size(rows: int, per_row: int, side: int, padding: int = 2) -> tuple[int, int]:
    """(width, height) of a sample grid PNG (disploss.imageio.make_grid); train.py enlarges tiny images to 64 px."""
    side *= max(1, 64 // side)
    return per_row * (side + padding) + padding, rows * (side + padding) + padding


# -- the README's commands --------------------------------------------------------------------------------------
def test_readme_commands_disp_wandb_then_ckpt_path(images, tmp_path, capsys):
    """`train.py --model M --data-path D --disp --wandb` (WANDB_MODE=offline: no account, no network), then
    `... --disp --ckpt /path/to/model.pt` continues that run at its step, in its folder."""
    pytest.importorskip("wandb")
    results, wandb_dir = tmp_path / "results", tmp_path / "wandb"
    proc = run_python(
        [SHIM, *tiny_flags(images, results, steps=2, disp=True, wandb=True)],
        tmp_path,
        WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir),
        WANDB_SILENT="true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(results)
    assert run.name == "000-SiT-T-2-Linear-velocity-None"  # the reference's folder name
    assert (run / "wandb_id.txt").is_file()
    assert list((wandb_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run under WANDB_DIR"
    assert [m["step"] for m in metrics_of(run)] == [1, 2]

    ckpt = run / "checkpoints" / "0000001.pt"
    capsys.readouterr()
    assert train_cli(tiny_flags(images, results, steps=3, disp=True, ckpt=ckpt)) == 0
    assert f"resumed from {ckpt} at step 1" in capsys.readouterr().out
    assert only_run(results) == run
    assert load(run / "checkpoints" / "0000003.pt")["step"] == 3
    assert [m["step"] for m in metrics_of(run)] == [1, 2, 3]  # the lines after step 1 were logged again


# -- what one run writes ----------------------------------------------------------------------------------------
class RecordingEnviron(dict):
    """os.environ stand-in that remembers every variable read."""

    def __init__(self, base):
        super().__init__(base)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@pytest.fixture(scope="module")
def run(images, tmp_path_factory):
    """2 steps with --disp, 3 classes, a sample grid at the end; os.environ records what is read."""
    results = tmp_path_factory.mktemp("run")
    environ = RecordingEnviron({**os.environ, "ENTITY": "someone", "PROJECT": "something", "WANDB_KEY": "x"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", environ)
        status = train_cli(tiny_flags(images, results, steps=2, disp=True, sample_every=2, sample_steps=2))
    assert status == 0
    return only_run(results), environ


def test_metrics_jsonl(run):
    folder, _ = run
    lines = metrics_of(folder)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in METRIC_KEYS:
            assert isinstance(m[key], float) and math.isfinite(m[key]), key
        assert m["loss"] == pytest.approx(m["flow"] + 0.25 * m["disp"], rel=1e-5)  # lambda 0.25
        assert -math.log(8) - 1e-5 <= m["disp"] <= 0  # InfoNCE-L2 of a local batch of 8
        assert m["lr"] == 1e-4 and m["images_per_sec"] == pytest.approx(8 * m["steps_per_sec"])
        assert m["skipped_steps"] == 0


def test_checkpoint_is_plain_and_complete(run):
    folder, _ = run
    state = load(folder / "checkpoints" / "0000002.pt")  # weights_only=True: tensors and plain containers only
    assert {"model", "ema", "opt", "args", "step", "rng"} <= state.keys()
    assert state["step"] == 2
    assert type(state["args"]) is dict and state["args"]["model"] == "SiT-T/2" and state["args"]["disp"] is True
    json.dumps(state["args"])  # plain values all the way down
    assert state["args"]["model_config"]["num_classes"] == 3
    assert state["model"].keys() == state["ema"].keys() and "pos_embed" in state["model"]
    assert isinstance(state["rng"], list) and isinstance(state["rng"][0]["cpu"], torch.Tensor)
    assert {"state", "param_groups"} <= state["opt"].keys()
    assert json.loads((folder / "config.json").read_text())["model"] == "SiT-T/2"


def test_sample_grid_has_a_row_per_class_of_the_run(run):
    folder, _ = run
    with Image.open(folder / "samples" / "0000002.png") as grid:
        assert grid.size == grid_size(rows=3, per_row=8, side=8)  # 3 classes, not 1000


def test_grid_labels():
    assert grid_labels(3) == ([0, 1, 2], 8)
    classes, per_row = grid_labels(1000)
    assert per_row == 4 and len(classes) == 10 and classes[0] == 0 and classes[-1] == 999


def test_wandb_variables_not_read_without_wandb(run):
    _, environ = run
    assert not {"ENTITY", "PROJECT", "WANDB_KEY"} & environ.read


# -- the dispersive flags reach the loss ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, block, variant, kwargs, weight",
    [
        ({}, 5, "infonce_l2", {"tau": 1.0}, 0.25),  # the PyTorch release: last block of 6, tau 1, lambda 0.25
        (
            {"disp_block": 1, "disp_variant": "hinge", "disp_margin": 0.5, "disp_weight": 0.5},
            1,
            "hinge",
            {"margin": 0.5},
            0.5,
        ),
        (
            {"disp_block": -3, "disp_variant": "infonce_cosine", "disp_tau": 0.5},
            3,
            "infonce_cosine",
            {"tau": 0.5},
            0.25,
        ),
        ({"disp_variant": "covariance"}, 5, "covariance", {}, 0.25),
    ],
)
def test_disp_flags_are_wired(images, tmp_path, monkeypatch, flags, block, variant, kwargs, weight):
    calls, block_outputs = [], []
    real_loss, real_block = regularizer_module.dispersive_loss, SiTBlock.forward

    def recording_loss(z, variant="infonce_l2", tau=1.0, margin=1.0, gather=False):
        value = real_loss(z, variant, tau=tau, margin=margin, gather=gather)
        calls.append(dict(z=z, variant=variant, tau=tau, margin=margin, gather=gather, value=value.item()))
        return value

    def recording_block(self, x, c):
        out = real_block(self, x, c)
        block_outputs.append(out)
        return out

    monkeypatch.setattr(regularizer_module, "dispersive_loss", recording_loss)
    monkeypatch.setattr(SiTBlock, "forward", recording_block)
    assert train_cli(tiny_flags(images, tmp_path, steps=1, disp=True, **flags)) == 0
    (call,) = calls
    assert [i for i, a in enumerate(block_outputs[:6]) if a is call["z"]] == [block]  # the step's 6 blocks
    assert call["variant"] == variant and call["gather"] is False
    assert all(call[k] == v for k, v in kwargs.items())
    (m,) = metrics_of(only_run(tmp_path))
    assert m["disp"] == pytest.approx(call["value"], abs=1e-6)
    assert m["loss"] == pytest.approx(m["flow"] + weight * m["disp"], rel=1e-5, abs=1e-6)


def test_without_disp_the_loss_is_not_computed(images, tmp_path, monkeypatch):
    monkeypatch.setattr(regularizer_module, "dispersive_loss", lambda *a, **k: pytest.fail("dispersive loss called"))
    assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 0
    (m,) = metrics_of(only_run(tmp_path))
    assert m["disp"] == 0.0 and m["loss"] == pytest.approx(m["flow"])


# -- a tiny diffusers VAE end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    pytest.importorskip("diffusers")
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def images16(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images16"), size=16)


def _vae_run_checks(run) -> None:
    state = load(run / "checkpoints" / "0000002.pt")
    config = state["args"]["model_config"]
    assert (config["in_channels"], config["input_size"]) == (4, 8)  # 16 px images, factor 2, 4 channels
    with Image.open(run / "samples" / "0000002.png") as grid:  # decoded to 16 px by the VAE
        assert grid.size == grid_size(rows=3, per_row=8, side=16)


def test_vae_folder_extract_latents_then_train_on_latents(vae, images16, tmp_path):
    cache = tmp_path / "latents"
    status = cli_main(
        [
            "extract-latents",
            "--data-path",
            str(images16),
            "--vae",
            str(vae),
            "--out",
            str(cache),
            "--image-size",
            "16",
            "--num-classes",
            "3",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert status == 0 and (cache / "manifest.json").is_file()
    flags = tiny_flags(
        None,
        tmp_path / "results",
        steps=2,
        image_size=16,
        latents=cache,
        vae=None,
        disp=True,
        sample_every=2,
        sample_steps=2,
        ckpt_every=2,
    )
    assert train_cli(flags) == 0
    _vae_run_checks(only_run(tmp_path / "results"))


def test_vae_folder_encodes_during_training(vae, images16, tmp_path):
    flags = tiny_flags(
        images16, tmp_path, steps=2, image_size=16, vae=vae, disp=True, sample_every=2, sample_steps=2, ckpt_every=2
    )
    assert train_cli(flags) == 0
    _vae_run_checks(only_run(tmp_path))


# -- several blocks, per-block values and diagnostics ------------------------------------------------------------
@pytest.mark.parametrize("spec, blocks", [("0,-1,2", [0, 2, 5]), ("all", [0, 1, 2, 3, 4, 5])])
def test_multi_block_disp_logs_each_block_and_diagnostics(images, tmp_path, spec, blocks):
    assert train_cli(tiny_flags(images, tmp_path, steps=2, disp=True, disp_block=spec, disp_tau=0.5)) == 0
    rows = metrics_of(only_run(tmp_path))
    assert len(rows) == 2
    for m in rows:
        per_block = [m[f"disp/blocks.{i}"] for i in blocks]
        assert not any(k.startswith("disp/blocks.") and int(k.split(".")[-1]) not in blocks for k in m)
        assert m["disp"] == pytest.approx(sum(per_block) / len(per_block), rel=1e-5, abs=1e-6)
        assert m["loss"] == pytest.approx(m["flow"] + 0.25 * m["disp"], rel=1e-5, abs=1e-6)
        for i in blocks:
            for stat in ("rms", "median_d", "unsaturated", "offdiag_weight", "effective_rank"):
                assert math.isfinite(m[f"diag/blocks.{i}/{stat}"])
            assert 0 <= m[f"diag/blocks.{i}/offdiag_weight"] < 1 and 1 <= m[f"diag/blocks.{i}/effective_rank"] <= 8
    log = (only_run(tmp_path) / "log.txt").read_text()
    assert "disp: " in log and "diag/" not in log and "disp/blocks" not in log  # the console line stays short


def test_disp_block_syntax_errors(images, tmp_path, capsys):
    from trainkit import error_line

    assert train_cli(tiny_flags(images, tmp_path / "a", steps=1, disp=True, disp_block="1,x")) == 2
    assert "--disp-block '1,x' is not a block index, a comma list of them (0,6,27) or all" in error_line(capsys)
    assert train_cli(tiny_flags(images, tmp_path / "b", steps=1, disp=True, disp_block="0,6")) == 2
    assert "--disp-block 6 is out of range: SiT-T/2 has 6 blocks" in error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_baseline_runs_log_the_diagnostics_of_the_watched_block(images, tmp_path, monkeypatch):
    monkeypatch.setattr(regularizer_module, "dispersive_loss", lambda *a, **k: pytest.fail("dispersive loss called"))
    assert train_cli(tiny_flags(images, tmp_path, steps=2, log_every=2)) == 0
    (m,) = metrics_of(only_run(tmp_path))
    assert m["disp"] == 0.0
    assert {k for k in m if k.startswith("diag/")} == {
        f"diag/blocks.5/{s}" for s in ("rms", "median_d", "unsaturated", "offdiag_weight", "effective_rank")
    }


def test_every_run_plots_its_losses_and_diagnostics(images, tmp_path):
    assert train_cli(tiny_flags(images, tmp_path, steps=2, disp=True)) == 0
    curve = only_run(tmp_path) / "loss_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_are_readable_as_the_umask_allows(images, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert train_cli(tiny_flags(images, tmp_path, steps=1, sample_every=1, sample_steps=2)) == 0
    finally:
        os.umask(old)
    run = only_run(tmp_path)
    files = [run / "config.json", run / "checkpoints" / "0000001.pt", run / "samples" / "0000001.png",
             run / "metrics.jsonl", run / "log.txt"]  # fmt: skip
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
