"""Sample grids: `disploss sample` (the reference's sample.py) and the grids written during training.

`disploss sample`, as the reference: 8 images of the ImageNet classes 207, 360, 387, 974, 88, 979, 417, 279, initial
noise torch.randn on the device after torch.manual_seed(seed), classifier-free guidance on a doubled batch [x; x]
with labels [y; null], guidance on the first 3 channels, a 2 x 4 grid PNG (2 px black padding, as torchvision's
make_grid).

Differences, all deliberate: a model with another number of classes gets one image per class (up to 10) in two
rows, and images under 64 px are enlarged (each pixel drawn as a square) so that the grid can be seen; the grid
goes to samples/sample.png (git-ignored) rather than the working folder; with cfg_scale 1 the batch is not doubled
(half the model calls; the SDE draws its increments as the doubled batch would, so the samples are the same up to
float rounding); checkpoints load with weights_only=True; the model, image size, classes, VAE and transport come
from our checkpoints' stored training arguments unless given (a contradicting flag is an error); without --ckpt
nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from disploss.errors import ConfigError
from disploss.options import at_least, check_options, option
from disploss.runtime import PRECISIONS
from disploss.sampling.config import (
    GuidanceConfig,
    MeanFlowConfig,
    ModelSpec,
    ODEConfig,
    SamplerConfig,
    parse_class_labels,
)

DEFAULT_VAE = "mse"  # the reference's sample.py default (its train.py and sample_ddp.py default to ema)


@dataclass(frozen=True)
class SampleConfig:
    """Every setting of `disploss sample MODE`."""

    sampler: SamplerConfig = option(default_factory=ODEConfig, cli=False)  # the MODE's options
    spec: ModelSpec = option(default_factory=ModelSpec)
    guidance: GuidanceConfig = option(default_factory=GuidanceConfig)
    seed: int = option(0, "torch.manual_seed before drawing the initial noise")
    class_labels: tuple[int, ...] | None = option(
        None, "labels of the images (default: the reference's 207,360,387,974,88,979,417,279 for 1000 classes, else "
        "one image per class, up to 10: 0,1,...)", metavar="L1,L2,...", parse=parse_class_labels,
    )  # fmt: skip
    out: str = option("samples/sample.png", "grid PNG, written atomically (the reference wrote sample.png)")
    nrow: int | None = option(None, "images per grid row (default: 4, i.e. 2 rows of 4, for 8 images as the "
                              "reference; else half the images, rounded up)", check=at_least(1))  # fmt: skip
    precision: str = option(
        "tf32", "fp32; tf32 = fp32 with TF32 matmuls on Ampere+ GPUs (the reference); bf16 = the model under bfloat16 "
        "autocast (the solver state and the VAE stay fp32)", choices=PRECISIONS,
    )  # fmt: skip
    compile: bool = option(False, "torch.compile the model function the solver calls (worth it for many images)")

    def __post_init__(self):
        check_options(self)


def default_class_labels(num_classes: int) -> list[int]:
    """The reference's 8 ImageNet classes for 1000 classes; else one label per class, up to 10: 0, 1, ..."""
    from disploss.sampling.load import REFERENCE_CLASS_LABELS

    if num_classes == 1000:
        return list(REFERENCE_CLASS_LABELS)
    return list(range(min(num_classes, 10)))


def sample_grid(cfg: SampleConfig, log: Callable[[str], None] = print) -> Path:
    """Sample the grid of `cfg` and write it to cfg.out; returns the path.

    Raises:
        UsageError: a missing or mismatching checkpoint, bad labels, an unavailable device or VAE.
    """
    from disploss.fileio import check_output_file
    from disploss.imageio import save_grid, to_uint8
    from disploss.runtime import resolve_device, set_precision
    from disploss.sampling.guidance import as_doubled_noise, cfg_batch, check_guidance, guided_model_fn
    from disploss.sampling.load import describe, load_for_sampling

    g = cfg.guidance
    check_output_file(cfg.out, "--out", {"checkpoint (--ckpt)": cfg.spec.ckpt})  # before any sampling
    device = resolve_device(g.device)
    set_precision(cfg.precision)
    sm = load_for_sampling(cfg.spec, device, default_vae=DEFAULT_VAE, mode=cfg.sampler.mode)
    model = sm.model
    check_guidance(model, g.guide_channels)
    labels = list(cfg.class_labels) if cfg.class_labels is not None else default_class_labels(model.num_classes)
    if max(labels) >= model.num_classes:
        raise ConfigError(
            f"--class-labels {','.join(map(str, labels))}: labels must lie in [0, {model.num_classes - 1}] "
            f"(the model has {model.num_classes} classes)"
        )
    model_fn, doubled = guided_model_fn(model, g.cfg_scale, g.guide_channels, cfg.precision == "bf16", cfg.compile)
    log(describe(sm))

    n = len(labels)
    torch.manual_seed(cfg.seed)
    z = torch.randn(n, *sm.settings["latent_shape"], device=device)  # (B, C, h, w)
    y = torch.tensor(labels, device=device)
    z, y = cfg_batch(z, y, model.num_classes, doubled)
    start = time.time()
    with torch.no_grad():
        noise_fn = None if doubled else as_doubled_noise
        latents = cfg.sampler(sm.transport, model_fn, z, y, noise_fn=noise_fn, doubled=doubled)[:n]  # the guided half
        images = sm.codec.decode(latents)  # (B, 3, H, W) in [-1, 1]
    log(f"Sampling took {time.time() - start:.2f} seconds.")
    pixels = to_uint8(images, g.pixel_conversion)  # (B, H, W, 3) uint8
    nrow = cfg.nrow or (4 if n == 8 else -(-n // 2))
    zoom = max(1, 64 // pixels.shape[1])  # tiny images (the digits: 8-16 px) enlarged to be seen
    save_grid(pixels, cfg.out, nrow=nrow, zoom=zoom)
    rows = -(-n // nrow)
    log(
        f"wrote {cfg.out}: {rows} x {min(n, nrow)} grid of {pixels.shape[1]}x{pixels.shape[2]} images"
        f"{f' (drawn {zoom}x larger)' if zoom > 1 else ''}, labels {','.join(map(str, labels))}, {cfg.sampler.mode} "
        f"{cfg.sampler.sampling_method}, cfg {g.cfg_scale}"
    )
    return Path(cfg.out)


# -- during training ----------------------------------------------------------------------------------------------
def grid_labels(num_classes: int) -> tuple[list[int], int]:
    """Classes of the in-training grid (a row per class, up to 10 rows) and samples per row."""
    rows = min(num_classes, 10)
    classes = sorted({round(i * (num_classes - 1) / max(rows - 1, 1)) for i in range(rows)})
    return classes, (8 if num_classes <= 10 else 4)


def training_grid_sampler(model: torch.nn.Module, sample_steps: int, cfg_scale: float):
    """The sampler of the in-training grids, its guidance scale and a one-line description of both: the Heun ODE
    with `sample_steps` grid points at `cfg_scale`; a MeanFlow model (meanflow=True) in one step without guidance
    at sampling (it is folded into its training target), as `sample.py MeanFlow` draws it.

    Returns:
        (sampler config, guidance scale, description).
    """
    if getattr(model, "meanflow", False):
        sampler = MeanFlowConfig(num_sampling_steps=1)
        return sampler, 1.0, f"{sampler.describe()}, no guidance at sampling (folded into the training target)"
    sampler = ODEConfig(sampling_method="heun2", num_sampling_steps=sample_steps)
    calls = 2 * (sample_steps - 1)
    return sampler, cfg_scale, f"Heun ODE with {sample_steps} grid points ({calls} model calls), cfg {cfg_scale}"


@torch.no_grad()
def training_grid(
    model: torch.nn.Module, codec, transport, *, num_classes: int, cfg_scale: float, sample_steps: int,
    seed: int, path: Path, device: torch.device,
) -> Path:  # fmt: skip
    """A class-conditional grid from `model` (the EMA, or the raw weights of a run with --sample-weights model;
    sampled in eval mode, its mode restored after): fixed noise (CPU generator seeded with `seed`), the sampler of
    `training_grid_sampler`, guidance on the first 3 channels, a row per class; tiny images enlarged."""
    from disploss.imageio import save_grid, to_uint8
    from disploss.sampling.guidance import cfg_batch, guided_model_fn

    classes, per_row = grid_labels(num_classes)
    y = torch.tensor([c for c in classes for _ in range(per_row)], device=device)
    gen = torch.Generator().manual_seed(seed)
    shape = (len(y), model.in_channels, model.input_size, model.input_size)
    z = torch.randn(shape, generator=gen).to(device)
    sampler, cfg_scale, _ = training_grid_sampler(model, sample_steps, cfg_scale)
    was_training = model.training
    model.eval()  # no label dropout
    try:
        model_fn, doubled = guided_model_fn(model, cfg_scale, guide_channels=3)
        zz, yy = cfg_batch(z, y, num_classes, doubled)
        out = sampler(transport, model_fn, zz, yy, doubled=doubled)[: len(y)]
    finally:
        model.train(was_training)
    images = to_uint8(codec.decode(out), mode="round")
    save_grid(images, path, nrow=per_row, zoom=max(1, 64 // images.shape[1]))  # tiny images: enlarged to see
    return path
