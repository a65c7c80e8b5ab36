"""Cheap checks first: what a training run can get wrong is found before anything costs time or leaves files.

`preflight` runs before the VAE is fetched and before a run folder is created (TrainConfig checked its own values
when it was built): the data folder and its size (at least one local batch per process), the number of processes,
the input geometry the model needs when it is known without the VAE (pixels, the two hub VAEs, a local VAE folder,
a latent cache), the wandb / tensorboard setup, and the output folder (writable, room for two checkpoints). `train()` runs it on every process at once
(`disploss.distributed.on_every_rank`), so under torchrun a mistake is reported once.
"""

from __future__ import annotations

import torch

from disploss.errors import ConfigError
from disploss.training.config import TrainConfig


def preflight(cfg: TrainConfig, world: int, is_main: bool) -> torch.utils.data.Dataset:
    """Check everything that needs neither the VAE nor a run folder; returns the dataset (listed, not decoded).

    Args:
        cfg: the run's settings.
        world: number of processes.
        is_main: rank 0, which alone writes the run folder and logs to wandb / tensorboard.
    Raises:
        UsageError: naming the flag, the folder or the environment variable to fix.
    """
    from disploss.models import create_model, parse_model_name
    from disploss.training.loader import build_dataset, steps_per_epoch
    from disploss.training.run.folder import checkpoint_size_bytes
    from disploss.training.run.log import check_logging_setup

    if cfg.data_path is None and cfg.latents is None:
        raise ConfigError("--data-path is required (or --latents DIR to train from cached latents)")
    if cfg.global_batch_size % world:
        raise ConfigError(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by the number of processes {world}"
        )
    check_micro_batch(cfg, world)
    dataset = build_dataset(cfg)
    steps_per_epoch(len(dataset), world, cfg.global_batch_size // world)
    geometry = input_geometry(cfg, dataset)
    if geometry is not None:
        check_patch(cfg, geometry[1], parse_model_name(cfg.model)[3])
    if is_main:
        check_logging_setup(wandb=cfg.wandb, tensorboard=cfg.tensorboard)
        need = 0
        # A fresh run's checkpoint size, from a model that holds no memory; a resumed run is checked against its
        # checkpoint's real size once it is found (training/run/folder.py, prepare_run_dir).
        if geometry is not None and cfg.ckpt is None:
            with torch.device("meta"):
                model = create_model(
                    cfg.model, input_size=geometry[1], in_channels=geometry[0], num_classes=cfg.num_classes
                )
            need = 2 * checkpoint_size_bytes(model)  # the last checkpoint and the one being written beside it
        check_output_folder(cfg.results_dir, need)
    return dataset


def check_micro_batch(cfg: TrainConfig, world: int) -> None:
    """The global batch splits into processes x --grad-accum-steps micro-batches, and with --disp each micro-batch
    gives the dispersive term at least 2 samples (of 1 it is a constant without gradient), or --disp-gather does
    over several processes.

    Raises:
        ConfigError: naming --global-batch-size, --grad-accum-steps and --disp-gather.
    """
    k, batch = cfg.grad_accum_steps, cfg.global_batch_size
    if batch % (world * k):
        raise ConfigError(
            f"--global-batch-size {batch} is not divisible by {world} process(es) x --grad-accum-steps {k} (the "
            "global batch is processes x K x the micro-batch)"
        )
    micro = batch // (world * k)
    term_batch = micro * world if cfg.disp_gather else micro
    if cfg.disp and term_batch < 2:
        gather = (
            "" if cfg.disp_gather or world == 1 else ", or --disp-gather (the term over the processes' micro-batches)"
        )
        raise ConfigError(
            f"--disp with --global-batch-size {batch} over {world} process(es) x --grad-accum-steps {k} gives the "
            f"dispersive term micro-batches of {term_batch} sample(s), a constant without gradient: use "
            f"--global-batch-size {2 * world * k} or more{', fewer --grad-accum-steps' if k > 1 else ''}{gather}"
        )


def check_output_folder(results_dir: str, min_free_bytes: int) -> None:
    """--results-dir could be created and written into, with room for `min_free_bytes`; nothing is created.

    Raises:
        OutputPathError: naming the folder and what is in the way.
        InsufficientDiskSpaceError: naming the free and the needed bytes.
    """
    import shutil

    from disploss.fileio import check_folder_creatable
    from disploss.training.run.folder import InsufficientDiskSpaceError, format_bytes

    anchor = check_folder_creatable(results_dir, "--results-dir")
    free = shutil.disk_usage(anchor).free
    if free < min_free_bytes:
        raise InsufficientDiskSpaceError(
            f"not enough free disk space in {results_dir}: {free} bytes free ({format_bytes(free)}), "
            f"{int(min_free_bytes)} bytes needed for two checkpoints ({format_bytes(min_free_bytes)}); free some "
            "space or choose another --results-dir"
        )


def input_geometry(cfg: TrainConfig, dataset) -> tuple[int, int] | None:
    """(channels, side) of the model's input, or None when only a hub VAE other than ema / mse could tell.

    Raises:
        ConfigError: --image-size is not divisible by the VAE's downsampling factor.
    """
    from disploss.data.vae import latent_side, vae_geometry

    if cfg.latents is not None:
        c, h, _ = dataset.latent_shape
        return c, h
    geometry = vae_geometry(cfg.vae)
    if geometry is None:
        return None
    channels, factor = geometry
    return channels, latent_side(cfg.image_size, factor, cfg.vae)


def check_patch(cfg: TrainConfig, input_size: int, patch: int) -> None:
    """ConfigError unless the patch size divides the input side (naming the valid --image-size values nearby)."""
    if input_size % patch:
        factor = cfg.image_size // input_size
        unit = factor * patch
        near = " or ".join(str(k * unit) for k in (cfg.image_size // unit, cfg.image_size // unit + 1) if k > 0)
        raise ConfigError(
            f"--image-size {cfg.image_size} gives latents of side {input_size} (VAE factor {factor}), which the patch "
            f"size {patch} of --model {cfg.model} does not divide; valid sizes nearby: {near}"
        )
