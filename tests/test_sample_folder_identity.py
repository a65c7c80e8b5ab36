"""sample-ddp folders keyed by the weights (issue 20): two checkpoints of one file name never share a folder, the same
weights find their folder from any file, --weights ema|model, a smaller run never replaces a larger .npz, folders
of an earlier version are named, and the rank-0 progress bar stops at its total."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from disploss.checkpoint import export_safetensors
from disploss.evaluation.npz import load_samples_npz
from disploss.sampling import folder as sample_folder
from disploss.statedict import fingerprint
from trainkit import MODEL, call, save_training_checkpoint, tiny_sit

ARGV = ["sample-ddp", "ODE", "--sampling-method", "euler", "--num-sampling-steps", "4", "--device", "cpu"]


def ddp(capsys, ckpt, sample_dir, *extra, num: int = 4) -> tuple[int, str, str]:
    argv = [*ARGV, "--num-fid-samples", str(num), "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), *extra]
    return call(capsys, [*map(str, argv)])


def folders(sample_dir) -> list:
    return sorted(p for p in sample_dir.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Step 100 of two runs: the same file name, other weights (model != ema in each)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed in (("a", 0), ("b", 5)):
        (root / name).mkdir()
        ema, model = tiny_sit(seed, preset=MODEL), tiny_sit(seed + 1, preset=MODEL)
        out[name] = save_training_checkpoint(root / name / "0000100.pt", ema, model=model)
        out[f"{name}_ema"], out[f"{name}_model"] = ema, model
    return out


def test_two_checkpoints_of_one_name_get_their_own_folders(capsys, tmp_path, runs):
    shared = tmp_path / "samples"
    assert ddp(capsys, runs["a"], shared)[0] == 0
    rc, out, err = ddp(capsys, runs["b"], shared)
    assert rc == 0, err
    assert "0 of 4 images present, sampling 4" in out  # not "4 of 4 present": B's images are B's own
    a_key, b_key = (fingerprint(runs[f"{k}_ema"].state_dict()) for k in ("a", "b"))
    names = [f.name for f in folders(shared)]
    assert names == sorted(f"SiT-T-2-0000100-ema-{key}-size-8-vae-none-cfg-1.0-seed-0-ODE-4-euler" for key in
                           (a_key, b_key))  # fmt: skip
    for run, key in (("a", a_key), ("b", b_key)):  # each .npz holds its own model's images: sampled alone, the same
        assert ddp(capsys, runs[run], tmp_path / f"alone-{run}")[0] == 0
        (alone,) = (tmp_path / f"alone-{run}").glob("*.npz")
        np.testing.assert_array_equal(load_samples_npz(shared / alone.name), load_samples_npz(alone))
        assert json.loads((shared / alone.name[:-4] / "sample_config.json").read_text())["fingerprint"] == key
    a, b = (load_samples_npz(next(shared.glob(f"*{key}*.npz"))) for key in (a_key, b_key))
    assert not np.array_equal(a, b)


def test_the_same_weights_find_their_folder_from_any_file(capsys, tmp_path, runs):
    samples = tmp_path / "samples"
    assert ddp(capsys, runs["a"], samples, num=3)[0] == 0
    moved = tmp_path / "elsewhere" / "0000100.pt"  # the checkpoint moved: its folder goes on
    moved.parent.mkdir()
    shutil.copy(runs["a"], moved)
    rc, out, _ = ddp(capsys, moved, samples, num=4)
    assert rc == 0 and "3 of 4 images present, sampling 1" in out and len(folders(samples)) == 1
    # exported to another format, the weights keep their fingerprint (the name keeps the file's own stem)
    export_safetensors(runs["a"], tmp_path / "0000100.safetensors")
    rc, out, err = ddp(capsys, tmp_path / "0000100.safetensors", samples, "--vae", "none", num=4)
    assert rc == 0 and len(folders(samples)) == 2, err
    key = fingerprint(runs["a_ema"].state_dict())
    assert folders(samples)[0].name.startswith(f"SiT-T-2-0000100-{key}-size-8")  # a bare state dict: no ema tag
    np.testing.assert_array_equal(*(load_samples_npz(f.with_name(f.name + ".npz")) for f in folders(samples)))


def test_weights_model_samples_the_raw_weights(capsys, tmp_path, runs):
    assert ddp(capsys, runs["a"], tmp_path, "--weights", "model")[0] == 0
    (folder,) = folders(tmp_path)
    key = fingerprint(runs["a_model"].state_dict())
    assert folder.name.startswith(f"SiT-T-2-0000100-model-{key}-size-8-")
    config = json.loads((folder / "sample_config.json").read_text())
    assert config["weights"] == "model" and config["fingerprint"] == key
    assert ddp(capsys, runs["a"], tmp_path / "ema")[0] == 0
    (ema,) = folders(tmp_path / "ema")
    assert ema.name.replace(f"-ema-{fingerprint(runs['a_ema'].state_dict())}-", f"-model-{key}-") == folder.name
    assert not np.array_equal(*(load_samples_npz(f.with_name(f.name + ".npz")) for f in (folder, ema)))
    # a file holding only the EMA weights (the DispLoss releases) cannot give the raw ones
    only_ema = tmp_path / "released.pt"
    torch.save({"ema": runs["a_ema"].state_dict()}, only_ema)
    rc, _, err = ddp(capsys, only_ema, tmp_path / "x", "--weights", "model", "--vae", "none")
    assert rc == 2 and "holds only the ema weights, not the model ones: pass --weights ema" in err
    assert not (tmp_path / "x").exists()


def test_a_smaller_run_never_replaces_a_larger_npz(capsys, tmp_path, runs):
    assert ddp(capsys, runs["a"], tmp_path, num=4)[0] == 0
    (folder,) = folders(tmp_path)
    full = folder.with_name(folder.name + ".npz")
    four = load_samples_npz(full)
    rc, out, err = ddp(capsys, runs["a"], tmp_path, num=2)
    assert rc == 0, err
    assert f"{folder.name}.npz holds 4 images, more than --num-fid-samples 2: it is kept" in out
    np.testing.assert_array_equal(load_samples_npz(full), four)
    np.testing.assert_array_equal(load_samples_npz(folder.with_name(folder.name + "-n2.npz")), four[:2])
    rc, out, _ = ddp(capsys, runs["a"], tmp_path, num=6)  # a larger run extends the folder, saying so
    assert rc == 0 and "removed the stale" in out and len(load_samples_npz(full)) == 6
    assert sample_folder.sample_folder_of(folder.with_name(folder.name + "-n2.npz")) == folder
    assert sample_folder.sample_folder_of(full) == folder and sample_folder.sample_folder_of(tmp_path / "x.npz") is None


def test_a_folder_of_an_earlier_version_is_named_not_continued(capsys, tmp_path, runs):
    legacy = tmp_path / "SiT-T-2-0000100-size-8-vae-none-cfg-1.0-seed-0-ODE-4-euler"
    legacy.mkdir()
    rc, out, _ = ddp(capsys, runs["a"], tmp_path)
    assert rc == 0 and f"note: {legacy} was made before sample folders were keyed by the weights" in out
    assert "0 of 4 images present" in out and not list(legacy.iterdir())


def test_the_progress_bar_stops_at_its_total(tmp_path, runs, monkeypatch):
    # Rank 0 of 2 whose partner never comes: it samples every block (claims), twice its share. The bar's count
    # must never pass its total and must end at it.
    import tqdm

    from disploss.distributed import DistInfo
    from disploss.sampling.config import ModelSpec, ODEConfig
    from disploss.sampling.ddp import SampleDDPConfig, sample_to_npz

    seen = []

    class Bar(tqdm.tqdm):
        def update(self, n=1):
            super().update(n)
            seen.append((self.n, self.total))

        def close(self):
            seen.append(("close", self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    cfg = SampleDDPConfig(
        sampler=ODEConfig(sampling_method="euler", num_sampling_steps=3), spec=ModelSpec(ckpt=str(runs["a"])),
        sample_dir=str(tmp_path), num_fid_samples=6, per_proc_batch_size=2,
    )  # fmt: skip
    sample_to_npz(cfg, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")), log=lambda s: None)
    updates = [s for s in seen if s[0] != "close"]
    assert [n for n, _ in updates] == [2, 4, 6] and all(n <= total for n, total in updates)
    assert seen[-1] == ("close", 6, 6)
