"""Checked before the first step and on load (issue 13, parts 5 and 6): every flag (sampling-grid settings, EMA
decay, finite scales and rates, the device); checkpoints (non-finite weights named with the file and the tensor,
each tensor's CRC-32 verified; files without checksums still load); and files readable as the umask allows."""

from __future__ import annotations

import os
import struct
import zipfile

import pytest
import torch

from disploss.checkpoint import CorruptCheckpointError, NonFiniteCheckpointError, load_checkpoint, save_checkpoint
from trainkit import error_line, load, only_run, run_dirs, tiny_flags, train_cli


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A 2-step run with a sample grid: its folder."""
    results = tmp_path_factory.mktemp("trained")
    assert train_cli(tiny_flags(images, results, steps=2, sample_every=2, sample_steps=2)) == 0
    return only_run(results)


# -- flags --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sample_steps": 1, "sample_every": 10_000}, "--sample-steps must be at least 2, got 1"),
        ({"ema_decay": 2}, "--ema-decay must lie in [0.0, 1.0), got 2.0"),
        ({"ema_decay": 1}, "--ema-decay must lie in [0.0, 1.0), got 1.0"),
        ({"cfg_scale": "nan"}, "--cfg-scale must be >= 1.0 and finite"),
        ({"cfg_scale": "inf"}, "--cfg-scale must be >= 1.0 and finite"),
        ({"lr": "inf"}, "--lr must be a finite number, got inf"),
        ({"beta2": 1.5}, "--beta2 must lie in [0.0, 1.0), got 1.5"),
        ({"disp": True, "disp_weight": "inf"}, "--disp-weight must be a finite number"),
        ({"grad_clip": "inf"}, "--grad-clip must be a finite number"),
        ({"train_eps": 0.7}, "--train-eps must lie in [0.0, 0.5)"),
        ({"ckpt_every_minutes": 0}, "--ckpt-every-minutes must be positive, got 0.0"),
        ({"keep_last": 0}, "--keep-last must be at least 1, got 0"),
        ({"keep_every": 3, "ckpt_every": 2}, "--keep-every 3 must be a multiple of --ckpt-every 2"),
    ],
)
def test_bad_flags_stop_before_anything_runs(images, tmp_path, capsys, overrides, expected):
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, **overrides)) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "results").exists() or run_dirs(tmp_path / "results") == []  # no folder, no step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_device_that_is_not_there(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, device="cuda")) == 2
    assert "--device cuda: no CUDA device is available" in error_line(capsys)


# -- checkpoints on load ------------------------------------------------------------------------------------------
def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(images, trained, tmp_path, capsys):
    state = load(trained / "checkpoints" / "0000002.pt")
    state.pop("checksums")
    state["ema"]["blocks.1.mlp.fc1.weight"][0, :3] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    with pytest.raises(NonFiniteCheckpointError):
        load_checkpoint(bad)
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=3, ckpt=bad)) == 2
    line = error_line(capsys)
    assert f"checkpoint {bad} holds non-finite values in ema['blocks.1.mlp.fc1.weight'] (3 NaN, 0 infinite" in line
    assert "--lr" not in line  # not blamed on the learning rate


def test_ckpt_latest_passes_over_a_non_finite_checkpoint(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=2)) == 0
    run = only_run(tmp_path)
    path = run / "checkpoints" / "0000002.pt"
    state = load(path)
    state["model"]["final_layer.linear.bias"][0] = float("inf")
    save_checkpoint(path, state, checksums=True)  # checksums of the bad values: only the finiteness check sees it
    with pytest.warns(RuntimeWarning, match="0000002.pt"):
        assert train_cli(tiny_flags(images, tmp_path, steps=3, ckpt="latest")) == 0
    assert f"resumed from {run / 'checkpoints' / '0000001.pt'} at step 1" in capsys.readouterr().out


def flip_a_byte(path, record_suffix: str, offset: int) -> None:
    """Flip one byte `offset` bytes into the zip record whose name ends with `record_suffix` (a tensor's data)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_find_a_flipped_byte(trained, tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes((trained / "checkpoints" / "0000002.pt").read_bytes())
    state = load(path)
    assert (
        state["checksums"]["algorithm"] == "crc32" and "ema['x_embedder.proj.weight']" in state["checksums"]["tensors"]
    )
    flip_a_byte(path, "/data/3", offset=5)
    torch.load(path, weights_only=True)  # torch itself loads it silently (it does not check its records' CRC)
    with pytest.raises(CorruptCheckpointError, match=r"c.pt is damaged: the bytes of \S+ differ from those saved"):
        load_checkpoint(path)


def test_checkpoints_without_checksums_still_load(trained, tmp_path):
    state = load(trained / "checkpoints" / "0000002.pt")
    state.pop("checksums")
    torch.save(state, tmp_path / "old.pt")  # as written before checksums existed
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["step"] == 2 and "checksums" not in loaded


# -- file modes ---------------------------------------------------------------------------------------------------
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


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from disploss import distributed
    from disploss.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 but only 1 CUDA device"):
        distributed.init("cuda")
