"""The image <-> latent codec: the Stable Diffusion VAE (diffusers AutoencoderKL) or the identity (pixels).

Latents follow the reference: z = posterior SAMPLE * scale with scale = 0.18215 for the SD VAEs, and decoding
divides by the scale. Unlike the reference, decoding runs under torch.no_grad (it decoded with gradients on).
For VAEs whose config has a `shift_factor` (not the SD ones) z = (sample - shift) * scale.

diffusers is imported inside `load_vae`, so importing this module is light and works offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from disploss.errors import ConfigError, HubUnavailableError, MissingFileError
from disploss.hub import hub_unreachable, looks_like_hub_id

# --vae keywords of the reference and the hub repositories they name.
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
HUB_VAE_GEOMETRY = (4, 8)  # both: 4 latent channels, downsampling factor 8 (4 blocks)
DEFAULT_SCALE = 0.18215


def _nearby_multiples(value: int, factor: int) -> list[int]:
    below = (value // factor) * factor
    return [s for s in (below, below + factor) if s > 0]


def latent_side(image_size: int, factor: int, spec: str) -> int:
    """image_size / factor, or a ConfigError naming --image-size, the factor and the valid sizes nearby."""
    if image_size < 1 or image_size % factor:
        near = " or ".join(map(str, _nearby_multiples(image_size, factor)))
        raise ConfigError(
            f"--image-size {image_size} is not divisible by the VAE downsampling factor {factor} "
            f"(--vae {spec}); valid sizes nearby: {near}"
        )
    return image_size // factor


def vae_geometry(spec: str) -> tuple[int, int] | None:
    """(latent channels, downsampling factor) of a --vae value, without loading any weights or using the network.

    Known for 'none' (3, 1), 'ema' and 'mse' (4, 8), and a local folder (from its config.json); None for any other
    hub id (only the hub knows).
    """
    if spec == "none":
        return (3, 1)
    if spec in HUB_VAES:
        return HUB_VAE_GEOMETRY
    path = Path(os.path.expanduser(spec))
    for config in (path / "config.json", path / "vae" / "config.json"):
        if config.is_file():
            try:
                data = json.loads(config.read_text())
                return int(data["latent_channels"]), 2 ** (len(data["block_out_channels"]) - 1)
            except (OSError, ValueError, KeyError, TypeError):
                return None  # load_vae reports the folder
    return None


class LatentCodec:
    """Encode images in [-1, 1] to scaled latents and decode them back, with a diffusers AutoencoderKL.

    Args:
        vae: an AutoencoderKL (already on its device and dtype; put in eval mode, no gradients).
        spec: the --vae value it was loaded from (recorded in latent caches and logs).
    Attributes:
        latent_channels: C of the latents.
        downsample_factor: f = 2 ** (len(block_out_channels) - 1); latents are (C, H / f, W / f).
        scale: config.scaling_factor (0.18215 if the config has none).
        shift: config.shift_factor (0 if the config has none).
        device, dtype: where and in which precision the VAE runs.
    """

    def __init__(self, vae, spec: str):
        self.vae = vae.eval().requires_grad_(False)
        self.spec = spec
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        scale = getattr(config, "scaling_factor", None)
        shift = getattr(config, "shift_factor", None)
        self.scale = float(DEFAULT_SCALE if scale is None else scale)
        self.shift = float(0.0 if shift is None else shift)
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype

    def latent_size(self, image_size: int) -> int:
        """Side of the latents of image_size x image_size images.

        Raises:
            ValueError: the downsampling factor does not divide image_size (names the nearby valid sizes).
        """
        return latent_side(image_size, self.downsample_factor, self.spec)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of image_size x image_size images."""
        s = self.latent_size(image_size)
        return (self.latent_channels, s, s)

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE posterior (unscaled, unshifted).

        Args:
            x: images (B, 3, H, W) in [-1, 1], any device and float dtype.
        Returns:
            (mean, std), float32 (B, C, H / f, W / f) on the codec's device.
        """
        posterior = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of images, as the model sees them.

        Args:
            x: images (B, 3, H, W) in [-1, 1].
            sample: draw z from the posterior (the reference); False uses its mean.
            generator: optional RNG for the posterior noise (on the codec's device).
        Returns:
            float32 (B, C, H / f, W / f): (mean + std * eps - shift) * scale.
        """
        mean, std = self.encode_moments(x)
        z = mean
        if sample:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images of scaled latents, without building a graph.

        Args:
            z: latents (B, C, h, w) as returned by `encode`.
            clamp: clip to [-1, 1] (the VAE can overshoot slightly; every consumer clips anyway).
        Returns:
            float32 (B, 3, h * f, w * f) in [-1, 1] (when clamped), on the codec's device.
        """
        x = self.vae.decode(z.to(self.device, self.dtype) / self.scale + self.shift).sample.float()
        return x.clamp(-1.0, 1.0) if clamp else x


class IdentityCodec(LatentCodec):
    """The codec of pixel-space models (--vae none): latents are the images themselves.

    latent_channels 3, downsample_factor 1, scale 1, shift 0; the posterior is a point mass (std 0).
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.vae = None
        self.spec = "none"
        self.latent_channels = 3
        self.downsample_factor = 1
        self.scale = 1.0
        self.shift = 0.0
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device).float()
        return x, torch.zeros_like(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        x = z.to(self.device).float()
        return x.clamp(-1.0, 1.0) if clamp else x


def load_vae(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LatentCodec:
    """Load the codec named by a --vae value.

    A hub VAE is taken from the local Hugging Face cache when it is there (no network at all); otherwise one
    request (HF_HUB_ETAG_TIMEOUT, 10 s by default, and no retries) tells whether the hub can be reached before
    the download, so an offline machine gets its error at once instead of after the hub library's retries.

    Args:
        spec: "ema" or "mse" (stabilityai/sd-vae-ft-{ema,mse} from the Hugging Face hub or its local cache),
            "none" (pixel space, `IdentityCodec`), a local folder holding a saved AutoencoderKL (config.json
            and weights, or a pipeline folder with a vae/ sub-folder), or another hub id "owner/name".
            The keywords win over folders of the same name: pass "./ema" for a folder called ema.
        device: where the VAE runs.
        dtype: its precision (float32 matches the reference).
    Returns:
        A LatentCodec in eval mode without gradients.
    Raises:
        FileNotFoundError: spec is neither a keyword, an existing folder nor a hub id.
        HubUnavailableError: the hub id is not cached and could not be fetched (offline, unknown id); the
            message names --vae none and a local folder.
    """
    if spec == "none":
        return IdentityCodec(device, dtype)

    path = Path(os.path.expanduser(spec))
    if spec not in HUB_VAES and path.is_dir():
        subfolder = None
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            subfolder = "vae"  # a whole diffusers pipeline folder
        elif not (path / "config.json").is_file():
            raise MissingFileError(
                f"--vae {spec}: the folder has no config.json (nor vae/config.json); "
                "save the AutoencoderKL there with save_pretrained"
            )
        vae = _from_pretrained(path, subfolder=subfolder)
        return LatentCodec(vae.to(device=device, dtype=dtype), spec)

    hub_id = HUB_VAES.get(spec)
    if hub_id is None:
        if not looks_like_hub_id(spec):
            raise MissingFileError(
                f"--vae {spec!r} is not one of 'ema', 'mse', 'none', nor an existing folder holding a saved "
                "AutoencoderKL, nor a hub id of the form owner/name"
            )
        hub_id = spec
    unreachable = hub_unreachable(hub_id)
    try:
        # Offline, only the local cache can have it: one look there, no download attempt and no retries.
        vae = _from_pretrained(hub_id, local_files_only=unreachable is not None)
    except (OSError, ValueError) as e:
        raise _hub_error(spec, hub_id, unreachable or e) from e
    return LatentCodec(vae.to(device=device, dtype=dtype), spec)


def _from_pretrained(name_or_path, **kwargs):
    from diffusers import AutoencoderKL

    # Without accelerate, diffusers would print advice to install it before every load; loading a VAE this size
    # the plain way is what it falls back to anyway. huggingface_hub warns about an argument diffusers passes.
    kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderKL.from_pretrained(name_or_path, **kwargs)


def _hub_error(spec: str, hub_id: str, cause) -> HubUnavailableError:
    reason = " ".join(str(cause).split())[:300] or type(cause).__name__
    return HubUnavailableError(
        f"--vae {spec}: could not fetch the VAE {hub_id!r} from the Hugging Face hub, nor find it in the local cache "
        f"({reason}). Without network access pass --vae DIR, a local folder holding a saved AutoencoderKL (run "
        f"AutoencoderKL.from_pretrained({hub_id!r}).save_pretrained(DIR) where the hub is reachable), or --vae none "
        "for a pixel-space model"
    )
