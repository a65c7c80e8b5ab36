"""Outputs are written only where the user asked: `evaluate --ref-cache` never overwrites a file that is not its
own cache, `--out` never overwrites an input, and an output that cannot be written is a one-line error before the
expensive work (evaluate, sample, sample-ddp, extract-latents, convert-checkpoint, bench), not a traceback after
it."""

from __future__ import annotations

import errno
import importlib

import numpy as np
import pytest
import torch

from disploss.commands import report
from disploss.commands.main import main
from disploss.evaluation.npz import save_samples_npz

evaluate_module = importlib.import_module("disploss.evaluation.evaluate")  # the package exports a function so named


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"disploss {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def batches(tmp_path):
    """A reference batch, a sample batch (8 images each) and a stand-in for the Inception weights."""
    rng = np.random.default_rng(0)
    ref, sample, weights = tmp_path / "ref.npz", tmp_path / "sample.npz", tmp_path / "weights.pth"
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    save_samples_npz(sample, rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    weights.write_bytes(b"weights")
    return ref, sample, weights


@pytest.fixture
def no_inception(monkeypatch):
    """Fail the test if any Inception work starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the expensive work started before the output was checked")

    monkeypatch.setattr(evaluate_module, "InceptionFeatureExtractor", refuse)


def evaluate_cli(batches, *extra) -> int:
    ref, sample, weights = batches
    return main(["evaluate", str(ref), str(sample), "--inception-weights", str(weights), "--device", "cpu",
                 "--no-progress", *map(str, extra)])  # fmt: skip


@pytest.mark.parametrize("target", ["reference batch", "sample batch", "other npz"])
def test_ref_cache_never_overwrites_a_file_that_is_not_its_cache(batches, tmp_path, capsys, no_inception, target):
    ref, sample, _ = batches
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=np.zeros((2, 4, 4, 3), np.uint8), labels=np.arange(2))
    path = {"reference batch": ref, "sample batch": sample, "other npz": other}[target]
    before = path.read_bytes()
    assert evaluate_cli(batches, "--ref-cache", path) == 2
    line = one_line_error(capsys, "evaluate")
    assert f"--ref-cache {path}" in line
    assert (f"is the {target}" if target != "other npz" else "is not a reference cache written by") in line
    assert path.read_bytes() == before


@pytest.mark.parametrize("target", ["ref", "sample", "weights"])
def test_out_never_overwrites_an_input(batches, capsys, no_inception, target):
    path = dict(zip(["ref", "sample", "weights"], batches))[target]
    before = path.read_bytes()
    assert evaluate_cli(batches, "--out", path) == 2
    assert "would overwrite an input" in one_line_error(capsys, "evaluate")
    assert path.read_bytes() == before


@pytest.mark.parametrize("flag", ["--out", "--ref-cache"])
@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_evaluate_outputs_checked_before_the_work(batches, tmp_path, capsys, no_inception, flag, where):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    path = tmp_path / "file" / "x.json" if where == "under a file" else tmp_path / "folder"
    assert evaluate_cli(batches, flag, path) == 2
    line = one_line_error(capsys, "evaluate")
    assert ("cannot create the folder" if where == "under a file" else "is a folder") in line


def test_sample_out_checked_before_sampling(tmp_path, capsys, monkeypatch):
    import disploss.sampling.load as load_module

    monkeypatch.setattr(load_module, "load_for_sampling", lambda *a, **k: pytest.fail("sampled first"))
    (tmp_path / "file").write_text("")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"a checkpoint")
    for out, expected in ((tmp_path / "file" / "grid.png", "cannot create the folder"), (ckpt, "overwrite an input")):
        assert main(["sample", "ODE", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu"]) == 2
        assert expected in one_line_error(capsys, "sample")
    assert ckpt.read_bytes() == b"a checkpoint"


def test_sample_ddp_folder_checked_before_loading(tmp_path, capsys, monkeypatch):
    import disploss.sampling.load as load_module

    monkeypatch.setattr(load_module, "load_for_sampling", lambda *a, **k: pytest.fail("loaded first"))
    (tmp_path / "file").write_text("")
    argv = ["sample-ddp", "ODE", "--ckpt", str(tmp_path / "m.pt"), "--sample-dir", str(tmp_path / "file" / "s")]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "cannot create the folder" in one_line_error(capsys, "sample-ddp")


def test_extract_latents_out_checked_before_the_vae(tmp_path, capsys, monkeypatch):
    import disploss.data.vae as vae_module

    monkeypatch.setattr(vae_module, "load_vae", lambda *a, **k: pytest.fail("VAE loaded first"))
    (tmp_path / "file").write_text("")
    argv = ["extract-latents", "--data-path", str(tmp_path), "--vae", "ema", "--out", str(tmp_path / "file" / "c")]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "cannot create the folder" in one_line_error(capsys, "extract-latents")


def test_bench_json_checked_before_the_benchmarks(tmp_path, capsys, monkeypatch):
    import benchmarks.bench.sections as sections

    monkeypatch.setattr(sections, "bench", lambda *a, **k: pytest.fail("benchmarked first"))
    (tmp_path / "file").write_text("")
    assert main(["bench", "--device", "cpu", "--json", str(tmp_path / "file" / "b.json")]) == 2
    assert "cannot create the folder" in one_line_error(capsys, "bench")


@pytest.mark.parametrize("out", ["under a file", "a folder", "under a file.safetensors"])
def test_convert_checkpoint_out_checked_before_loading(tmp_path, capsys, monkeypatch, out):
    import disploss.checkpoint.convert as convert

    src = tmp_path / "in.pt"
    torch.save({"model": {"w": torch.ones(2)}}, src)
    monkeypatch.setattr(convert, "_load_trusted", lambda *a, **k: pytest.fail("IN loaded first"))
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    dst = {
        "under a file": tmp_path / "file" / "out.pt", "a folder": tmp_path / "folder",
        "under a file.safetensors": tmp_path / "file" / "out.safetensors",
    }[out]  # fmt: skip
    assert main(["convert-checkpoint", str(src), str(dst), "--trust"]) == 2
    line = one_line_error(capsys, "convert-checkpoint")
    assert f"OUT {dst}" in line or f"for OUT {dst}" in line


@pytest.mark.parametrize(
    "err",
    [
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file/out.json"),
        IsADirectoryError(errno.EISDIR, "Is a directory", "/x/folder"),
        OSError(errno.ENAMETOOLONG, "File name too long"),
    ],
)
def test_write_failures_at_the_end_are_one_line(capsys, err):
    def fail():
        raise err

    assert report.guarded("evaluate", fail) == 2
    assert err.strerror in one_line_error(capsys, "evaluate")
