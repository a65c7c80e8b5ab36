"""What a checkpoint or weights file must pass before anything uses it (checkpoint/io.py, checkpoint/sit.py): each
tensor's CRC-32 verified (a flipped byte found; files without checksums still load); a code-carrying pickle refused
naming the global it refers to, not torch's generic preamble; NaN or infinite weights refused naming the file and
the tensor on every load path (a .pt with or without checksums, a .safetensors, a model folder; sample, sample-ddp,
train --ckpt and --ckpt latest, convert-checkpoint, export), with nothing written, instead of a run's divergence
being blamed on the learning rate.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from disploss.checkpoint import (
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from disploss.commands.main import main
from disploss.models import SiT
from trainkit import (
    MODEL,
    call,
    error_line,
    load,
    make_image_folder,
    only_run,
    run_dirs,
    tiny_flags,
    tiny_sit,
    train_cli,
)


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """A 2-step run with a sample grid: its folder."""
    results = tmp_path_factory.mktemp("trained")
    assert train_cli(tiny_flags(images, results, steps=2, sample_every=2, sample_steps=2)) == 0
    return only_run(results)


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


# -- what a refused checkpoint is called ----------------------------------------------------------------------------


class Payload:
    """An object whose unpickling would call os.system (never unpickled here)."""

    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def namespace_checkpoint(path, how):
    state = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model="SiT-XL/2")}
    if how == "torch.save":
        torch.save(state, path)
    elif how == "torch.save, protocol 4":  # torch's weights-only loader stops at the protocol's FRAME opcode
        torch.save(state, path, pickle_protocol=4)
    elif how == "raw pickle, protocol 5":
        with open(path, "wb") as f:
            pickle.dump({"args": argparse.Namespace(model="SiT-XL/2")}, f, protocol=5)
    else:  # a global of a module torch blocks outright
        torch.save({"model": {"w": torch.ones(2)}, "x": Payload()}, path)
    return path


@pytest.mark.parametrize("how", ["torch.save", "torch.save, protocol 4", "raw pickle, protocol 5", "blocked module"])
def test_refusal_names_the_refused_global(tmp_path, capsys, how):
    path = namespace_checkpoint(tmp_path / "old.pt", how)
    expected = f"{os.system.__module__}.system" if how == "blocked module" else "argparse.Namespace"
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"refused global: {expected}" in message, message
    assert "Weights only load failed" not in message and "convert-checkpoint" in message
    # convert-checkpoint without --trust names it too
    assert main(["convert-checkpoint", str(path), str(tmp_path / "new.pt")]) == 2
    err = capsys.readouterr().err
    assert f"refused global: {expected}" in err and "Weights only load failed" not in err


def _poison(state: dict, key: str) -> None:
    weights = state["model"][key]
    weights.view(-1)[0] = float("nan")


@pytest.mark.parametrize("origin", ["ours, --ckpt PATH", "released weights, --ckpt PATH"])
def test_nan_weights_are_named_not_blamed_on_the_learning_rate(images, tmp_path, capsys, origin):
    results = tmp_path / "results"
    assert train_cli(tiny_flags(images, results, steps=1)) == 0
    first = only_run(results) / "checkpoints" / "0000001.pt"
    state = load(first)
    key = "x_embedder.proj.weight"
    if origin.startswith("ours"):
        _poison(state, key)
        torch.save(state, first)
        # (--ckpt latest passes over a non-finite checkpoint to the previous one: tests/test_checkpoint_safety.py)
        path, flags = first, tiny_flags(images, results, steps=2, ckpt=first)
    else:
        released = {"model": state["ema"]}  # a bare released file: weights only
        _poison(released, key)
        path = tmp_path / "released.pt"
        torch.save(released, path)
        flags = tiny_flags(images, tmp_path / "new", steps=1, ckpt=path)
    capsys.readouterr()
    assert train_cli(flags) != 0
    line = capsys.readouterr().err.strip()
    assert line.startswith("disploss train: error: ") and "\n" not in line, line
    assert str(path) in line and key in line and "--lr" not in line, line


def test_a_run_that_diverges_still_suggests_the_learning_rate(images, tmp_path, capsys, monkeypatch):
    """The learning-rate advice stays for a run whose checkpoint was fine (tests/test_train_failures.py injects
    the NaN the same way)."""
    from disploss.training.objective import Objective

    real = Objective.__call__

    def losses(self, *args, **kwargs):
        out = dict(real(self, *args, **kwargs))
        out["flow"] = out["flow"] * float("nan")
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Objective, "__call__", losses)
    assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 1
    assert "Lower --lr" in error_line(capsys)


BAD = "blocks.2.attn.qkv.weight"


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """The same NaN weights (2 NaN in one tensor) as a released-style .pt, a .safetensors and a model folder."""
    root = tmp_path_factory.mktemp("broken")
    model = tiny_sit(0, preset=MODEL, num_classes=3)
    state = model.state_dict()
    state[BAD][0, :2] = float("nan")
    torch.save({"ema": state}, root / "released.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "weights.safetensors"))
    bad = SiT(**model.config())
    bad.load_state_dict(state)
    bad.save_pretrained(root / "folder")
    return {"pt": root / "released.pt", "safetensors": root / "weights.safetensors", "folder": root / "folder"}


def refused(err: str, command: str) -> None:
    assert err.startswith(f"disploss {command}: error: ") and err.count("\n") == 1, err
    assert BAD in err and "(2 NaN, 0 infinite of 49152)" in err  # a .pt names it ema['blocks...']
    assert "non-finite" in err


@pytest.mark.parametrize("kind", ["pt", "safetensors", "folder"])
def test_sampling_refuses_non_finite_weights(capsys, tmp_path, broken, kind):
    rc, _, err = call(capsys, ["sample", "ODE", "--ckpt", str(broken[kind]), "--vae", "none",
                               "--out", str(tmp_path / "grid.png")])  # fmt: skip
    assert rc == 2
    refused(err, "sample")
    rc, _, err = call(capsys, ["sample-ddp", "ODE", "--ckpt", str(broken[kind]), "--vae", "none", "--device", "cpu",
                               "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "samples")])  # fmt: skip
    assert rc == 2
    refused(err, "sample-ddp")
    assert not list(tmp_path.iterdir())  # no grid, no sample folder, no .npz


@pytest.mark.parametrize("kind", ["pt", "folder"])
def test_training_refuses_non_finite_weights(capsys, tmp_path, broken, kind):
    images = make_image_folder(tmp_path / "images")
    rc, _, err = call(capsys, ["train", *tiny_flags(images, tmp_path / "results", steps=1, ckpt=broken[kind])])
    assert rc == 2
    refused(err, "train")
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())


def test_conversion_refuses_non_finite_weights(capsys, tmp_path, broken):
    rc, _, err = call(capsys, ["convert-checkpoint", str(broken["pt"]), str(tmp_path / "out.safetensors")])
    assert rc == 2
    refused(err, "convert-checkpoint")
    # a trusted pickle is not checked by the weights-only loader: the conversion checks it before writing
    state = torch.load(broken["pt"], weights_only=True)
    torch.save({**state, "args": argparse.Namespace(model="SiT-T/2")}, tmp_path / "pickled.pt")
    rc, _, err = call(
        capsys, ["convert-checkpoint", str(tmp_path / "pickled.pt"), str(tmp_path / "plain.pt"), "--trust"]
    )
    assert rc == 2
    refused(err, "convert-checkpoint")
    rc, _, err = call(capsys, ["export", str(tmp_path / "pickled.pt"), str(tmp_path / "folder"), "--trust"])
    assert rc == 2
    refused(err, "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled.pt"]


def pickled_checkpoint(path):
    """A checkpoint as the reference wrote it: the weights plus an argparse.Namespace (a pickled class)."""
    model = tiny_sit(preset=MODEL, num_classes=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "ema": model.state_dict(), "args": argparse.Namespace(model="SiT-T/2")}, path
    )
    return path


def test_code_carrying_checkpoint_refused_by_train_and_loader(images, tmp_path, capsys):
    path = pickled_checkpoint(tmp_path / "old.pt")
    with pytest.raises(UnsafeCheckpointError, match="convert-checkpoint"):
        load_checkpoint(path)
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, ckpt=path)) == 2
    assert "disploss convert-checkpoint" in error_line(capsys)
    assert not (tmp_path / "results").exists()  # refused before anything was created


def test_code_carrying_checkpoint_refused_by_ckpt_latest(images, tmp_path, capsys):
    results = tmp_path / "results"
    pickled_checkpoint(results / "000-SiT-T-2-Linear-velocity-None" / "checkpoints" / "0000007.pt")
    assert train_cli(tiny_flags(images, results, steps=1, ckpt="latest")) == 2  # not a silent fresh start
    assert "disploss convert-checkpoint" in error_line(capsys)
    assert len(run_dirs(results)) == 1
