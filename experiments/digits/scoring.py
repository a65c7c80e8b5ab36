"""Sampling and scoring of the digits experiment: one fixed set of labels and initial noise for every arm, seed and
checkpoint; images from the EMA weights with a fixed-step Heun ODE; feature-FID, precision, recall and class
accuracy in the digit classifier's feature space; a per-run cache of the samples of each checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from disploss.errors import ConfigError
from experiments.digits.config import DigitsConfig, SamplerSpec


def sample_plan(
    num_samples: int, noise_seed: int, image_size: int, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class labels and initial noise every run and checkpoint samples from.

    Labels cycle 0..9 (class-balanced; exactly so when num_samples is a multiple of 10); the noise is drawn from
    a CPU generator seeded with noise_seed alone, so it does not depend on the arm, the seed or the step.

    Returns:
        (labels int64 (N,), noise float32 (N, C, S, S)).
    """
    labels = torch.arange(num_samples) % 10
    gen = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn((num_samples, channels, image_size, image_size), generator=gen)  # N C S S
    return labels, noise


@torch.no_grad()
def sample_checkpoint(
    path: str | os.PathLike,
    labels: torch.Tensor,
    noise: torch.Tensor,
    sample_steps: int,
    cfg_scale: float,
    device: str = "cpu",
    batch_size: int = 500,
    spec: SamplerSpec | None = None,
) -> np.ndarray:
    """Images from the EMA weights of a pixel-space training checkpoint, Heun ODE with fixed steps.

    Args:
        path: a checkpoint written by disploss.training.train (its stored 'args' give the model and transport).
        labels: (N,) classes; noise: (N, C, S, S) initial states.
        sample_steps: points of the time grid (2 * (sample_steps - 1) model calls).
        cfg_scale: classifier-free guidance scale (1: none), guidance on the first 3 channels as the reference.
        spec: another sampler (SamplerSpec: euler / heun with its model calls) instead of Heun with sample_steps; a
            MeanFlow checkpoint is sampled in spec.nfe (default 1) steps, without guidance (folded into training).
    Returns:
        uint8 (N, S, S, 3).
    """
    from disploss.checkpoint import build_sit_from_checkpoint, load_checkpoint
    from disploss.imageio import to_uint8
    from disploss.sampling.guidance import cfg_batch, guided_model_fn
    from disploss.transport import create_transport

    state = load_checkpoint(path)
    args = state["args"]
    if args.get("vae") != "none":
        raise ConfigError(
            f"{path}: the digits experiment samples pixel-space models (vae none), not vae {args.get('vae')}"
        )
    model, _ = build_sit_from_checkpoint(
        state, model_name=args["model"], image_size=args["image_size"], num_classes=args["num_classes"],
        vae_factor=1, prefer="ema",
    )  # fmt: skip
    model = model.to(device)
    transport = create_transport(
        args["path_type"], args["prediction"], args["loss_weight"], args["train_eps"], args["sample_eps"]
    )
    sampler = _sampler(spec, sample_steps, model.meanflow)
    model_fn, doubled = guided_model_fn(model, 1.0 if model.meanflow else cfg_scale, guide_channels=3)
    out = []
    for i in range(0, len(labels), batch_size):
        z, y = noise[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        zz, yy = cfg_batch(z, y, args["num_classes"], doubled)
        x = sampler(transport, model_fn, zz, yy, doubled=doubled)[: len(y)]  # n C S S
        out.append(to_uint8(x, mode="round"))
    return np.concatenate(out)


def _sampler(spec: SamplerSpec | None, sample_steps: int, meanflow: bool):
    # spec -> the sampler config (disploss.sampling.config) that makes exactly spec.nfe model calls
    from disploss.sampling.config import MeanFlowConfig, ODEConfig

    if meanflow:
        return MeanFlowConfig(num_sampling_steps=spec.nfe if spec is not None else 1)
    if spec is not None and spec.kind == "meanflow":
        raise ConfigError(f"sampler {spec.name} needs a MeanFlow checkpoint")
    method, steps = ("heun2", sample_steps) if spec is None else (
        ("euler", spec.nfe + 1) if spec.kind == "euler" else ("heun2", spec.nfe // 2 + 1)
    )  # fmt: skip
    return ODEConfig(sampling_method=method, num_sampling_steps=steps)


def score(classifier, ref_features: np.ndarray, ref_stats, images: np.ndarray, labels: np.ndarray) -> dict:
    """feature-FID, precision, recall and class accuracy of uint8 images against the reference features."""
    from disploss.evaluation.metrics import compute_statistics, frechet_distance, precision_recall
    from experiments.digits.classifier import classify

    feats, preds = classify(classifier, images)
    mu, sigma = compute_statistics(feats)
    fid = frechet_distance(mu, sigma, *ref_stats)
    precision, recall = precision_recall(ref_features, feats, k=3)
    return {
        "fid": fid,
        "precision": precision,
        "recall": recall,
        "class_accuracy": float((preds == np.asarray(labels)).mean()),
    }


def _sample_cache_key(cfg: DigitsConfig, spec: SamplerSpec | None = None) -> str:
    settings = {
        "num_samples": cfg.num_samples,
        "noise_seed": cfg.noise_seed,
        "sample_steps": cfg.sample_steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": "heun2",
        "weights": "ema",
        "pixels": "round",
        **({"spec": spec.name} if spec is not None else {}),  # None: the key of the experiment's own Heun sampler
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def samples_for(
    cfg: DigitsConfig, run_dir: Path, step: int, labels, noise, spec: SamplerSpec | None = None
) -> tuple[np.ndarray, float, float]:
    """Samples of one checkpoint (with `spec`'s sampler when given), from the run's sample cache when it has them.

    Returns:
        (uint8 images, wall s, CPU s): the time of drawing them, recorded beside the cache, so a rerun that
        reuses them still reports what they cost.
    """
    from disploss.fileio import atomic_write, atomic_write_json

    cache = run_dir / "experiment_samples" / _sample_cache_key(cfg, spec) / f"{step:07d}.npy"
    cost_file = cache.with_suffix(".json")
    if cache.is_file():
        cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
        return np.load(cache), float(cost["wall_s"]), float(cost["cpu_s"])
    from disploss.checkpoint import checkpoint_path

    t0, c0 = time.time(), cpu_seconds()
    images = sample_checkpoint(
        checkpoint_path(run_dir / "checkpoints", step), labels, noise, cfg.sample_steps, cfg.cfg_scale, cfg.device,
        spec=spec,
    )  # fmt: skip
    wall, cpu = time.time() - t0, cpu_seconds() - c0

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, images)

    atomic_write(cache, write)
    atomic_write_json(cost_file, {"wall_s": wall, "cpu_s": cpu})
    return images, wall, cpu


def cpu_seconds() -> float:
    """User + system time of this process, all threads (torch's intra-op pool included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
