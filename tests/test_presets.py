"""--preset release | jax | demo: the paper's settings by name (their values from docs/paper.md), laid under the flags
given, printed in the log, stored in config.json, listed by --help."""

from __future__ import annotations

import json

import pytest

from disploss.commands.main import build_parser
from disploss.commands.train import train_config
from disploss.errors import ConfigError
from disploss.training import TrainConfig, presets
from trainkit import make_image_folder, only_run, train_cli

# docs/paper.md, "Settings": the PyTorch release and the paper's JAX runs (lambda, tau, block, AdamW beta2).
RELEASE = dict(disp_weight=0.25, disp_tau=1.0, disp_variant="infonce_l2", disp_block="-1", beta2=0.999)
JAX = dict(disp_weight=0.5, disp_tau=0.5, disp_variant="infonce_l2", beta2=0.95)


def _cfg(*argv: str) -> TrainConfig:
    return train_config(build_parser("train").parse_args(list(argv)))


@pytest.mark.parametrize("name, values", [("release", RELEASE), ("jax", JAX)])
def test_the_paper_presets_hold_the_papers_values(name, values):
    cfg = _cfg("--preset", name, "--data-path", "d", "--disp")
    assert {k: getattr(cfg, k) for k in values} == values
    assert cfg.preset == name and cfg.disp and cfg.global_batch_size == 256 and cfg.lr == 1e-4


@pytest.mark.parametrize("model, depth", [("SiT-XL/2", 28), ("SiT-B/2", 12), ("SiT-L/4", 24), ("SiT-S/8", 12)])
def test_jax_block_is_the_output_of_block_depth_over_4(model, depth):
    """The block at depth num_layers // 4 (1-based): SiT-XL/2's block 7 of 28, i.e. --disp-block 6."""
    cfg = _cfg("--preset", "jax", "--model", model, "--data-path", "d")
    assert cfg.disp_block == str(depth // 4 - 1)
    assert _cfg("--preset", "jax", "--data-path", "d").disp_block == "6"  # the default model, SiT-XL/2


def test_release_is_the_defaults_by_name():
    plain, named = _cfg("--data-path", "d"), _cfg("--data-path", "d", "--preset", "release")
    assert {**named.as_dict(), "preset": None} == plain.as_dict()


def test_explicit_flags_override_the_preset():
    cfg = _cfg("--preset", "jax", "--data-path", "d", "--disp-weight", "0.3", "--beta2", "0.999", "--disp-block", "2")
    assert (cfg.disp_weight, cfg.beta2, cfg.disp_block, cfg.disp_tau) == (0.3, 0.999, "2", 0.5)
    demo = _cfg("--preset", "demo", "--data-path", "/my/images", "--num-classes", "3", "--max-steps", "10")
    assert (demo.data_path, demo.num_classes, demo.max_steps, demo.model, demo.vae, demo.image_size) == (
        "/my/images",
        3,
        10,
        "SiT-T/2",
        "none",
        8,
    )
    # a flag given with the value of the default still wins over the preset
    assert _cfg("--preset", "jax", "--data-path", "d", "--beta2", "0.999").beta2 == 0.999


def test_demo_preset_is_the_demo_command():
    import dataclasses

    built = presets.build("demo", disp=True, results_dir="results/demo", device="cpu")
    assert built.preset == "demo" and dataclasses.replace(built, preset=None) == presets.demo()


def test_unknown_preset_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["--preset", "paper"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --preset: invalid choice: 'paper' (choose from 'release', 'jax'" in err
    with pytest.raises(ConfigError, match="valid choices: release, jax, demo"):
        presets.build("paper")


def test_help_lists_the_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["--help"])
    text = capsys.readouterr().out
    line = " ".join(text.split("--preset {release,jax,demo}")[-1].split("\n  --")[0].split())  # its help, one line
    for name in ("release:", "jax:", "demo:"):
        assert name in line
    assert "lambda 0.5, tau 0.5, the block at depth // 4, AdamW beta2 0.95" in line


def test_a_preset_run_prints_it_and_stores_it(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    flags = ["--preset", "demo", "--data-path", str(data), "--num-classes", "3", "--results-dir", str(tmp_path / "r"),
             "--max-steps", "1", "--global-batch-size", "8", "--sample-every", "0", "--disp"]  # fmt: skip
    assert train_cli(flags) == 0
    run = only_run(tmp_path / "r")
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "demo" and config["model"] == "SiT-T/2" and config["lr"] == 1e-3
    assert config["global_batch_size"] == 8 and config["max_steps"] == 1 and config["disp_variant"] == "infonce_cosine"
    log = (run / "log.txt").read_text()
    line = next(line for line in log.splitlines() if "preset demo (" in line)
    assert "lr 0.001" in line and "the flags given override" in line and "global_batch_size 8" in line
    assert "--disp is off" not in line
