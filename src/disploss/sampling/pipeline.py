"""A diffusers pipeline for disploss SiTs (flow or MeanFlow): diffusers' FlowMatchEulerDiscreteScheduler or any of our
samplers (ODEConfig, SDEConfig, MeanFlowConfig), class labels and classifier-free guidance as sample.py does them.

    pipe = SiTPipeline.from_model("me/sit-xl-2-disp")       # a model folder or hub id (`disploss export`), its VAE
    images = pipe([207, 360], num_inference_steps=50, guidance_scale=1.5).images
    pipe.save_pretrained("pipe"); SiTPipeline.from_pretrained("pipe")   # transformer/, scheduler/, vae/

The time conventions, mapped once: diffusers' flow-matching schedulers run sigma from 1 (noise) to 0 (data), with
x = (1 - sigma) data + sigma noise and a model output of noise - data; ours runs t from 0 (noise) to 1 (data), with
x = t data + (1 - t) noise (the Linear path) and the velocity v = data - noise. So sigma = 1 - t, the timestep is
1000 sigma, and the scheduler is given -v: its step x + (sigma' - sigma)(-v) is our Euler step x + (t' - t) v, and
with the same noise and time grid the pipeline gives sample.py's images (tests/test_pipeline.py). A MeanFlow SiT gets
r = 1 - sigma' (the end of each step) and the scheduler -u. diffusers is imported here only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput

from disploss.errors import ConfigError
from disploss.fileio import atomic_write_json, read_json_object
from disploss.models import SiT

INDEX_NAME = "model_index.json"


class SiTPipeline(DiffusionPipeline):
    """Class-conditional sampling of a disploss SiT.

    Args:
        transformer: the SiT (flow matching or MeanFlow).
        scheduler: diffusers' FlowMatchEulerDiscreteScheduler (its Euler step); our samplers are passed per call.
        vae: the AutoencoderKL of a latent model (None: pixel space).
        path_type, prediction: the model's transport (the scheduler needs Linear + velocity; our samplers take all).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: SiT, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL | None = None,
                 path_type: str = "Linear", prediction: str = "velocity"):  # fmt: skip
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(path_type=path_type, prediction=prediction)

    @property
    def device(self) -> torch.device:  # diffusers asks each module for .device, which a plain nn.Module lacks
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @classmethod
    def from_model(cls, name_or_path: str | os.PathLike, vae: AutoencoderKL | None = None) -> SiTPipeline:
        """A pipeline for a model folder or hub id: its SiT, the Euler scheduler, the transport it was trained with
        and (unless given) the VAE its config.json names (disploss.data.vae.load_vae: ema, mse, a folder)."""
        from disploss.data.vae import load_vae
        from disploss.hub import INFO_KEY, read_config, resolve

        folder = resolve(name_or_path, flag="SiTPipeline.from_model:")
        training = (read_config(folder).get(INFO_KEY) or {}).get("training") or {}
        transformer = SiT.from_pretrained(folder)
        if vae is None and transformer.in_channels == 4 and training.get("vae", "ema") != "none":
            vae = load_vae(training.get("vae", "ema")).vae
        return cls(transformer, FlowMatchEulerDiscreteScheduler(), vae,
                   training.get("path_type", "Linear"), training.get("prediction", "velocity"))  # fmt: skip

    @torch.no_grad()
    def __call__(
        self, class_labels: list[int], num_inference_steps: int = 50, guidance_scale: float = 1.0,
        guide_channels: int | None = 3, generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
        sampler=None, output_type: str = "pil", return_dict: bool = True,
    ):  # fmt: skip
        """Sample one image per label.

        Args:
            class_labels: (B,) labels in [0, num_classes).
            num_inference_steps: Euler steps of the scheduler, on the uniform grid t = 0, 1/N, ..., 1 (sample.py
                ODE --sampling-method euler --num-sampling-steps N+1; MeanFlow: sample.py MeanFlow
                --num-sampling-steps N).
            guidance_scale, guide_channels: sample.py's --cfg-scale and --guide-channels (1: no guidance).
            generator, latents: the initial noise (B, C, h, w): given, or drawn with the generator.
            sampler: one of our samplers (disploss.sampling.config ODEConfig / SDEConfig / MeanFlowConfig) instead
                of the scheduler.
            output_type: "pil" or "np" (uint8 (B, H, W, 3), sample.py's pixels), "pt" ((B, 3, H, W) in [-1, 1]) or
                "latent".
        """
        from disploss.data.vae import IdentityCodec, LatentCodec
        from disploss.imageio import to_uint8
        from disploss.sampling.guidance import cfg_batch, check_guidance, guided_model_fn
        from disploss.transport import create_transport

        model, device = self.transformer, self.device
        check_guidance(model, guide_channels)
        y = torch.tensor(list(class_labels), device=device)
        shape = (len(y), model.in_channels, model.input_size, model.input_size)
        if latents is None:  # drawn where the generator lives (the CPU by default), as diffusers' randn_tensor
            where = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=where)
        z = latents.to(device)
        if tuple(z.shape) != shape:
            raise ConfigError(f"latents must have shape {shape} (one per label), got {tuple(z.shape)}")
        model_fn, doubled = guided_model_fn(model, guidance_scale, guide_channels)
        zz, yy = cfg_batch(z, y, model.num_classes, doubled)
        if sampler is not None:
            transport = create_transport(self.config.path_type, self.config.prediction)
            out = sampler(transport, model_fn, zz, yy, doubled=doubled)
        else:
            out = self._euler(model_fn, zz, yy, num_inference_steps)
        out = out[: len(y)]  # the guided half
        if output_type == "latent":
            return ImagePipelineOutput(images=out) if return_dict else (out,)
        codec = IdentityCodec(device) if self.vae is None else LatentCodec(self.vae, "pipeline")
        images = codec.decode(out)  # (B, 3, H, W) in [-1, 1]
        if output_type != "pt":
            pixels = to_uint8(images, "truncate")  # (B, H, W, 3): sample.py's conversion
            images = np.asarray(pixels)
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(image) for image in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _euler(self, model_fn, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
        meanflow = self.transformer.meanflow
        if not meanflow and (self.config.path_type, self.config.prediction) != ("Linear", "velocity"):
            raise ConfigError(f"the flow-matching scheduler needs a Linear velocity model, not {self.config.path_type} "
                              f"{self.config.prediction}: pass sampler=ODEConfig(...)")  # fmt: skip
        ts = torch.linspace(0.0, 1.0, steps + 1)  # our time grid; sigma = 1 - t
        self.scheduler.set_timesteps(sigmas=(1.0 - ts[:-1]).tolist(), device=x.device)
        total = self.scheduler.config.num_train_timesteps
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = torch.full((len(x),), 1.0 - float(timestep) / total, device=x.device)
            extra = {"r": torch.full_like(t, 1.0 - float(self.scheduler.sigmas[i + 1]))} if meanflow else {}
            velocity = model_fn(x, t, y, **extra)
            x = self.scheduler.step(-velocity, timestep, x).prev_sample
        return x

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """transformer/ (a model folder), scheduler/, vae/ and model_index.json, as diffusers lays a pipeline out."""
        import diffusers

        folder = Path(save_directory)
        self.transformer.save_pretrained(folder / "transformer")
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        index = {
            "_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
            "transformer": ["disploss", "SiT"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "vae": ["diffusers", "AutoencoderKL"] if self.vae is not None else [None, None],
            "path_type": self.config.path_type, "prediction": self.config.prediction,
        }  # fmt: skip
        atomic_write_json(folder / INDEX_NAME, index)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SiTPipeline:
        """A pipeline saved with save_pretrained, from its folder or a hub id (the local cache when offline)."""
        from disploss.hub import snapshot

        folder = Path(os.path.expanduser(str(pretrained_model_name_or_path)))
        if not folder.is_dir():
            folder = snapshot(str(pretrained_model_name_or_path), flag="SiTPipeline.from_pretrained:",
                              files=(INDEX_NAME,), patterns=["*"])  # fmt: skip
        index = read_json_object(folder / INDEX_NAME, fix="save the pipeline again")
        vae = AutoencoderKL.from_pretrained(folder / "vae") if (folder / "vae").is_dir() else None
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        return cls(SiT.from_pretrained(folder / "transformer"), scheduler, vae,
                   index.get("path_type", "Linear"), index.get("prediction", "velocity"))  # fmt: skip


__all__ = ["SiTPipeline"]
