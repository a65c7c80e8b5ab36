"""Checkpoint I/O: plain atomic saves, weights-only loads, latest-finder, released-format loader, conversion."""

from __future__ import annotations

import argparse
import ast
import collections
import os
import pickle
from pathlib import Path

import pytest
import torch

from disploss import checkpoint as ckpt
from disploss.commands import convert_checkpoint as convert_command
from disploss.models import SiT
from trainkit import max_abs_diff, tiny_sit

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


class Custom:  # a class the weights-only loader refuses
    def __init__(self):
        self.value = 3


# ---- save / load --------------------------------------------------------------------------------------------


def test_round_trip_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "args": {"lr": 1e-4, "model": "SiT-XL/2"},
        "train_steps": 7,
        "nested": [1, (2.5, None, True)],
        "dtype": torch.float32,
    }
    path = ckpt.save_checkpoint(tmp_path / "ckpts" / "0000007.pt", state)
    loaded = torch.load(path, weights_only=True)
    assert max_abs_diff(loaded["model"], state["model"]) == 0
    assert loaded["args"] == state["args"] and loaded["train_steps"] == 7
    assert loaded["nested"] == [1, (2.5, None, True)]
    back = ckpt.load_checkpoint(path)
    opt.load_state_dict(back["opt"])
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"args": argparse.Namespace(lr=1)}, "state['args']"),
        ({"cfg": {"inner": [1, Path("x")]}}, "state['cfg']['inner'][1]"),
        ({"x": Custom()}, "state['x']"),
        ({"n": collections.namedtuple("P", "a")(1)}, "state['n']"),
    ],
)
def test_save_refuses_non_plain(tmp_path, bad, where):
    with pytest.raises(TypeError) as err:
        ckpt.save_checkpoint(tmp_path / "a.pt", bad)
    assert where in str(err.value)
    assert not (tmp_path / "a.pt").exists()


def test_namespace_hint(tmp_path):
    with pytest.raises(TypeError, match=r"argparse.Namespace.*vars\(args\)"):
        ckpt.save_checkpoint(tmp_path / "a.pt", {"args": argparse.Namespace(lr=1)})


def test_atomic_save_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "0000010.pt"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)})
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # a partial file exists at the moment of the failure
            fh.truncate(10)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["0000010.pt"]  # no temporary file left
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.ones(3))


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    ckpt.save_checkpoint(good, {"w": torch.randn(100)})
    data = good.read_bytes()
    cases = {"trunc.pt": data[: len(data) // 2], "empty.pt": b"", "text.pt": b"this is not a checkpoint\n" * 20}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ckpt.CorruptCheckpointError, match=name):
            ckpt.load_checkpoint(tmp_path / name)


@pytest.mark.parametrize("payload", ["namespace", "custom_class", "raw_pickle"])
def test_unsafe_pickle_refused_then_converted(tmp_path, payload, capsys):
    src = tmp_path / "old.pt"
    if payload == "namespace":  # what the reference train.py wrote
        torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(model="SiT-XL/2", lr=1e-4)}, src)
    elif payload == "custom_class":
        torch.save({"model": {"w": torch.ones(2)}, "extra": Custom()}, src)
    else:
        with open(src, "wb") as f:
            pickle.dump({"model": {"w": [1.0, 2.0]}, "extra": Custom()}, f)
    with pytest.raises(ckpt.UnsafeCheckpointError) as err:
        ckpt.load_checkpoint(src)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(src) in message and "refused for safety" in message and "not a plain checkpoint" in message
    assert "disploss convert-checkpoint IN OUT" in message and "TRUST" in message

    dst = tmp_path / "new.pt"
    args = ckpt_parser().parse_args([str(src), str(dst)])
    assert convert_command.run(args) == 2  # refused without --trust, with an explanation
    assert "--trust" in capsys.readouterr().err and not dst.exists()

    args = ckpt_parser().parse_args([str(src), str(dst), "--trust"])
    assert convert_command.run(args) == 0
    out = torch.load(dst, weights_only=True)
    if payload == "namespace":
        assert out["args"] == {"model": "SiT-XL/2", "lr": 1e-4}
        assert "argparse.Namespace -> dict" in capsys.readouterr().out
    else:
        assert out["extra"] == {"value": 3}


def ckpt_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    return parser


def test_cli_dispatch(tmp_path):
    from disploss.commands.main import main

    src = tmp_path / "old.pt"
    torch.save({"w": torch.ones(1), "args": argparse.Namespace(a=1)}, src)
    assert main(["convert-checkpoint", str(src), str(tmp_path / "new.pt"), "--trust"]) == 0
    assert ckpt.load_checkpoint(tmp_path / "new.pt")["args"] == {"a": 1}


def test_to_plain_conversions():
    import enum

    import numpy as np

    class Color(enum.Enum):
        RED = "red"

    notes = []
    out = ckpt.to_plain(
        {
            "p": Path("/a"),
            "e": Color.RED,
            "n": np.float64(1.5),
            "a": np.arange(3),
            "s": {2, 1},
            "o": collections.OrderedDict(x=1),
        },
        notes=notes,
    )
    assert out == {"p": "/a", "e": "red", "n": 1.5, "a": out["a"], "s": [1, 2], "o": {"x": 1}}
    assert torch.equal(out["a"], torch.arange(3))
    assert type(out["n"]) is float and len(notes) == 5


# ---- latest checkpoint ----------------------------------------------------------------------------------------


def test_checkpoint_step_names():
    assert ckpt.checkpoint_step("x/0050000.pt") == 50000
    assert ckpt.checkpoint_step(ckpt.checkpoint_path("d", 7)) == 7
    for name in (".0050000.pt.abc.tmp", "0050000.pt.tmp", "latest.pt", "0050000.safetensors"):
        assert ckpt.checkpoint_step(name) is None


def test_find_latest_skips_truncated_and_temp(tmp_path):
    assert ckpt.find_latest(tmp_path / "none") is None
    for step in (100, 200):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), {"step": step, "w": torch.randn(64)})
    (tmp_path / ".0000400.pt.x1.tmp").write_bytes(b"partial")
    newest = ckpt.checkpoint_path(tmp_path, 300)
    ckpt.save_checkpoint(newest, {"step": 300, "w": torch.randn(64)})
    assert ckpt.find_latest(tmp_path) == newest
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) - 40])
    with pytest.warns(RuntimeWarning, match="0000300.pt"):
        assert ckpt.find_latest(tmp_path) == ckpt.checkpoint_path(tmp_path, 200)
    with pytest.warns(RuntimeWarning, match="0000300.pt"):
        path, state = ckpt.load_latest(tmp_path)
    assert path.name == "0000200.pt" and state["step"] == 200


def test_find_latest_full_check(tmp_path):
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 1), {"w": torch.ones(1)})
    ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 2), {"w": torch.ones(1)})
    assert ckpt.find_latest(tmp_path, full_check=True).name == "0000002.pt"


def test_find_latest_run(tmp_path):
    from disploss.training.run.folder import create_experiment_dir

    assert ckpt.find_latest_run(tmp_path / "nothing", "SiT-XL/2") is None
    a = create_experiment_dir(tmp_path, "SiT-XL/2", "Linear", "velocity", None)
    b = create_experiment_dir(tmp_path, "SiT-XL/2", "Linear", "velocity", None)
    other = create_experiment_dir(tmp_path, "SiT-XL/4", "Linear", "velocity", None)
    assert ckpt.find_latest_run(tmp_path, "SiT-XL/2") is None
    ckpt.save_checkpoint(ckpt.checkpoint_path(a / "checkpoints", 500), {"w": torch.ones(1)})
    ckpt.save_checkpoint(ckpt.checkpoint_path(b / "checkpoints", 100), {"w": torch.ones(1)})
    ckpt.save_checkpoint(ckpt.checkpoint_path(other / "checkpoints", 900), {"w": torch.ones(1)})
    os.utime(a / "checkpoints" / "0000500.pt", (1e9, 1e9))  # older file
    assert ckpt.find_latest_run(tmp_path, "SiT-XL/2") == b / "checkpoints" / "0000100.pt"
    assert ckpt.find_latest_run(tmp_path, "SiT-XL/4") == other / "checkpoints" / "0000900.pt"
    assert ckpt.find_latest_run(tmp_path, "SiT-B/2") is None


# ---- released-format loader ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_sit(**TINY)  # non-zero output layers, so equality checks mean something


@pytest.mark.parametrize("layout", ["bare", "ema", "model+ema", "module_prefix", "compile_prefix", "model_only"])
def test_load_sit_weights_layouts(tmp_path, tiny, layout):
    sd = tiny.state_dict()
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    obj = {
        "bare": sd,
        "ema": {"ema": sd},
        "model+ema": {"model": other, "ema": sd, "opt": {}, "args": {"model": "SiT-XL/2"}},
        "module_prefix": {"ema": {f"module.{k}": v for k, v in sd.items()}},
        "compile_prefix": {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
        "model_only": {"model": sd},
    }[layout]
    path = ckpt.save_checkpoint(tmp_path / "c.pt", obj)
    weights, config = ckpt.load_sit_weights(path)
    assert max_abs_diff(weights, sd) == 0
    expected = dict(tiny.config())
    if layout == "model+ema":
        # the stored args name SiT-XL/2: heads come from the name (shapes cannot tell them)
        expected["num_heads"] = 16
    else:
        expected["num_heads"] = None  # width 64 is not a registered size
    assert config == expected


def test_load_sit_weights_prefer_model(tiny):
    sd = tiny.state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    weights, _ = ckpt.load_sit_weights({"model": zeros, "ema": sd}, prefer="model")
    assert all(not v.any() for v in weights.values())
    with pytest.raises(ValueError, match="valid choices: ema, model"):
        ckpt.load_sit_weights({"ema": sd}, prefer="best")
    with pytest.raises(ckpt.CheckpointError, match="no SiT weights"):
        ckpt.load_sit_weights({"opt": {}, "args": {}})


def test_build_from_checkpoint_and_forward(tmp_path, tiny):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"ema": tiny.state_dict(), "model_config": tiny.config()})
    model, config = ckpt.build_sit_from_checkpoint(path, image_size=64, num_classes=10)
    assert config == tiny.config() and not model.training
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    tiny.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), tiny(x, t, y))


def test_reference_fixture_loads():
    data = Path(__file__).parent / "data" / "sit_reference_small.safetensors"
    model, config = ckpt.build_sit_from_checkpoint(data, vae_factor=1, prefer="model")
    assert config["hidden_size"] == 64 and config["num_heads"] == 4 and config["learn_sigma"] is True


def _mismatch(path, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        ckpt.build_sit_from_checkpoint(path, **kwargs)
    return str(err.value)


def test_mismatch_messages(tmp_path, tiny):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"ema": tiny.state_dict(), "model_config": tiny.config()})
    msg = _mismatch(path, image_size=128)  # 16x16 latents -> 64 tokens; the file has 16
    assert "pos_embed: checkpoint (1, 16, 64), model (1, 64, 64)" in msg
    assert "pos_embed has 16 tokens, the model built for --image-size 128 has 64" in msg
    assert "trained at 64 px" in msg

    msg = _mismatch(path, num_classes=1000)
    assert "y_embedder.embedding_table.weight: checkpoint (11, 64), model (1001, 64)" in msg
    assert "the checkpoint has 10 classes" in msg and "--num-classes 10" in msg

    msg = _mismatch(path, learn_sigma=False)
    assert "final_layer.linear.weight: checkpoint (32, 64), model (16, 64)" in msg
    assert "trained with learn_sigma=True" in msg

    no_sigma = tiny_sit(**TINY, learn_sigma=False)  # e.g. what the reference's sample.py built for custom checkpoints
    path2 = ckpt.save_checkpoint(tmp_path / "d.pt", {"ema": no_sigma.state_dict(), "model_config": no_sigma.config()})
    msg = _mismatch(path2, learn_sigma=True)
    assert "final_layer.linear.weight: checkpoint (16, 64), model (32, 64)" in msg
    assert "trained with learn_sigma=False" in msg
    _, cfg2 = ckpt.load_sit_weights(path2)
    assert cfg2["learn_sigma"] is False


def test_mismatch_model_size(tmp_path):
    small = ckpt.save_checkpoint(
        tmp_path / "s.pt", {"ema": tiny_sit(**{**TINY, "input_size": 16, "patch_size": 8}).state_dict()}
    )
    msg = _mismatch(small, model_name="SiT-S/8", image_size=128)
    assert "model size" in msg and "SiT-S/8 (hidden_size 384, depth 12, patch_size 8)" in msg
    assert "pos_embed: checkpoint (1, 4, 64), model (1, 4, 384)" in msg
    with pytest.raises(ValueError, match="valid choices"):
        ckpt.build_sit_from_checkpoint(small, model_name="SiT-Huge/2")


def test_heads_from_model_name(tmp_path):
    model = SiT(input_size=8, patch_size=8, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=3)
    path = ckpt.save_checkpoint(tmp_path / "s.pt", model.state_dict())  # bare, like SiT-XL-2-256x256.pt
    built, config = ckpt.build_sit_from_checkpoint(path, image_size=64)
    assert config["num_heads"] == 6 and config["depth"] == 12 and config["num_classes"] == 3
    built2, _ = ckpt.build_sit_from_checkpoint(path, model_name="SiT-S/8")
    assert max_abs_diff(built2.state_dict(), model.state_dict()) == 0


# ---- safetensors ------------------------------------------------------------------------------------------


def test_safetensors_export_import(tmp_path, tiny):
    sd = tiny.state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    src = ckpt.save_checkpoint(
        tmp_path / "0000100.pt", {"model": zeros, "ema": sd, "args": {"model": "x"}, "model_config": tiny.config()}
    )
    out = tmp_path / "ema.safetensors"
    args = ckpt_parser().parse_args([str(src), str(out), "--to-safetensors"])
    assert convert_command.run(args) == 0
    tensors, config = ckpt.import_safetensors(out)
    assert max_abs_diff(tensors, sd) == 0
    assert config == tiny.config()
    weights, config2 = ckpt.load_sit_weights(out)
    assert max_abs_diff(weights, sd) == 0 and config2 == tiny.config()
    model, _ = ckpt.build_sit_from_checkpoint(out)
    assert max_abs_diff(model.state_dict(), sd) == 0

    # --weights model, implied by the .safetensors suffix
    out2 = tmp_path / "model.safetensors"
    assert convert_command.run(ckpt_parser().parse_args([str(src), str(out2), "--weights", "model"])) == 0
    tensors2, _ = ckpt.import_safetensors(out2)
    assert all(not v.any() for v in tensors2.values())


def test_safetensors_metadata_model_name(tmp_path):
    model = SiT(input_size=8, patch_size=8, hidden_size=384, depth=12, num_heads=6, num_classes=2)
    out = tmp_path / "s.safetensors"
    ckpt.export_safetensors({"ema": model.state_dict()}, out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "SiT-S/8" and meta["weights"] == "ema"
    _, config = ckpt.import_safetensors(out)
    assert config["num_heads"] == 6 and config["model_name"] == "SiT-S/8"


def test_load_checkpoint_rejects_safetensors(tmp_path, tiny):
    out = tmp_path / "s.safetensors"
    ckpt.export_safetensors({"ema": tiny.state_dict()}, out)
    with pytest.raises(ckpt.CheckpointError, match="safetensors"):
        ckpt.load_checkpoint(out)


def test_unknown_heads_needs_a_name(tmp_path, tiny):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"ema": tiny.state_dict()})
    with pytest.raises(ValueError, match="number of attention heads.*hidden_size 64.*model name"):
        ckpt.build_sit_from_checkpoint(path)
    with pytest.raises(ValueError, match="--model SiT-XL/2 does not match"):
        ckpt.export_safetensors(path, tmp_path / "x.safetensors", model_name="SiT-XL/2")


def test_infer_config_of_the_released_shapes():
    # Shapes of the released SiT-XL/2 and DispLoss B/2 checkpoints (meta tensors: no memory).
    from disploss.models import model_name_for

    sections, current = [], None
    for line in (Path(__file__).parent / "data" / "sit_official_state_keys.txt").read_text().splitlines():
        if line.startswith("#"):
            current = {}
            sections.append(current)
        elif line.strip():
            key, shape = line.split("\t")
            current[key] = torch.empty(ast.literal_eval(shape), device="meta")
    names = []
    for state in sections:
        config = ckpt.infer_sit_config(state)
        assert config["input_size"] == 32 and config["num_classes"] == 1000 and config["learn_sigma"] is True
        assert config["in_channels"] == 4 and config["mlp_ratio"] == 4.0
        names.append((model_name_for(config), config["num_heads"]))
    assert names == [("SiT-XL/2", 16), ("SiT-B/2", 12)]
