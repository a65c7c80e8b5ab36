"""`disploss bench`: --quick runs in CI through disploss.commands.main.main and writes a JSON of finite positive numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from disploss.commands.main import main

STEP_KEYS = ("step_ms", "step_ms_min", "images_per_sec", "images_per_sec_best", "peak_mem_gb", "model_tflops")


def _positive(value, where: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (where, value)


def _run(tmp_path, *argv) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), *argv]) == 0
    return json.loads(out.read_text())


def test_quick_writes_every_number(tmp_path, capsys):
    report = _run(tmp_path)
    assert {"meta", "config", "train", "dispersive", "sampling"} <= report.keys()
    meta = report["meta"]
    assert meta["device"] == "cpu" and "3 x 2 x" in meta["flops_convention"]
    _positive(meta["forward_macs_per_image"], "macs")

    train = report["train"]
    for variant in ("ours_nodisp", "ours_disp"):
        for key in STEP_KEYS:
            _positive(train[variant][key], f"{variant}.{key}")
        assert len(train[variant]["step_ms_all"]) == report["config"]["steps"]
        assert "mfu" not in train[variant]  # MFU only against a GPU peak
    _positive(train["disp_term_ms"], "disp_term_ms")
    _positive(train["disp_term_share_of_step"], "disp_term_share_of_step")
    for key in ("disp_share_of_step", "disp_share_of_step_min"):  # differences of noisy timings: any sign
        assert math.isfinite(train[key]) and train[key] < 1
    assert train["reference"]["status"].startswith("not requested")

    disp = report["dispersive"]
    for key in ("ours_ms", "reference_ms", "speedup", "ours_ms_min", "reference_ms_min"):
        _positive(disp[key], f"dispersive.{key}")
    assert (disp["B"], disp["M"]) == (8, 4096)
    assert disp["abs_diff"] < 1e-4 and -math.log(8) <= disp["ours_value"] <= 0

    sampling = report["sampling"]
    steps = sampling["num_steps"]
    for name in ("dopri5", "euler", "heun2", "sde-euler"):
        for key in ("images_per_sec", "nfe_per_image", "ms_per_nfe", "model_tflops"):
            _positive(sampling[name][key], f"{name}.{key}")
    assert sampling["euler"]["nfe_per_image"] == steps - 1
    assert sampling["heun2"]["nfe_per_image"] == 2 * (steps - 1)
    printed = capsys.readouterr().out
    assert "ours_disp" in printed and "NFE/image" in printed and "wrote" in printed


def test_disp_blocks_adds_one_variant_per_block_spec(tmp_path):
    """Each --disp-blocks value is its own variant, regularising exactly its blocks (SiT-T/2 has 6), timed in the
    same interleaved rounds as the others; the other variants' regularisers stay off during its steps."""
    report = _run(tmp_path, "--sections", "train", "--steps", "2", "--warmup", "0", "--disp-blocks", "all; 0,-5")
    train = report["train"]
    expected = {
        "ours_nodisp": [],
        "ours_disp": ["blocks.5"],
        "ours_disp[all]": [f"blocks.{i}" for i in range(6)],
        "ours_disp[0,-5]": ["blocks.0", "blocks.1"],
    }
    for variant, layers in expected.items():
        assert train[variant]["regularised_layers"] == layers, variant
        assert len(train[variant]["step_ms_all"]) == 2
    assert set(train["overhead"]) == set(expected) - {"ours_nodisp"}
    for variant, over in train["overhead"].items():
        assert over["blocks"] == len(expected[variant])
        for key in ("ratio_medians", "ratio_minima", "ratio_paired", "ratio_paired_q1", "ratio_paired_q3"):
            _positive(over[key], f"{variant}.{key}")
        assert over["ratio_paired_q1"] <= over["ratio_paired"] <= over["ratio_paired_q3"]
        with_ms, without_ms = train[variant]["step_ms_all"], train["ours_nodisp"]["step_ms_all"]
        assert over["ratio_minima"] == pytest.approx(min(with_ms) / min(without_ms))
        paired = sorted(w / o for w, o in zip(with_ms, without_ms))
        assert over["ratio_paired"] == pytest.approx(sum(paired) / 2)


def test_reference_models_are_timed_side_by_side(tmp_path):
    """A stand-in reference checkout (our own presets under the reference's module interface, so no timm)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "models.py").write_text("from disploss.models import MODEL_PRESETS as SiT_models\n")
    report = _run(tmp_path, "--sections", "train", "--steps", "1", "--warmup", "0", "--reference-path", str(ref))
    reference = report["train"]["reference"]
    assert reference["status"] == "ok"
    assert reference["forward_max_abs_diff"] == 0.0  # same weights, same code: the same function
    for key in ("speedup_nodisp", "speedup_disp", "speedup_nodisp_min", "speedup_disp_min"):
        _positive(reference[key], key)
    for variant in ("reference_nodisp", "reference_disp"):
        for key in STEP_KEYS:
            _positive(report["train"][variant][key], f"{variant}.{key}")
    assert "dispersive" not in report and "sampling" not in report


def test_reference_needing_a_missing_module_is_reported(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "models.py").write_text("from timm_that_is_not_installed.layers import Mlp\nSiT_models = {}\n")
    report = _run(tmp_path, "--sections", "train,disp", "--steps", "1", "--warmup", "0", "--reference-path", str(ref))
    status = report["train"]["reference"]["status"]
    assert "needs 'timm_that_is_not_installed'" in status and "timm" in status
    assert "reference_nodisp" not in report["train"]
    _positive(report["dispersive"]["reference_ms"], "the reference formula is still timed")


def test_reference_path_without_models_py(tmp_path):
    report = _run(tmp_path, "--sections", "train", "--steps", "1", "--warmup", "0", "--reference-path", str(tmp_path))
    assert "does not exist" in report["train"]["reference"]["status"]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--sections", "train,nope"], "--sections: unknown ['nope']; valid choices: train, disp, sample, paths"),
        (["--samplers", "rk45"], "valid choices: dopri5, dopri5-batch, euler, heun2, ab2, ab3, sde-euler"),
        (["--paths-batches", "8,4"], "--paths-batches: expected 1 <= SMALL <= LARGE"),
        (["--model", "SiT-XXL/2"], "unknown model 'SiT-XXL/2'"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--sample-steps", "1"], "--sample-steps must be at least 2"),
        (["--model", "SiT-S/4", "--input-size", "6"], "input size 6 is not divisible by the patch size 4"),
        (["--peak-tflops", "0"], "--peak-tflops must be positive"),
        (["--disp-blocks", "all;last"], "--disp-blocks 'last' is not a block index"),
        (["--disp-blocks", "0,6"], "--disp-blocks: --disp-block 6 is out of range: SiT-T/2 has 6 blocks"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, expected):
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_sizes_and_defaults():
    from benchmarks.bench.config import BenchConfig
    from disploss.commands.flags import config_from_namespace
    from disploss.commands.main import build_parser

    def resolve(args):
        return config_from_namespace(BenchConfig, args).resolved()

    parser = build_parser("bench")
    full = resolve(parser.parse_args([]))
    assert (full.model, full.batch, full.input_size, full.disp_batch, full.disp_dim) == ("SiT-XL/2", 32, 32, 32, 294912)
    assert full.sample_batch == 32 and full.precision == "tf32"
    assert resolve(parser.parse_args(["--image-size", "512"])).input_size == 64
    quick = resolve(parser.parse_args(["--quick", "--model", "SiT-S/2", "--input-size", "16"]))
    assert (quick.model, quick.input_size, quick.batch) == ("SiT-S/2", 16, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-size", "256", "--input-size", "32"])


def test_mfu_convention():
    from benchmarks.bench.harness import MFU as _MFU

    cuda = _MFU(torch.device("cuda"), "bf16", 989.0)(989e12)
    assert cuda == {"model_tflops": 989.0, "mfu": 1.0, "mfu_vs_measured_790": pytest.approx(989 / 790)}
    assert _MFU(torch.device("cuda"), "tf32", 494.7)(494.7e12)["mfu"] == pytest.approx(1.0)
    assert _MFU(torch.device("cpu"), "fp32", 66.9)(1e12) == {"model_tflops": 1.0}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_quick_on_cuda_reports_mfu(tmp_path):
    report = _run(tmp_path, "--device", "cuda", "--precision", "bf16")
    for variant in ("ours_nodisp", "ours_disp"):
        _positive(report["train"][variant]["mfu"], "mfu")
        _positive(report["train"][variant]["mfu_vs_measured_790"], "mfu_vs_measured_790")
    assert report["meta"]["peak_tflops"] == 989.0


def test_global_settings_are_restored(tmp_path):
    before = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32)
    _run(tmp_path, "--sections", "disp", "--threads", "1", "--precision", "tf32", "--steps", "1", "--warmup", "0")
    assert (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32) == before


def test_paths_section_measures_every_path_against_the_previous_default(tmp_path, monkeypatch):
    # torch.compile made the identity: compiling on a CPU takes minutes (the real runs compile; BENCHMARKS.md)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    report = _run(tmp_path, "--sections", "paths", "--steps", "1", "--warmup", "0", "--paths-batches", "2,3")
    variants = report["paths"]["variants"]
    names = [v["name"] for v in variants]
    assert len(names) == 7 and "previous default" in names[0] and "batch 3" in names[-1]
    assert variants[0]["ratio_to_previous"] == 1.0
    for name, v in zip(names, variants):
        _positive(v["images_per_sec"], name)
        assert v["ratio_to_previous"] == pytest.approx(v["images_per_sec"] / variants[0]["images_per_sec"])
        if name.startswith("ab2"):
            assert v["nfe_per_image"] == 10  # 11 grid points, exactly


def test_synthetic_latent_cache_trains_like_a_real_one(tmp_path, capsys):
    # gpu_check.sh times train.py on a synthetic cache: it must be a complete cache in extract-latents' format
    from benchmarks.bench.latents import write_synthetic_latents
    from disploss.data import LatentsDataset
    from trainkit import train_cli

    cache = write_synthetic_latents(tmp_path / "latents", count=20, image_size=64, num_classes=3, shard_size=8)
    data = LatentsDataset(cache)
    assert len(data) == 20 and data.latent_shape == (4, 8, 8) and data.num_classes == 3
    z, y = data[19]
    assert z.shape == (4, 8, 8) and 0 <= y < 3 and torch.isfinite(z).all()
    argv = ["--model", "SiT-T/2", "--latents", str(cache), "--image-size", "64", "--num-classes", "3",
            "--global-batch-size", "4", "--num-workers", "0", "--max-steps", "2", "--sample-every", "0",
            "--results-dir", str(tmp_path / "results"), "--device", "cpu"]  # fmt: skip
    assert train_cli(argv) == 0
    assert len(list((tmp_path / "results").glob("*/checkpoints/0000002.pt"))) == 1


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    # benchmarks/gpu_check.sh on the CPU with tiny settings: every run of the GPU session, end to end (~30-400 s
    # on the shared 2-core CPU, depending on its load)
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("step", "profile", "paths", "train_vs_step"):
        assert json.loads((tmp_path / f"{name}.json").read_text()), name
    ratio = json.loads((tmp_path / "train_vs_step.json").read_text())["train_vs_step"]
    _positive(ratio["train_images_per_sec"], "train")
    _positive(ratio["step_images_per_sec"], "step")
    assert "train.py end to end against the bench's step alone" in (tmp_path / "summary.md").read_text()
    assert "cannot summarise" not in done.stdout
