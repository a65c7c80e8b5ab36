"""`disploss sample` / sample.py: checkpoints of both kinds, pixel space and a tiny VAE, ODE and SDE, the grid,
the cfg == 1 shortcut, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from disploss.commands import main as cli
from trainkit import MODEL, call, read_png, save_tiny_vae, save_training_checkpoint, tiny_sit

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num-sampling-steps", "4"]
ODE_FAST = ["ODE", "--sampling-method", "euler", *FAST]
SDE_FAST = ["SDE", *FAST]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Pixel-space (3 channels, 8 px, 5 classes) checkpoints: ours (model != ema) and a released-style bare EMA
    state dict."""
    folder = tmp_path_factory.mktemp("ckpts")
    ema, other = tiny_sit(0, preset=MODEL), tiny_sit(1, preset=MODEL)
    train = save_training_checkpoint(folder / "0000100.pt", ema, model=other)
    bare = folder / "released.pt"
    torch.save(ema.state_dict(), bare)
    return {"train": train, "bare": bare, "ema": ema}


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A random AutoencoderKL (downsampling factor 2, 4 latent channels) saved with save_pretrained."""
    pytest.importorskip("diffusers")
    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"))


def grid_shape(rows: int, cols: int, side: int) -> tuple[int, int, int]:
    return (rows * (side + 2) + 2, cols * (side + 2) + 2, 3)  # torchvision's make_grid, padding 2


# ---- end to end -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ODE_FAST, SDE_FAST], ids=["ODE", "SDE"])
def test_ours_and_released_checkpoints_give_the_ema_grid(capsys, tmp_path, ckpts, mode):
    ours, released = tmp_path / "ours.png", tmp_path / "released.png"
    rc, out, err = call(capsys, ["sample", *mode, "--ckpt", str(ckpts["train"]), "--out", str(ours)])
    assert rc == 0, err
    assert "image_size=8 (stored args)" in out and "vae=none (stored args)" in out
    rc, out, err = call(
        capsys, ["sample", *mode, "--ckpt", str(ckpts["bare"]), "--vae", "none", "--out", str(released)]
    )
    assert rc == 0, err
    assert f"model={MODEL} (from the weights)" in out
    grid = read_png(ours)
    assert grid.shape == grid_shape(2, 3, 64)  # one image per class (5), 2 rows of 3; 8 px drawn 8x larger
    assert grid.std() > 0
    np.testing.assert_array_equal(grid, read_png(released))  # ours samples from 'ema', not 'model'
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ode_and_sde_differ_and_seed_matters(capsys, tmp_path, ckpts):
    paths = {}
    for name, argv in {"ode": ODE_FAST, "sde": SDE_FAST, "ode1": [*ODE_FAST, "--seed", "1"]}.items():
        paths[name] = tmp_path / f"{name}.png"
        assert call(capsys, ["sample", *argv, "--ckpt", str(ckpts["train"]), "--out", str(paths[name])])[0] == 0
    ode, sde, ode1 = (read_png(paths[k]) for k in ("ode", "sde", "ode1"))
    assert not np.array_equal(ode, sde) and not np.array_equal(ode, ode1)


def test_tiny_autoencoder_kl_latents(capsys, tmp_path, tiny_vae_dir):
    # A latent model (4 channels, 8x8 latents) decoded by a factor-2 VAE: 16 px images.
    ema = tiny_sit(2, preset=MODEL, in_channels=4, input_size=8, num_classes=5)
    ckpt = save_training_checkpoint(tmp_path / "0000200.pt", ema, image_size=16, vae=str(tiny_vae_dir))
    out = tmp_path / "vae.png"
    rc, stdout, err = call(capsys, ["sample", *SDE_FAST, "--ckpt", str(ckpt), "--out", str(out), "--cfg-scale", "1.5"])
    assert rc == 0, err
    assert "image_size=16 (stored args)" in stdout
    assert read_png(out).shape == grid_shape(2, 3, 64)  # 16 px images drawn 4x larger
    # A released-style file with the VAE given on the command line: the image size follows from the weights.
    bare = tmp_path / "bare.pt"
    torch.save(ema.state_dict(), bare)
    out2 = tmp_path / "vae2.png"
    rc, stdout, err = call(
        capsys,
        [
            "sample",
            *SDE_FAST,
            "--ckpt",
            str(bare),
            "--vae",
            str(tiny_vae_dir),
            "--out",
            str(out2),
            "--cfg-scale",
            "1.5",
        ],
    )
    assert rc == 0, err
    np.testing.assert_array_equal(read_png(out), read_png(out2))


def test_class_labels_and_nrow(capsys, tmp_path, ckpts):
    out = tmp_path / "g.png"
    rc, stdout, err = call(
        capsys,
        [
            "sample",
            *ODE_FAST,
            "--ckpt",
            str(ckpts["train"]),
            "--class-labels",
            "4,0,2",
            "--nrow",
            "2",
            "--out",
            str(out),
        ],
    )
    assert rc == 0, err
    grid = read_png(out)
    assert grid.shape == grid_shape(2, 2, 64)  # 8 px images drawn 8x larger
    assert (grid[132:, :] == 0).all() and (grid[68:132, 68:132] == 0).all()  # padding and the empty 4th cell
    assert (grid[2:66, 2:66] != 0).any()
    assert "labels 4,0,2" in stdout


def test_default_labels():
    from disploss.sampling.grid import default_class_labels
    from disploss.sampling.load import REFERENCE_CLASS_LABELS

    assert default_class_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279] == list(REFERENCE_CLASS_LABELS)
    assert default_class_labels(10) == list(range(10))  # every digit: 8 and 9 included
    assert default_class_labels(3) == [0, 1, 2]
    assert default_class_labels(25) == list(range(10))


# ---- the cfg == 1 shortcut ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ODE", "SDE"])
def test_cfg_one_shortcut_equals_the_doubled_batch(ckpts, mode):
    from disploss.commands.flags import config_from_namespace
    from disploss.sampling.config import SAMPLERS
    from disploss.sampling.guidance import as_doubled_noise as _as_doubled_noise
    from disploss.sampling.guidance import cfg_batch, guided_model_fn
    from disploss.transport import create_transport
    from disploss.transport.integrators import default_noise

    model = ckpts["ema"]
    method = ["--sampling-method", "heun2"] if mode == "ODE" else []
    args = cli.build_parser("sample").parse_args([mode, *FAST, *method])
    sampler = config_from_namespace(SAMPLERS[mode], args)
    transport = create_transport()
    y = torch.tensor([0, 3, 4])
    batches = []

    def counting(fn):
        def wrapped(x, t, y):
            batches.append(len(x))
            return fn(x, t, y)

        return wrapped

    # The reference: always the doubled batch, guidance scale 1.
    fn = counting(lambda x, t, y: model.forward_with_cfg(x, t, y, 1.0))
    torch.manual_seed(0)
    z = torch.randn(3, 3, 8, 8)
    zz, yy = cfg_batch(z, y, model.num_classes, doubled=True)
    ref = sampler(transport, fn, zz, yy, noise_fn=default_noise)[:3]
    assert set(batches) == {6}
    # The shortcut: plain forward on the undoubled batch, SDE increments drawn as the doubled batch would.
    batches.clear()
    fn, doubled = guided_model_fn(model, 1.0, 3)
    assert not doubled
    torch.manual_seed(0)
    z = torch.randn(3, 3, 8, 8)
    out = sampler(transport, counting(fn), z, y, noise_fn=_as_doubled_noise)
    assert set(batches) == {3}
    # u + 1 * (c - u) is c up to float rounding, and batch size changes GEMM blocking: equal to ~1e-6.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_guidance_is_batched_above_one(ckpts):
    from disploss.sampling.guidance import guided_model_fn

    fn, doubled = guided_model_fn(ckpts["ema"], 1.5, None)
    assert doubled
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5])
    torch.testing.assert_close(fn(x, t, y), ckpts["ema"].forward_with_cfg(x, t, y, 1.5, guide_channels=None))


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["ODE", "--cfg-scale", "0.5"], "argument --cfg-scale: must be >= 1.0"),
        (["XYZ"], "invalid choice: 'XYZ' (choose from 'ODE', 'SDE', 'MeanFlow')"),
        (["ODE", "--guide-channels", "two"], "argument --guide-channels: 'two': valid values are a positive integer"),
        (["SDE", "--sampling-method", "dopri5"], "argument --sampling-method: invalid choice"),
        (["ODE", "--pixel-conversion", "floor"], "argument --pixel-conversion: invalid choice"),
        (["ODE", "--likelihood"], "unrecognized arguments: --likelihood"),
    ],
)
def test_argument_errors_are_one_line(capsys, ckpts, argv, expected):
    rc, _, err = call(capsys, ["sample", *argv, "--ckpt", str(ckpts["bare"])])
    assert rc == 2
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    "which, argv, expected",
    [
        (
            "bare",
            ["--vae", "none", "--image-size", "9"],
            "--image-size 9 is not divisible by the VAE downsampling factor 1 (--vae none) times the patch size 2 = 2; "
            "valid sizes nearby: 8 or 10",
        ),
        ("bare", [], "--vae mse gives 4-channel latents: pass --vae none"),
        (
            "train",
            ["--num-classes", "7"],
            "--num-classes 7 contradicts the checkpoint, which was trained with num_classes 5",
        ),
        ("train", ["--model", "SiT-B/2"], "--model SiT-B/2 contradicts the checkpoint"),
        ("train", ["--model", "SiT-Q/2"], "unknown model 'SiT-Q/2'; valid choices:"),
        ("train", ["--class-labels", "1,5"], "--class-labels 1,5: labels must lie in [0, 4]"),
        ("train", ["--guide-channels", "4"], "--guide-channels 4 exceeds the model's 3 output channels"),
        ("train", ["--image-size", "16"], "--image-size 16 contradicts the checkpoint"),
        ("bare", ["--vae", "none", "--image-size", "16"], "pos_embed has 16 tokens"),
    ],
)
def test_setting_errors_are_reported(capsys, tmp_path, ckpts, which, argv, expected):
    out = tmp_path / "x.png"
    rc, _, err = call(capsys, ["sample", *ODE_FAST, "--ckpt", str(ckpts[which]), *argv, "--out", str(out)])
    assert rc == 2
    assert err.startswith("disploss sample: error: ") and expected in err and "Traceback" not in err
    assert not out.exists()


def test_without_ckpt_there_is_no_download(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(capsys, ["sample", "ODE"])
    assert rc == 2
    assert "pass --ckpt PATH" in err.replace("Pass", "pass") and "SiT-XL-2-256x256.pt" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = call(capsys, ["sample", "ODE", "--ckpt", str(tmp_path / "nope.pt")])
    assert rc == 2 and "nope.pt: no such file" in err


def test_pretrained_models_folder_is_used_without_ckpt(capsys, tmp_path, monkeypatch, ckpts):
    # Where the reference's auto-download leaves the file: used when --ckpt is not given.
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt").write_bytes(Path(ckpts["bare"]).read_bytes())
    monkeypatch.chdir(tmp_path)
    rc, _, err = call(capsys, ["sample", *ODE_FAST, "--vae", "none"])
    assert rc == 0, err
    assert (tmp_path / "samples" / "sample.png").is_file()


# ---- the root shims, verbatim ---------------------------------------------------------------------------


def test_readme_commands_parse():
    readme = "ODE --model SiT-XL/2 --image-size 256 --ckpt /path/to/model.pt"
    args = cli.build_parser("sample").parse_args(readme.split())
    assert (args.mode, args.model, args.image_size, args.ckpt) == ("ODE", "SiT-XL/2", 256, "/path/to/model.pt")
    assert (args.sampling_method, args.atol, args.rtol, args.cfg_scale, args.num_sampling_steps, args.seed) == (
        "dopri5",
        1e-6,
        1e-3,
        4.0,
        250,
        0,
    )
    assert args.guide_channels == 3 and args.out == "samples/sample.png" and args.pixel_conversion == "truncate"
    sde = cli.build_parser("sample").parse_args(["SDE"])
    assert (sde.sampling_method, sde.diffusion_form, sde.diffusion_norm, sde.last_step, sde.last_step_size) == (
        "Euler",
        "sigma",
        1.0,
        "Mean",
        0.04,
    )
    ddp = cli.build_parser("sample-ddp").parse_args(
        "ODE --model SiT-XL/2 --num-fid-samples 50000 --ckpt /path/to/model.pt".split()
    )
    assert (ddp.num_fid_samples, ddp.per_proc_batch_size, ddp.cfg_scale, ddp.global_seed, ddp.sample_dir) == (
        50000,
        4,
        1.0,
        0,
        "samples",
    )


def test_root_shim_runs(tmp_path, ckpts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "sample.py"),
        "ODE",
        "--model",
        MODEL,
        "--image-size",
        "8",
        "--ckpt",
        str(ckpts["bare"]),
        "--vae",
        "none",
        "--sampling-method",
        "euler",
        "--num-sampling-steps",
        "3",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # the model's 5 classes, one image each, in 2 rows of 3; 8 px images drawn 8x larger
    assert read_png(tmp_path / "samples" / "sample.png").shape == grid_shape(2, 3, 64)
    bad = subprocess.run(
        cmd + ["--cfg-scale", "0.9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--cfg-scale" in bad.stderr
