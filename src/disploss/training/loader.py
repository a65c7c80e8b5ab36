"""The training data: the dataset and codec of a TrainConfig, and a loader whose order and per-sample randomness
are a function of (seed, epoch, index) only, so a resumed run continues exactly where the checkpoint left off."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from disploss.errors import ConfigError
from disploss.training.config import DIGITS, TrainConfig


@dataclass
class TrainData:
    """The dataset, the codec that encodes its items (None when the dataset yields latents), the model's input
    geometry (channels, side), the codec that decodes the sample grids (None without grids), and warnings for the
    run's log (settings that work but are likely mistakes)."""

    dataset: torch.utils.data.Dataset
    codec: object | None
    in_channels: int
    input_size: int
    grid_codec: object | None = None
    notes: list[str] = field(default_factory=list)


def _notes(cfg: TrainConfig, data_classes: int) -> list[str]:
    notes = []
    if data_classes < cfg.num_classes:
        notes.append(
            f"the data has {data_classes} classes but --num-classes is {cfg.num_classes}: {cfg.num_classes - data_classes}"
            f" class embeddings are never trained and the in-training sample grids show classes up to "
            f"{cfg.num_classes - 1}; pass --num-classes {data_classes} unless the model is meant for more classes"
        )
    cpus = torch._utils.cpu_count() or 1  # what torch's own check uses (the CPUs this process may run on)
    if cfg.num_workers > cpus:
        notes.append(
            f"--num-workers {cfg.num_workers} (per process) is more than the {cpus} CPU(s) this process may use: the "
            f"workers share them; --num-workers {cpus} or fewer avoids the contention"
        )
    return notes


def build_dataset(cfg: TrainConfig) -> torch.utils.data.Dataset:
    """The dataset of a training run (the folder is listed and checked; nothing is decoded or downloaded).

    Raises:
        UsageError: a missing or malformed data folder or latent cache, or one that contradicts the flags.
    """
    from disploss.data import DigitsDataset, ImageFolderDataset, LatentsDataset

    if cfg.latents is not None:
        dataset = LatentsDataset(cfg.latents, flip=not cfg.no_flip)
        if dataset.num_classes > cfg.num_classes:
            raise ConfigError(
                f"the latent cache {cfg.latents} has {dataset.num_classes} classes but --num-classes is {cfg.num_classes}"
            )
        if dataset.image_size != cfg.image_size:
            raise ConfigError(
                f"the latent cache {cfg.latents} was made at --image-size {dataset.image_size}, not {cfg.image_size}"
            )
        return dataset
    if cfg.data_path == DIGITS:
        if cfg.num_classes < 10:
            raise ConfigError(f"the digits have 10 classes but --num-classes is {cfg.num_classes}")
        return DigitsDataset(image_size=cfg.image_size, channels=3)
    return ImageFolderDataset(
        cfg.data_path, cfg.image_size, num_classes=cfg.num_classes, on_bad_image=cfg.on_bad_image, flip=not cfg.no_flip
    )


def build_data(cfg: TrainConfig, device: torch.device, dataset: torch.utils.data.Dataset | None = None) -> TrainData:
    """Dataset, latent codec and the model's input geometry of a training run.

    Args:
        cfg: the run's settings.
        device: where the VAE runs.
        dataset: `build_dataset(cfg)` when already built (by the pre-flight checks, before the VAE is fetched).
    """
    from disploss.data.vae import load_vae
    from disploss.errors import HubUnavailableError

    dataset = build_dataset(cfg) if dataset is None else dataset
    grids = cfg.sample_every > 0
    try:
        if cfg.latents is not None:  # the grids decode with the VAE that made the cache
            c, h, _ = dataset.latent_shape
            return TrainData(
                dataset, None, c, h, load_vae(dataset.vae, device) if grids else None, _notes(cfg, dataset.num_classes)
            )
        codec = load_vae(cfg.vae, device)
    except HubUnavailableError as err:
        hint = "or pass --sample-every 0 (the sample grids need the VAE)" if cfg.latents else (
            "or train from cached latents with --latents DIR (disploss extract-latents, run where the VAE is) and "
            "--sample-every 0"
        )  # fmt: skip
        raise HubUnavailableError(f"{err}; {hint}") from err
    latent_size = codec.latent_size(cfg.image_size)
    classes = 10 if cfg.data_path == DIGITS else len(dataset.classes)
    notes = _notes(cfg, classes)
    return TrainData(dataset, codec, codec.latent_channels, latent_size, codec if grids else None, notes)


class EpochSeeded(torch.utils.data.Dataset):
    """Per-sample randomness (flips, posterior draws) as a function of (seed, epoch, index) only.

    Items are requested as (epoch, index); the wrapped dataset runs under a forked CPU RNG seeded from
    those, so a resumed run, any number of loader workers and the main process's own stream all stay exact.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class ResumableSampler(torch.utils.data.Sampler):
    """The reference's DistributedSampler order (shuffle, seed, set_epoch), started at any batch.

    Yields (epoch, index) keys for EpochSeeded.
    """

    def __init__(self, n: int, world_size: int, rank: int, seed: int):
        self.inner = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.epoch, self.start = epoch, start_index

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        for index in list(self.inner)[self.start :]:
            yield (self.epoch, index)


def make_loader(
    dataset, local_batch: int, world_size: int, rank: int, seed: int, num_workers: int, device: torch.device
) -> tuple[torch.utils.data.DataLoader, ResumableSampler]:
    """The training loader and its sampler (call `sampler.set_position(epoch, start)` before each pass)."""
    sampler = ResumableSampler(len(dataset), world_size, rank, seed)
    # More workers than CPUs: build_data's note says it once; torch would warn at every epoch's iterator.
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    loader = torch.utils.data.DataLoader(
        EpochSeeded(dataset, seed), batch_size=local_batch, sampler=sampler, num_workers=num_workers,
        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # the loader's own seed draw must not consume the training RNG stream
    )  # fmt: skip
    return loader, sampler


def steps_per_epoch(num_items: int, world_size: int, local_batch: int) -> int:
    """Full local batches per epoch (DistributedSampler pads to a multiple of the world size); a one-line error
    when the dataset holds less than one local batch per process."""
    steps = -(-num_items // world_size) // local_batch
    if steps == 0:
        raise ConfigError(
            f"the dataset has {num_items} items: fewer than one local batch of {local_batch} per process "
            "(lower --global-batch-size)"
        )
    return steps
