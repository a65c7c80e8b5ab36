"""disploss.sampling.pipeline.SiTPipeline: with the same noise and time grid it gives sample.py's images, through
diffusers' FlowMatchEulerDiscreteScheduler (flow and MeanFlow, with and without guidance, pixels and a tiny VAE) and
through our samplers; saved and loaded with save_pretrained / from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disploss.errors import ConfigError
from disploss.imageio import save_grid
from disploss.models import SiT
from trainkit import MODEL, call, read_png, save_tiny_vae, save_training_checkpoint, tiny_sit

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

from disploss.sampling.pipeline import SiTPipeline  # noqa: E402

LABELS = [0, 1, 2, 3, 4]  # sample.py's default for 5 classes: one image per class, 2 rows of 3


def sample_py(capsys, tmp_path, folder, *argv) -> np.ndarray:
    out = tmp_path / "sample.png"
    rc, _, err = call(capsys, ["sample", *argv, "--ckpt", str(folder), "--out", str(out)])
    assert rc == 0, err
    return read_png(out)


def pipeline_grid(tmp_path, pipe, **kwargs) -> np.ndarray:
    """The pipeline's images on sample.py's noise (seed 0, drawn on the CPU), laid out as sample.py lays its grid."""
    model = pipe.transformer
    torch.manual_seed(0)
    z = torch.randn(len(LABELS), model.in_channels, model.input_size, model.input_size)
    images = pipe(LABELS, latents=z, output_type="np", **kwargs).images  # uint8 (B, H, W, 3)
    save_grid(images, tmp_path / "pipe.png", nrow=3, zoom=max(1, 64 // images.shape[1]))
    return read_png(tmp_path / "pipe.png")


@pytest.mark.parametrize("cfg", [1.0, 2.0], ids=["cfg1", "cfg2"])
def test_the_flow_scheduler_gives_sample_pys_images(capsys, tmp_path, cfg):
    # 4 Euler steps: t = 0, 1/4, 1/2, 3/4 (sigma = 1, 3/4, 1/2, 1/4) are exact in float32, so are the steps.
    from disploss.checkpoint import export_folder

    ckpt = save_training_checkpoint(
        tmp_path / "0000010.pt", tiny_sit(0, preset=MODEL)
    )  # pixel space, stored in its args
    folder = export_folder(ckpt, tmp_path / "sit")[0]
    expected = sample_py(capsys, tmp_path, folder, "ODE", "--sampling-method", "euler", "--num-sampling-steps", "5",
                         "--cfg-scale", str(cfg))  # fmt: skip
    pipe = SiTPipeline.from_model(folder)  # the SiT, the scheduler, no VAE (the folder says: pixel space)
    assert pipe.vae is None and pipe.config.path_type == "Linear"
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(pipeline_grid(tmp_path, pipe, num_inference_steps=4, guidance_scale=cfg), expected)


@pytest.mark.parametrize("steps, cfg", [(1, 1.0), (2, 2.0)])
def test_the_scheduler_samples_meanflow_as_sample_py(capsys, tmp_path, steps, cfg):
    folder = tiny_sit(preset=MODEL, meanflow=True).save_pretrained(tmp_path / "mf")
    expected = sample_py(capsys, tmp_path, folder, "MeanFlow", "--num-sampling-steps", str(steps), "--vae", "none",
                         "--cfg-scale", str(cfg))  # fmt: skip
    pipe = SiTPipeline(SiT.from_pretrained(folder), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    grid = pipeline_grid(tmp_path, pipe, num_inference_steps=steps, guidance_scale=cfg)
    np.testing.assert_array_equal(grid, expected)


def test_our_samplers_through_the_pipeline(capsys, tmp_path):
    from disploss.sampling.config import ODEConfig

    folder = tiny_sit(1, preset=MODEL).save_pretrained(tmp_path / "sit")
    expected = sample_py(capsys, tmp_path, folder, "ODE", "--sampling-method", "heun2", "--num-sampling-steps", "6",
                         "--vae", "none", "--cfg-scale", "1.5")  # fmt: skip
    pipe = SiTPipeline(SiT.from_pretrained(folder), FlowMatchEulerDiscreteScheduler())
    sampler = ODEConfig(sampling_method="heun2", num_sampling_steps=6)
    np.testing.assert_array_equal(pipeline_grid(tmp_path, pipe, sampler=sampler, guidance_scale=1.5), expected)
    vp = SiTPipeline(pipe.transformer, FlowMatchEulerDiscreteScheduler(), path_type="VP")
    with pytest.raises(ConfigError, match="needs a Linear velocity model, not VP velocity"):
        vp(LABELS)


def test_save_and_load_with_a_vae_gives_sample_pys_images(capsys, tmp_path):
    from diffusers import AutoencoderKL

    vae_dir = save_tiny_vae(tmp_path / "vae")  # downsampling factor 2: 16 px images, 8 x 8 x 4 latents
    folder = tiny_sit(2, preset=MODEL, in_channels=4).save_pretrained(tmp_path / "sit")
    expected = sample_py(capsys, tmp_path, folder, "ODE", "--sampling-method", "euler", "--num-sampling-steps", "5",
                         "--vae", str(vae_dir), "--image-size", "16", "--cfg-scale", "1.0")  # fmt: skip
    pipe = SiTPipeline(
        SiT.from_pretrained(folder), FlowMatchEulerDiscreteScheduler(), AutoencoderKL.from_pretrained(vae_dir)
    )
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["model_index.json", "scheduler", "transformer",
                                                                      "vae"]  # fmt: skip
    loaded = SiTPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(pipeline_grid(tmp_path, loaded, num_inference_steps=4), expected)
    images = loaded(LABELS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(16, 16), (16, 16)]  # PIL by default
