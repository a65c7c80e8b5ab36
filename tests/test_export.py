"""`disploss export CKPT OUT`: our training checkpoints and the released formats (the reference fixture as a DispLoss
{'ema': ...} file, a bare SiT state dict, a pickled one behind --trust) become model folders whose config.json,
weights and card are right; the metrics of an evaluation go into the card with their sampler settings; sample.py,
sample_ddp.py and train.py take the folder and give what the checkpoint gives."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from disploss.checkpoint import save_checkpoint
from disploss.hub import CONFIG_NAME, WEIGHTS_NAME
from disploss.models import SiT
from disploss.statedict import fingerprint
from trainkit import (
    MODEL,
    call,
    error_line,
    make_image_folder,
    only_run,
    read_png,
    save_training_checkpoint,
    tiny_flags,
    tiny_sit,
    train_cli,
)

RUN_ARGS = {
    "model": MODEL, "image_size": 8, "num_classes": 5, "vae": "none", "path_type": "Linear", "prediction": "velocity",
    "loss_weight": None, "sample_eps": None, "train_eps": None, "data_path": "/data/digits-8px/train",
    "results_dir": "/home/someone/results", "disp": True, "disp_weight": 0.05, "disp_tau": 16.0,
    "disp_variant": "infonce_l2", "disp_block": "-1", "disp_gather": False, "global_batch_size": 64, "lr": 1e-4,
    "ema_decay": 0.9999, "global_seed": 0, "objective": "flow",
}  # fmt: skip


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """One of our training checkpoints (model != ema), at step 100."""
    ema, model = tiny_sit(0, preset=MODEL), tiny_sit(1, preset=MODEL)
    path = tmp_path_factory.mktemp("run") / "0000100.pt"
    args = {**RUN_ARGS, "model_config": ema.config()}
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "step": 100}
    save_checkpoint(path, state, checksums=True)
    return {"path": path, "ema": ema, "model": model}


def export(capsys, *argv) -> tuple[int, str, str]:
    return call(capsys, ["export", *map(str, argv)])


def weights(folder: Path) -> dict:
    return load_file(str(folder / WEIGHTS_NAME))


def same(state: dict, model: torch.nn.Module) -> bool:
    reference = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)


def test_our_checkpoint_exports_its_ema_config_and_card(capsys, tmp_path, ours):
    rc, out, err = export(capsys, ours["path"], tmp_path / "sit", "--license", "mit", "--hub-id", "me/sit-t")
    assert rc == 0, err
    folder = tmp_path / "sit"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert same(weights(folder), ours["ema"])  # the EMA weights by default, bitwise
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ours["ema"].config()} == ours["ema"].config()
    info = config["disploss"]
    assert info["weights"] == "ema" and info["step"] == 100 and info["model_name"] == MODEL
    assert info["fingerprint"] == fingerprint(ours["ema"].state_dict()) and info["source"] == "0000100.pt"
    training = info["training"]
    assert training["dataset"] == "digits-8px" and training["disp_tau"] == 16.0 and training["vae"] == "none"
    assert "data_path" not in training and "results_dir" not in training  # no local paths in a shared folder
    card = (folder / "README.md").read_text()
    front = card.split("---\n")[1]
    assert front.splitlines()[:3] == ["library_name: disploss", "license: mit", "tags:"]
    assert "- dispersive-loss" in front and "- flow-matching" in front and "datasets:\n- digits-8px" in front
    assert f"# {MODEL} trained with Dispersive Loss" in card
    assert "| objective | flow matching, Linear path, velocity prediction |" in card
    assert "| dispersive loss | InfoNCE-L2, lambda 0.05, tau 16.0, on block -1 |" in card
    assert "100 steps, global batch 64, lr 0.0001, EMA decay 0.9999, seed 0, on digits-8px" in card
    assert "python sample.py ODE --ckpt me/sit-t" in card and 'SiT.from_pretrained("me/sit-t")' in card
    assert "No metrics were given" in card
    assert f"wrote {folder}: {MODEL}, the ema weights" in out


def test_weights_model_exports_the_raw_weights(capsys, tmp_path, ours):
    assert export(capsys, ours["path"], tmp_path / "raw", "--weights", "model")[0] == 0
    assert same(weights(tmp_path / "raw"), ours["model"])
    info = json.loads((tmp_path / "raw" / CONFIG_NAME).read_text())["disploss"]
    assert info["weights"] == "model" and info["fingerprint"] == fingerprint(ours["model"].state_dict())
    assert "the raw (non-EMA) weights of `0000100.pt`" in (tmp_path / "raw" / "README.md").read_text()


def test_a_meanflow_checkpoint_exports_a_meanflow_folder(capsys, tmp_path):
    ema = tiny_sit(0, preset=MODEL, meanflow=True)
    ckpt = save_training_checkpoint(tmp_path / "0000050.pt", ema, objective="meanflow")
    assert export(capsys, ckpt, tmp_path / "mf")[0] == 0
    config = json.loads((tmp_path / "mf" / CONFIG_NAME).read_text())
    assert config["meanflow"] is True and config["disploss"]["training"]["objective"] == "meanflow"
    assert SiT.from_pretrained(tmp_path / "mf").meanflow and same(weights(tmp_path / "mf"), ema)
    card = (tmp_path / "mf" / "README.md").read_text()
    assert "- meanflow" in card and "| objective | MeanFlow (average velocity, one-step sampling)" in card
    assert f"python sample.py MeanFlow --ckpt {tmp_path / 'mf'}" in card


@pytest.fixture(scope="module")
def released(tmp_path_factory, reference, reference_config):
    """The reference fixture's weights in the released layouts: DispLoss ({'ema': ...}), SiT (a bare state dict),
    and a DispLoss file with the reference's pickled argparse.Namespace (needs --trust)."""
    folder = tmp_path_factory.mktemp("released")
    state = {k[len("model.") :]: v for k, v in reference.items() if k.startswith("model.")}
    torch.save({"ema": state}, folder / "disploss-b2.pt")
    torch.save(state, folder / "SiT-XL-2-256x256.pt")
    args = argparse.Namespace(
        image_size=64, num_classes=10, vae="ema", path_type="Linear", prediction="velocity", loss_weight=None, disp=True
    )  # the reference's flags (its model name left out: a
    # width of 64 is no preset)
    torch.save({"ema": state, "args": args}, folder / "pickled.pt")
    return {"folder": folder, "state": state, "config": reference_config["model_config"]}


@pytest.mark.parametrize("name", ["disploss-b2.pt", "SiT-XL-2-256x256.pt"])
def test_released_checkpoints_export_the_fixture(capsys, tmp_path, released, reference_model, name):
    rc, _, err = export(capsys, released["folder"] / name, tmp_path / "out")
    assert rc == 2 and "cannot tell the attention heads" in err and "--num-heads" in err  # width 64 is no preset
    rc, _, err = export(capsys, released["folder"] / name, tmp_path / "out", "--num-heads", "4")
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert {k: config[k] for k in released["config"]} == released["config"]  # hidden 64, depth 4, heads 4, 10 classes
    assert config["meanflow"] is False
    assert same(weights(tmp_path / "out"), reference_model)
    assert config["disploss"]["weights"] == ("ema" if name.startswith("disploss") else "state_dict")
    loaded = SiT.from_pretrained(tmp_path / "out")
    fwd = released_inputs()
    torch.testing.assert_close(loaded(fwd["x"], fwd["t"], fwd["y"]), fwd["out"], rtol=0, atol=1e-5)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| dispersive loss | not recorded by the checkpoint |" in card and "steps not recorded" in card


def released_inputs() -> dict:
    from safetensors.torch import load_file as load

    ref = load(str(Path(__file__).parent / "data" / "sit_reference_small.safetensors"))
    return {"x": ref["fwd_x"], "t": ref["fwd_t"], "y": ref["fwd_y"], "out": ref["fwd_out"]}


def test_a_pickled_release_needs_trust_and_keeps_its_args(capsys, tmp_path, released):
    src = released["folder"] / "pickled.pt"
    rc, _, err = export(capsys, src, tmp_path / "out")
    assert rc == 2 and "argparse.Namespace" in err and "disploss export" in err and "--trust" in err
    assert not (tmp_path / "out").exists()
    assert export(capsys, src, tmp_path / "out", "--trust", "--num-heads", "4")[0] == 0
    info = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["disploss"]
    assert info["model_name"] is None and info["training"]["disp"] is True
    assert info["training"]["image_size"] == 64 and info["training"]["vae"] == "ema"


def test_refusals_write_nothing(capsys, tmp_path, released, ours):
    rc, _, err = export(capsys, released["folder"] / "disploss-b2.pt", tmp_path / "a", "--weights", "model")
    assert rc == 2 and "holds only the ema weights, not the model ones: pass --weights ema" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    rc, _, err = export(capsys, ours["path"], tmp_path / "full")
    assert rc == 2 and "exists and is not an empty folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and (tmp_path / "full" / "mine.txt").is_file()
    nan = tmp_path / "nan.pt"
    state = tiny_sit(0, preset=MODEL).state_dict()
    state["final_layer.linear.bias"][1] = float("nan")
    torch.save({"ema": state}, nan)
    rc, _, err = export(capsys, nan, tmp_path / "b")
    assert rc == 2 and "ema['final_layer.linear.bias'] (1 NaN, 0 infinite of 24)" in err
    assert not (tmp_path / "b").exists()


def _evaluation(tmp_path, sample_config: dict | None) -> Path:
    result = {"inception_score": 3.25, "fid": 12.345678, "sfid": 20.5, "precision": 0.61, "recall": 0.42,
              "num_samples": 6, "num_reference_images": 10, "reference_batch": "/refs/VIRTUAL_digits.npz"}  # fmt: skip
    if sample_config is not None:
        result["sample_config"] = sample_config
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(result))
    return path


def test_metrics_go_into_the_card_with_their_sampler(capsys, tmp_path, ours):
    sc = {"mode": "ODE", "sampling_method": "ab2", "num_sampling_steps": 11, "time_schedule": "power", "time_rho": 1.5,
          "cfg_scale": 1.5, "guide_channels": 3, "global_seed": 0, "num_fid_samples": 6, "vae": "none",
          "atol": 1e-6, "rtol": 1e-3, "reverse": False, "pixel_conversion": "truncate", "weights": "ema",
          "fingerprint": fingerprint(ours["ema"].state_dict())}  # fmt: skip
    rc, _, err = export(capsys, ours["path"], tmp_path / "sit", "--metrics", _evaluation(tmp_path, sc))
    assert rc == 0, err
    card = (tmp_path / "sit" / "README.md").read_text()
    sampler = "ODE ab2, 11 grid points, power schedule (rho 1.5), cfg 1.5 (guiding 3 channels), seed 0"
    assert f"| FID | 12.35 | 6 | {sampler} |" in card and f"| Recall | 0.42 | 6 | {sampler} |" in card
    assert "Against `VIRTUAL_digits.npz`, 6 samples" in card
    assert ("sample_ddp.py ODE --ckpt " + str(tmp_path / "sit") + " --num-fid-samples 6 --vae none --sampling-method "
            "ab2 --num-sampling-steps 11 --atol 1e-06 --rtol 0.001 --time-schedule power --time-rho 1.5 --cfg-scale 1.5 "
            "--guide-channels 3 --global-seed 0 --pixel-conversion truncate") in card  # fmt: skip


def test_metrics_without_settings_or_of_other_weights_are_refused(capsys, tmp_path, ours):
    rc, _, err = export(capsys, ours["path"], tmp_path / "a", "--metrics", _evaluation(tmp_path, None))
    assert rc == 2 and "pass --sample-config SAMPLE_FOLDER/sample_config.json" in err
    other = {"mode": "ODE", "sampling_method": "euler", "num_sampling_steps": 4, "cfg_scale": 1.0,
             "fingerprint": fingerprint(ours["model"].state_dict())}  # fmt: skip
    (tmp_path / "sample_config.json").write_text(json.dumps(other))
    rc, _, err = export(capsys, ours["path"], tmp_path / "a", "--metrics", _evaluation(tmp_path, None),
                        "--sample-config", tmp_path / "sample_config.json")  # fmt: skip
    assert rc == 2 and "--metrics were measured on other weights" in err
    assert not (tmp_path / "a").exists()
    rc, _, err = export(capsys, ours["path"], tmp_path / "a", "--weights", "model", "--metrics",
                        _evaluation(tmp_path, None), "--sample-config", tmp_path / "sample_config.json")  # fmt: skip
    assert rc == 0, err  # the raw weights' samples, exported with the raw weights


# ---- the folder in place of the checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ours):
    from disploss.checkpoint import export_folder

    return export_folder(ours["path"], tmp_path_factory.mktemp("exported") / "sit-t")[0]


def test_sample_on_the_folder_gives_the_checkpoints_grid(capsys, tmp_path, ours, exported):
    argv = ["sample", "ODE", "--sampling-method", "euler", "--num-sampling-steps", "4"]
    for name, ckpt in (("ckpt", ours["path"]), ("folder", exported)):
        rc, out, err = call(capsys, [*argv, "--ckpt", str(ckpt), "--out", str(tmp_path / f"{name}.png")])
        assert rc == 0, err
        assert "image_size=8 (stored args)" in out and "vae=none (stored args)" in out
    np.testing.assert_array_equal(read_png(tmp_path / "ckpt.png"), read_png(tmp_path / "folder.png"))


def test_sample_ddp_on_the_folder_gives_the_checkpoints_npz(capsys, tmp_path, ours, exported):
    argv = ["sample-ddp", "SDE", "--num-sampling-steps", "4", "--num-fid-samples", "3", "--cfg-scale", "2.0",
            "--device", "cpu"]  # fmt: skip
    npzs = {}
    for name, ckpt in (("ckpt", ours["path"]), ("folder", exported)):
        rc, out, err = call(capsys, [*argv, "--ckpt", str(ckpt), "--sample-dir", str(tmp_path / name)])
        assert rc == 0, err
        (npzs[name],) = (tmp_path / name).glob("*.npz")
    key = fingerprint(ours["ema"].state_dict())  # the folders are keyed by the same weights
    assert npzs["ckpt"].name.startswith(f"SiT-T-2-0000100-ema-{key}-size-8-")
    assert npzs["folder"].name.startswith(f"SiT-T-2-sit-t-ema-{key}-size-8-")
    np.testing.assert_array_equal(np.load(npzs["ckpt"])["arr_0"], np.load(npzs["folder"])["arr_0"])


def test_train_fine_tunes_from_a_folder(tmp_path, capsys):
    model = tiny_sit(3, preset=MODEL, num_classes=3)
    folder = model.save_pretrained(tmp_path / "start")
    images = make_image_folder(tmp_path / "images")
    results = tmp_path / "results"
    assert train_cli(tiny_flags(images, results, steps=1, ckpt=folder)) == 0, capsys.readouterr().err
    run = only_run(results)
    log = (run / "log.txt").read_text()
    assert "is a model folder: a new run fine-tunes its weights (step 0, a fresh optimizer" in log
    state = torch.load(run / "checkpoints" / "0000001.pt", weights_only=True)
    assert state["step"] == 1 and state["opt"]["state"]  # one step of a fresh AdamW
    moved = max((state["model"][k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert 0 < moved < 1e-2  # one step away from the folder's weights (lr 1e-4), not from a fresh init
    nan = model.state_dict()
    nan["x_embedder.proj.weight"][0, 0, 0, 0] = float("inf")
    bad = SiT(**model.config())
    bad.load_state_dict(nan)
    bad.save_pretrained(tmp_path / "nan")
    assert train_cli(tiny_flags(images, tmp_path / "r2", steps=1, ckpt=tmp_path / "nan")) == 2
    assert "x_embedder.proj.weight (0 NaN, 1 infinite of" in error_line(capsys)


def test_evaluate_records_the_sample_folder_for_the_card(capsys, tmp_path, ours, monkeypatch):
    # sample-ddp -> evaluate --out -> export --metrics: the card's numbers carry the folder's sampler settings.
    from disploss.commands import evaluate as evaluate_command

    argv = ["sample-ddp", "ODE", "--sampling-method", "euler", "--num-sampling-steps", "3", "--num-fid-samples", "4",
            "--ckpt", str(ours["path"]), "--sample-dir", str(tmp_path / "samples"), "--device", "cpu"]  # fmt: skip
    assert call(capsys, argv)[0] == 0
    (npz,) = (tmp_path / "samples").glob("*.npz")
    numbers = {"inception_score": 1.5, "fid": 99.5, "sfid": 50.0, "precision": 0.5, "recall": 0.25,
               "num_samples": 4, "num_reference_images": 4}  # fmt: skip
    monkeypatch.setattr(evaluate_command, "evaluate", lambda *a, **k: dict(numbers))  # no Inception weights here
    (tmp_path / "ref.npz").write_bytes(b"")
    rc, out, err = call(capsys, ["evaluate", str(tmp_path / "ref.npz"), str(npz), "--out", str(tmp_path / "e.json")])
    assert rc == 0 and "with the sample folder's settings" in out, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["sample_config"] == json.loads((npz.with_suffix("") / "sample_config.json").read_text())
    assert record["sample_batch"] == str(npz) and record["fid"] == 99.5
    rc, _, err = export(capsys, ours["path"], tmp_path / "sit", "--metrics", tmp_path / "e.json")
    assert rc == 0, err
    card = (tmp_path / "sit" / "README.md").read_text()
    assert "| FID | 99.5 | 4 | ODE euler, 3 grid points, cfg 1.0, seed 0 |" in card
