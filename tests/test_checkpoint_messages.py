"""What a refused or broken checkpoint is called (issue 13, item 8): a code-carrying pickle is refused naming
the global it refers to (not torch's generic preamble), and NaN weights in the checkpoint a run starts from are
named, file and tensor, instead of being blamed on the learning rate."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from disploss.checkpoint import UnsafeCheckpointError, load_checkpoint
from disploss.commands.main import main
from trainkit import error_line, load, only_run, tiny_flags, train_cli


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
        # (--ckpt latest passes over a non-finite checkpoint to the previous one: tests/test_checks.py)
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
    """The learning-rate advice stays for a run whose checkpoint was fine (tests/test_reliability.py injects
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
