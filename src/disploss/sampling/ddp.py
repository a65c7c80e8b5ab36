"""Many samples as PNGs, then one .npz (`disploss sample-ddp MODE`, `torchrun ... sample_ddp.py MODE`):
one .npz in the input format of ADM's TensorFlow evaluator (key arr_0, uint8 (N, H, W, 3), index order).

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2 --num-fid-samples 50000 --ckpt model.pt

Runs under torchrun (NCCL on CUDA, gloo on CPU) or as one plain process.

Where the files go: disploss.sampling.folder (a name that holds every setting that changes the images, one PNG per
image, sample_config.json, the .npz next to the folder).

Randomness: image i draws its initial noise, then its class label (uniform), then (SDE) its Brownian
increments from its own CPU generator seeded by SeedSequence([global_seed, i]); the adaptive ODE methods (dopri5,
the default, bosh3, fehlberg2, adaptive_heun) choose each image's steps from its own error. So the images of a
--global-seed do not depend on the number of processes, the per-process batch size, the device, or which run
made them (the reference seeded each rank instead). Exactly so with per-process batch size 1; with larger
batches float kernels do not give bitwise the same rows for every batch size, which can move a pixel by one level
in rare places (none in the tests). Not so for --step-control batch (torchdiffeq's one step size per batch) and the
torchdiffeq methods dopri8, implicit_adams, fixed_adams and scipy_solver, which couple the images of a batch.

Resuming: a PNG is written atomically, so an existing one is complete. A (re)start lists the missing indices
< --num-fid-samples and removes a stale .npz; every process then claims blocks of 32 indices
(disploss.sampling.claims: a file created with O_EXCL, taken over when its owner died) and samples their missing
images, so no index is sampled twice, neither by the ranks of one launch nor by two launches on the same folder
(two jobs of the same command share the work). When nothing is missing, rank 0 writes the .npz atomically,
once: a launch that finds it written by another launch meanwhile leaves it as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disploss.errors import ConfigError
from disploss.options import at_least, check_options, option
from disploss.runtime import PRECISIONS
from disploss.sampling.claims import BLOCK_SIZE
from disploss.sampling.config import GuidanceConfig, ModelSpec, ODEConfig, SamplerConfig
from disploss.sampling.folder import (
    build_npz,
    folder_name,
    legacy_folder_name,
    missing_indices,
    npz_image_count,
    npz_path_for,
    prepare_folder,
)

DEFAULT_VAE = "ema"  # the reference's sample_ddp.py default (its sample.py uses mse)
STREAM_VERSION = 1  # bump if the per-image draws change, so that old folders are not silently extended


@dataclass(frozen=True)
class SampleDDPConfig:
    """Every setting of `disploss sample-ddp MODE`."""

    sampler: SamplerConfig = option(default_factory=ODEConfig, cli=False)  # the MODE's options
    spec: ModelSpec = option(default_factory=ModelSpec)
    guidance: GuidanceConfig = option(default_factory=lambda: GuidanceConfig(cfg_scale=1.0))
    sample_dir: str = option("samples", "parent folder of the sample folders")
    per_proc_batch_size: int = option(4, "images per model batch on each process", check=at_least(1))
    num_fid_samples: int = option(50_000, "images in the .npz (indices 0 .. N-1)", check=at_least(1))
    global_seed: int = option(0, "seed of the per-image random streams", check=at_least(0))
    precision: str = option(
        "tf32", "fp32; tf32 = fp32 with TF32 matmuls on Ampere+ GPUs (the reference's --tf32, the default); bf16 = "
        "the model under bfloat16 autocast (the solver state and the VAE stay fp32); --no-tf32 is --precision fp32",
        choices=PRECISIONS,
    )  # fmt: skip
    compile: bool = option(False, "torch.compile the model function the solver calls (a warm-up compiles it)")

    def __post_init__(self):
        check_options(self)


# ---------------------------------------------------------------------------------------------------------
# Per-image random streams


def image_seed(global_seed: int, index: int) -> int:
    """The 64-bit seed of image `index`: SeedSequence([global_seed, index]) (well mixed, no collisions between
    nearby seeds and indices)."""
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, dtype=np.uint64)[0])


def image_generator(global_seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` (draws are moved to the device afterwards, so every device agrees)."""
    return torch.Generator().manual_seed(image_seed(global_seed, index))


def draw_inputs(
    generators: list[torch.Generator], latent_shape: tuple[int, int, int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise then class label of each image, each from its own generator.

    Returns:
        z (B, C, h, w) float32 and y (B,) int64, on the CPU.
    """
    z = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])  # (B, C, h, w)
    y = torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in generators])  # (B,)
    return z, y


def per_image_noise(generators: list[torch.Generator]):
    """SDE increments for a batch of B images (or the doubled CFG batch of 2B, both halves the same).

    Returns:
        noise_fn(x) -> standard normals shaped like x, on x's device and dtype.
    """

    def noise_fn(x: torch.Tensor) -> torch.Tensor:
        eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])  # (B, C, h, w)
        if x.shape[0] == 2 * len(generators):
            eps = torch.cat([eps, eps], 0)  # (2B, C, h, w): the unconditional half follows the conditional one
        return eps.to(x)

    return noise_fn


# ---------------------------------------------------------------------------------------------------------
# The sample folder


def sample_config(cfg: SampleDDPConfig, settings: dict, world_size: int) -> dict:
    """The resolved settings recorded in the sample folder (plain JSON)."""
    g = cfg.guidance
    guided = g.cfg_scale > 1.0
    return {
        "stream_version": STREAM_VERSION,
        "model": settings["model"],
        "ckpt": settings["ckpt"],
        "ckpt_name": settings["ckpt_name"],
        "weights": settings["weights"],
        "fingerprint": settings["fingerprint"],
        "image_size": settings["image_size"],
        "num_classes": settings["num_classes"],
        "vae": settings["vae"],
        "path_type": settings["path_type"],
        "prediction": settings["prediction"],
        "sample_eps": settings["sample_eps"],
        "cfg_scale": g.cfg_scale,
        # unused without guidance: recorded as such so that changing it alone does not block a resume
        "guide_channels": ("all" if g.guide_channels is None else g.guide_channels) if guided else "unused",
        "global_seed": cfg.global_seed,
        "pixel_conversion": g.pixel_conversion,
        **cfg.sampler.settings(),
        "per_proc_batch_size": cfg.per_proc_batch_size,
        "num_fid_samples": cfg.num_fid_samples,
        "world_size": world_size,
        "precision": cfg.precision,
        "tf32": cfg.precision != "fp32",
    }


def sample_to_npz(cfg: SampleDDPConfig, info, log: Callable[[str], None] = print) -> Path | None:
    """Sample the missing images of cfg's sample folder on this process's share, then (rank 0) write the .npz.

    Args:
        cfg: the settings.
        info: disploss.distributed.DistInfo of this process (one process: rank 0 of 1).
        log: receives the progress lines (rank 0 only).
    Returns:
        The .npz path on rank 0, None on the other ranks.
    Raises:
        UsageError: bad settings, a folder of other settings, or (rank 0) images missing after the run.
    """
    from tqdm import tqdm

    from disploss import distributed as dist
    from disploss.fileio import check_folder_creatable
    from disploss.imageio import save_png, to_uint8
    from disploss.runtime import set_precision
    from disploss.sampling.claims import Claims
    from disploss.sampling.guidance import cfg_batch, check_guidance, guided_model_fn
    from disploss.sampling.load import describe, load_for_sampling

    started = time.time()
    g = cfg.guidance
    # Before the checkpoint and the VAE are loaded; every process stops if rank 0 cannot write there.
    dist.on_every_rank(lambda: check_folder_creatable(cfg.sample_dir, "--sample-dir") if info.is_main else None)
    set_precision(cfg.precision)
    sm = load_for_sampling(cfg.spec, info.device, default_vae=DEFAULT_VAE, mode=cfg.sampler.mode)
    check_guidance(sm.model, g.guide_channels)
    model_fn, doubled = guided_model_fn(sm.model, g.cfg_scale, g.guide_channels, cfg.precision == "bf16", cfg.compile)
    config = sample_config(cfg, sm.settings, info.world_size)
    folder = Path(cfg.sample_dir) / folder_name(config)
    npz_path = folder.with_name(folder.name + ".npz")  # rank 0 decides (npz_path_for), the others do not write it

    def prepare() -> list[int] | None:  # rank 0; its error stops every process and is printed once
        nonlocal npz_path
        if not info.is_main:
            return None
        log(describe(sm))
        legacy = folder.with_name(legacy_folder_name(config))
        if legacy.is_dir() and not folder.exists():
            log(f"note: {legacy} was made before sample folders were keyed by the weights, so it is not continued "
                f"(nothing tells whose images it holds); rename it to {folder.name} if they are these weights'")  # fmt: skip
        npz_path, larger = npz_path_for(folder, cfg.num_fid_samples)
        if larger is not None:
            log(f"{folder.name}.npz holds {larger} images, more than --num-fid-samples {cfg.num_fid_samples}: it is "
                f"kept, and this run's .npz is {npz_path.name}")  # fmt: skip
        try:
            return prepare_folder(folder, npz_path, config)
        except OSError as err:
            raise ConfigError(f"cannot prepare the sample folder {folder}: {err}") from err

    missing: list[int] = dist.broadcast_object(dist.on_every_rank(prepare))
    if info.is_main:
        done = cfg.num_fid_samples - len(missing)
        log(f"{folder}: {done} of {cfg.num_fid_samples} images present, sampling {len(missing)} on "
            f"{info.world_size} process(es), {cfg.per_proc_batch_size} per batch")  # fmt: skip

    model, latent_shape = sm.model, sm.settings["latent_shape"]
    share = -(-len(missing) // info.world_size)  # about what each process samples (the blocks are claimed)
    bar = tqdm(total=share, disable=not info.is_main, unit="img", desc=f"sampling (rank 0 of {info.world_size})")

    def advance(count: int) -> None:  # rank 0 may sample more than its share (claims): the total grows, never passed
        if bar.n + count > bar.total:
            bar.total = bar.n + count
        bar.update(count)

    def sample_batch(indices: list[int]) -> None:
        generators = [image_generator(cfg.global_seed, i) for i in indices]
        z, y = draw_inputs(generators, latent_shape, model.num_classes)  # (B, C, h, w), (B,)
        z, y = z.to(info.device), y.to(info.device)
        z, y = cfg_batch(z, y, model.num_classes, doubled)  # (2B, ...) when doubled
        with torch.no_grad():
            latents = cfg.sampler(sm.transport, model_fn, z, y, noise_fn=per_image_noise(generators), doubled=doubled)[
                : len(indices)
            ]  # (B, C, h, w)
            images = sm.codec.decode(latents)  # (B, 3, H, W) in [-1, 1]
        for index, pixels in zip(indices, to_uint8(images, g.pixel_conversion)):
            save_png(pixels, folder / f"{index:06d}.png")
        advance(len(indices))

    rank_log = log if info.is_main else (lambda message: None)
    with Claims(folder) as claims:
        sampled = sample_claimed(
            folder, cfg.num_fid_samples, claims, sample_batch, cfg.per_proc_batch_size, info.rank,
            info.world_size, rank_log,
        )  # fmt: skip
        bar.total = bar.n  # ends at its total, also when other processes took part of rank 0's share
        bar.close()
        sampled = int(dist.all_reduce_sum(torch.tensor(float(sampled), device=info.device)))  # NCCL: on the GPU
        dist.barrier()  # every rank has written its share, and no image is missing or claimed
        if not info.is_main:
            return None
        log(f"sampled {sampled} images in this launch")
        return _write_npz_once(folder, cfg.num_fid_samples, npz_path, sm.settings["image_size"], claims, started, log)


POLL_S = 2.0  # seconds between looks at blocks that other processes hold


def sample_claimed(
    folder: Path, num: int, claims, sample_batch: Callable[[list[int]], None], batch_size: int, rank: int = 0,
    world_size: int = 1, log: Callable[[str], None] = print,
) -> int:  # fmt: skip
    """Sample every missing index < num, a claimed block at a time (disploss.sampling.claims), until none is
    missing: blocks that other live processes hold are waited for, stale ones taken over.

    Args:
        folder: the sample folder.
        num: --num-fid-samples.
        claims: this process's `Claims` on the folder.
        sample_batch: samples and writes the PNGs of a list of at most batch_size indices.
        batch_size: --per-proc-batch-size.
        rank, world_size: this process in its launch (its ranks start on different blocks).
        log: progress lines (waiting for others).
    Returns:
        The number of images this process sampled.
    """
    sampled, waiting = 0, False
    while True:
        missing = missing_indices(folder, num)  # one listing per pass over the folder
        if not missing:
            return sampled
        blocks = sorted({i // BLOCK_SIZE for i in missing})
        first = rank * len(blocks) // world_size
        pending = iter(blocks[first:] + blocks[:first])
        progressed = False
        while True:
            held, todo = [], []
            for block in pending:
                if claims.take(block):
                    held.append(block)
                    todo += _claimed_todo(folder, block, num)
                    if len(todo) >= batch_size:
                        break
            if not held:
                break
            try:
                for start in range(0, len(todo), batch_size):
                    sample_batch(todo[start : start + batch_size])
                    sampled += len(todo[start : start + batch_size])
            finally:
                for block in held:
                    claims.release(block)
            progressed = True
        if not progressed:  # every missing image is in a block another live process holds
            if not waiting:
                holders = sorted({h for b in blocks if (h := claims.holder(b)) is not None})
                log(f"waiting for {len(missing)} images claimed by other processes ({', '.join(holders[:3])})")
                waiting = True
            time.sleep(POLL_S)


def _claimed_todo(folder: Path, block: int, num: int) -> list[int]:
    # The block's missing indices, looked up after the claim (another process may have finished them just
    # before); the temporary files of a process killed in this block go first.
    indices = range(block * BLOCK_SIZE, min((block + 1) * BLOCK_SIZE, num))
    for i in indices:
        for tmp in folder.glob(f".{i:06d}.png.*.tmp"):
            tmp.unlink(missing_ok=True)
    return [i for i in indices if not (folder / f"{i:06d}.png").exists()]


def _write_npz_once(
    folder: Path, num: int, npz_path: Path, image_size: int, claims, started: float, log: Callable[[str], None]
) -> Path:
    """Rank 0: write the .npz, unless another launch on this folder wrote it while this one ran (the .npz claim
    makes sure two launches never write it at once)."""
    while not claims.take("npz"):
        time.sleep(POLL_S)
    try:
        # Holding the .npz claim, no other launch writes it: what a killed write left beside it, and the claims of
        # processes killed after their last image (their blocks are never claimed again), can go.
        for tmp in npz_path.parent.glob(f".{npz_path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        claims.remove_stale()
        if npz_path.exists() and npz_path.stat().st_mtime >= started and npz_image_count(npz_path) == num:
            log(f"{npz_path} was written by another launch on this folder meanwhile [{num} images]")
            return npz_path
        still_missing = missing_indices(folder, num)
        if still_missing:
            raise ConfigError(
                f"{len(still_missing)} images are missing in {folder} (first: {still_missing[0]:06d}.png); rerun "
                "the same command to sample them; no .npz was written"
            )
        shape = build_npz(folder, num, npz_path, image_size)
    finally:
        claims.release("npz")
    log(f"Saved .npz file to {npz_path} [shape={shape}].")
    return npz_path
