"""`disploss sample-ddp`: per-image random streams, the npz, independence from processes and batch size,
resuming without duplicates, the folder name and the settings guard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from disploss.checkpoint import load_sit_weights
from disploss.evaluation.npz import load_samples_npz
from disploss.sampling import ddp as sample_ddp
from disploss.sampling import folder as sample_folder
from disploss.statedict import fingerprint
from trainkit import MODEL, call, run_python, save_training_checkpoint, tiny_sit, torchrun

N = 6
BASE = ["--num-sampling-steps", "4", "--num-fid-samples", str(N), "--device", "cpu"]
SDE = ["SDE", *BASE, "--cfg-scale", "2.0"]
ODE = ["ODE", "--sampling-method", "euler", *BASE]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One of our training checkpoints: pixel space, 8 px, 5 classes."""
    return save_training_checkpoint(tmp_path_factory.mktemp("ckpt") / "0000100.pt", tiny_sit(0, preset=MODEL))


def run_ddp(capsys, ckpt, sample_dir, argv, *extra) -> tuple[int, str, str]:
    return call(capsys, ["sample-ddp", *argv, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), *extra])


def outputs(sample_dir: Path) -> tuple[Path, Path]:
    """(the sample folder, its .npz) of the only run in sample_dir."""
    folders = [p for p in sample_dir.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0], folders[0].with_name(folders[0].name + ".npz")


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


# ---- per-image random streams ---------------------------------------------------------------------------


def test_streams_depend_only_on_seed_and_index():
    def draws(seed, indices, steps=3):
        gens = [sample_ddp.image_generator(seed, i) for i in indices]
        z, y = sample_ddp.draw_inputs(gens, (3, 4, 4), 10)
        noise = sample_ddp.per_image_noise(gens)
        x = torch.zeros(2 * len(indices), 3, 4, 4)  # the doubled CFG batch
        eps = [noise(x) for _ in range(steps)]
        for e in eps:
            torch.testing.assert_close(e[: len(indices)], e[len(indices) :], rtol=0, atol=0)
        return z, y, torch.stack([e[: len(indices)] for e in eps], 1)

    z, y, eps = draws(0, [3, 4, 5, 6])
    for batch in ([3], [4, 5], [6]):
        zb, yb, eb = draws(0, batch)
        rows = [i - 3 for i in batch]
        assert torch.equal(zb, z[rows]) and torch.equal(yb, y[rows]) and torch.equal(eb, eps[rows])
    z1, _, _ = draws(1, [3, 4, 5, 6])
    assert not torch.equal(z1, z)
    assert not torch.equal(z[0], z[1])
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10


def test_folder_name(tmp_path):
    vae_dir = tmp_path / "my-vae"
    vae_dir.mkdir()
    config = {
        "model": "SiT-XL/2",
        "ckpt_name": "0400000",
        "image_size": 256,
        "vae": "ema",
        "cfg_scale": 1.5,
        "global_seed": 0,
        "mode": "SDE",
        "num_sampling_steps": 250,
        "sampling_method": "Euler",
        "diffusion_form": "sigma",
        "last_step": "Mean",
        "last_step_size": 0.04,
        "guide_channels": 3,
        "pixel_conversion": "truncate",
    }
    assert sample_folder.folder_name(config) == (
        "SiT-XL-2-0400000-size-256-vae-ema-cfg-1.5-seed-0-SDE-250-Euler-sigma-Mean-0.04"
    )
    ode = {
        **config,
        "mode": "ODE",
        "sampling_method": "dopri5",
        "vae": str(vae_dir),
        "guide_channels": "all",
        "pixel_conversion": "round",
    }
    assert sample_folder.folder_name(ode) == (
        "SiT-XL-2-0400000-size-256-vae-my-vae-cfg-1.5-seed-0-ODE-250-dopri5-guide-all-round"
    )
    # settings that change the images are in the name: the time grid of fixed steps, batch-coupled step control
    from disploss.sampling.config import ODEConfig

    ab2 = ODEConfig(sampling_method="ab2", num_sampling_steps=11, time_schedule="power").settings()
    assert sample_folder.folder_name({**config, **ab2}) == (
        "SiT-XL-2-0400000-size-256-vae-ema-cfg-1.5-seed-0-ODE-11-ab2-power1.5"
    )
    batch = ODEConfig(step_control="batch").settings()
    assert batch["step_control"] == "batch" and "step_control" not in ODEConfig(sampling_method="euler").settings()
    assert sample_folder.folder_name({**config, **batch}).endswith("-ODE-250-dopri5-batchsteps")


# ---- the npz --------------------------------------------------------------------------------------------


def test_npz_format(capsys, tmp_path, ckpt):
    rc, out, err = run_ddp(capsys, ckpt, tmp_path, ODE, "--per-proc-batch-size", "4", "--cfg-scale", "1.5")
    assert rc == 0, err
    folder, npz = outputs(tmp_path)
    weights = fingerprint(load_sit_weights(ckpt)[0])  # the folder is keyed by the EMA weights' content
    assert folder.name == f"SiT-T-2-0000100-ema-{weights}-size-8-vae-none-cfg-1.5-seed-0-ODE-4-euler"
    assert pngs(folder) == [f"{i:06d}.png" for i in range(N)]
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png") == ["sample_config.json"]
    with np.load(npz) as data:
        assert data.files == ["arr_0"]
        images = data["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (N, 8, 8, 3)
    from PIL import Image

    for i in range(N):
        with Image.open(folder / f"{i:06d}.png") as img:
            np.testing.assert_array_equal(np.asarray(img), images[i])
    assert len({images[i].tobytes() for i in range(N)}) == N
    assert f"Saved .npz file to {npz} [shape=({N}, 8, 8, 3)]" in out


def test_batch_size_does_not_change_the_samples(capsys, tmp_path, ckpt):
    for bs in ("1", "3"):
        assert run_ddp(capsys, ckpt, tmp_path / bs, SDE, "--per-proc-batch-size", bs)[0] == 0
    a, b = (load_samples_npz(outputs(tmp_path / bs)[1]).astype(int) for bs in ("1", "3"))
    # Same noise, labels and increments per index. The float result of a batched GEMM is not bitwise the
    # same for every batch size, so a pixel may move by one level in rare places (usually none).
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-2


def test_two_processes_give_the_same_npz_as_one(tmp_path, ckpt):
    argv = ["-m", "disploss", "sample-ddp", *SDE, "--ckpt", ckpt, "--per-proc-batch-size", "1"]
    for done in (
        run_python([*argv, "--sample-dir", tmp_path / "one"], tmp_path),
        torchrun(2, [*argv, "--sample-dir", tmp_path / "two"], tmp_path, timeout=180),
    ):
        assert done.returncode == 0, done.stdout + done.stderr
    assert "sampling 6 on 2 process(es)" in done.stdout
    (f1, npz1), (f2, npz2) = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert f1.name == f2.name
    np.testing.assert_array_equal(load_samples_npz(npz1), load_samples_npz(npz2))
    assert pngs(f2) == [f"{i:06d}.png" for i in range(N)]
    assert not [p for p in f2.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("extra", [[], ["--cfg-scale", "2.0"]], ids=["cfg1", "cfg2"])
def test_default_adaptive_sampler_is_independent_of_processes_and_batch_size(capsys, tmp_path, ckpt, extra):
    # The default sampler, adaptive dopri5: each image takes its own steps (per-image step-size control), so the
    # npz is the same for 1 or 2 processes and any batch size, up to the float rounding of a batched GEMM, which is
    # not bitwise the same for every batch size: a pixel may move by one level in rare places (measured: 1 of 1152
    # on one set of weights, none on another). The float-level property, against torchdiffeq's one step size per
    # batch (--step-control batch), is test_per_image.py::test_which_methods_keep_each_image_independent_of_its_batch_mates.
    argv = ["ODE", *BASE, *extra]
    for name, bs in (("bs1", "1"), ("bs5", "5")):
        assert run_ddp(capsys, ckpt, tmp_path / name, argv, "--per-proc-batch-size", bs)[0] == 0
    two = ["-m", "disploss", "sample-ddp", *argv, "--ckpt", ckpt, "--per-proc-batch-size", "2"]
    done = torchrun(2, [*two, "--sample-dir", tmp_path / "two"], tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sampling 6 on 2 process(es), 2 per batch" in done.stdout
    folders, arrays = zip(*(outputs(tmp_path / name) for name in ("bs1", "bs5", "two")))
    assert len({f.name for f in folders}) == 1 and folders[0].name.endswith("-ODE-4-dopri5")
    first = load_samples_npz(arrays[0]).astype(int)
    for other in arrays[1:]:
        other = load_samples_npz(other).astype(int)
        assert np.abs(other - first).max() <= 1 and (other != first).mean() < 1e-2
    assert json.loads((folders[0] / "sample_config.json").read_text())["step_control"] == "per-image"


# ---- resuming -------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_after_a_stop_and_after_lost_images(capsys, tmp_path, ckpt, monkeypatch):
    args = (SDE, "--per-proc-batch-size", "1")
    assert run_ddp(capsys, ckpt, tmp_path / "full", *args)[0] == 0
    expected = load_samples_npz(outputs(tmp_path / "full")[1])

    from disploss import imageio

    real_save = imageio.save_png  # sample_ddp imports it at run time: patching the module is enough
    written: list[int] = []
    state = {"stop_after": None, "npz": None}

    def watched_save(array, path):
        # The npz must never exist while an image is still being made.
        if state["npz"] is not None:
            assert not state["npz"].exists(), "the .npz exists while images are missing"
        if state["stop_after"] is not None and len(written) == state["stop_after"]:
            raise Interrupted
        written.append(int(Path(path).stem))
        real_save(array, path)

    monkeypatch.setattr(imageio, "save_png", watched_save)
    sample_dir = tmp_path / "resumed"
    # 1. stopped after 2 images: no npz, 2 complete PNGs, no temporary files
    state["stop_after"] = 2
    with pytest.raises(Interrupted):
        run_ddp(capsys, ckpt, sample_dir, *args)
    folder, npz = outputs(sample_dir)
    assert pngs(folder) == ["000000.png", "000001.png"] and not npz.exists()
    # 2. restarted: only the missing indices are sampled, once each
    written.clear()
    state.update(stop_after=None, npz=npz)
    rc, out, err = run_ddp(capsys, ckpt, sample_dir, *args)
    assert rc == 0, err
    assert written == [2, 3, 4, 5] and "2 of 6 images present, sampling 4" in out
    np.testing.assert_array_equal(load_samples_npz(npz), expected)
    # 3. images lost after completion (the npz stays): it is removed first, the lost ones are redone
    for i in (1, 4):
        (folder / f"{i:06d}.png").unlink()
    written.clear()
    rc, out, err = run_ddp(capsys, ckpt, sample_dir, *args)
    assert rc == 0, err
    assert written == [1, 4] and "removed the stale" in out
    np.testing.assert_array_equal(load_samples_npz(npz), expected)
    # 4. complete: nothing to sample, the npz is rebuilt
    written.clear()
    assert run_ddp(capsys, ckpt, sample_dir, *args)[0] == 0 and written == []
    assert pngs(folder) == [f"{i:06d}.png" for i in range(N)]


def test_temporary_files_of_a_killed_run_are_ignored_and_removed(capsys, tmp_path, ckpt):
    assert run_ddp(capsys, ckpt, tmp_path, ODE, "--num-fid-samples", "2")[0] == 0
    folder, npz = outputs(tmp_path)
    (folder / "000001.png").rename(folder / ".000001.png.abc123.tmp")  # what an interrupted atomic write leaves
    assert sample_folder.missing_indices(folder, 2) == [1]
    assert run_ddp(capsys, ckpt, tmp_path, ODE, "--num-fid-samples", "2")[0] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "sample_config.json"]


def test_more_samples_extend_a_folder(capsys, tmp_path, ckpt):
    assert run_ddp(capsys, ckpt, tmp_path / "a", ODE, "--num-fid-samples", "3")[0] == 0
    rc, out, _ = run_ddp(capsys, ckpt, tmp_path / "a", ODE)
    assert rc == 0 and "3 of 6 images present, sampling 3" in out
    assert run_ddp(capsys, ckpt, tmp_path / "b", ODE)[0] == 0
    np.testing.assert_array_equal(
        load_samples_npz(outputs(tmp_path / "a")[1]), load_samples_npz(outputs(tmp_path / "b")[1])
    )


def test_other_settings_in_the_same_folder_are_refused(capsys, tmp_path, ckpt):
    ode = ["ODE", "--sampling-method", "heun2", *BASE, "--num-fid-samples", "1"]
    assert run_ddp(capsys, ckpt, tmp_path, ode)[0] == 0
    rc, _, err = run_ddp(capsys, ckpt, tmp_path, ode, "--rtol", "0.01")
    assert rc == 2 and "holds samples made with other settings (rtol: 0.001 there, 0.01 now)" in err
    # the batch size, the precision and the number of images are free to change
    rc, _, err = run_ddp(
        capsys, ckpt, tmp_path, ode, "--per-proc-batch-size", "2", "--precision", "fp32", "--num-fid-samples", "2"
    )
    assert rc == 0, err


def test_round_pixel_conversion(capsys, tmp_path, ckpt):
    for mode in ("truncate", "round"):
        assert run_ddp(capsys, ckpt, tmp_path / mode, ODE, "--pixel-conversion", mode)[0] == 0
    (ft, nt), (fr, nr) = outputs(tmp_path / "truncate"), outputs(tmp_path / "round")
    assert fr.name == ft.name + "-round"
    # The reference's clamp(127.5 x + 128).to(uint8) is round-half-up of 127.5 (x + 1): equal but at ties.
    t, r = load_samples_npz(nt).astype(int), load_samples_npz(nr).astype(int)
    assert np.abs(t - r).max() <= 1


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["ODE", "--cfg-scale", "0.99"], "argument --cfg-scale: must be >= 1.0"),
        (["ODE", "--per-proc-batch-size", "0"], "argument --per-proc-batch-size: must be at least 1"),
        (["ODE", "--global-seed", "-1"], "argument --global-seed: must be at least 0"),
        (["ODE", "--precision", "fp32", "--tf32"], "--precision fp32 contradicts --tf32"),
        (["ODE", "--image-size", "9"], "--image-size 9 contradicts the checkpoint"),
    ],
)
def test_errors(capsys, tmp_path, ckpt, argv, expected):
    rc, _, err = run_ddp(capsys, ckpt, tmp_path, argv)
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_missing_checkpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(capsys, ["sample-ddp", "ODE", "--device", "cpu"])
    assert rc == 2 and "--ckpt PATH" in err
    assert not (tmp_path / "samples").exists()
