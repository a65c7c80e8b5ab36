"""A small digit classifier whose penultimate layer is the feature space of `disploss experiment digits`.

Inception-v3 (the field's FID network) knows nothing of 8x8 handwritten digits; a CNN trained on the bundled
digits does. It is trained once on the "train" split (disploss.data.split_indices) at the resolution of the
generated images, its held-out accuracy is measured on the "holdout" split, and its weights are cached in a
folder keyed by every setting, so a rerun (or another arm of the experiment) reuses exactly the same network.

Input convention: uint8 images (N, H, W, C) as written by disploss.imageio.to_uint8 or disploss.data.digits_arrays;
the channels are averaged to one grey channel (the digits are grey; a generator's three channels may differ
slightly) and mapped to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from disploss.errors import ConfigError

CACHE_FORMAT = "disploss-digit-classifier-v1"
NUM_CLASSES = 10


@dataclass(frozen=True)
class ClassifierConfig:
    """Every setting that shapes the classifier; all of them key its cache file.

    Attributes:
        image_size: side H = W of the digits it reads (that of the generated images).
        width: channels of the first convolution (the second has 2 * width).
        feature_dim: width D of the penultimate layer, the feature space.
        epochs: passes over the train split.
        batch_size: images per step.
        lr: Adam learning rate (cosine-decayed to 0 over the epochs).
        weight_decay: AdamW weight decay.
        seed: seed of the initialisation and the batch order.
        holdout_fraction, split_seed: the train / holdout split (disploss.data.split_indices).
    """

    image_size: int = 8
    width: int = 32
    feature_dim: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    holdout_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        for name in ("image_size", "width", "feature_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ClassifierConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"ClassifierConfig.lr must be positive, got {self.lr}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"ClassifierConfig.holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")

    def key(self) -> str:
        """A short hash of every setting (and the cache format): the cache file's name."""
        text = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class DigitClassifier(nn.Module):
    """conv3x3 - SiLU - conv3x3 - SiLU - avgpool to 4x4 - linear (features) - SiLU - linear (logits).

    SiLU, not ReLU, in the feature layer: no unit is ever exactly zero, so the features' covariance has no
    dead (all-zero) dimensions that would make the Frechet distance's covariance product singular.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.fc = nn.Linear(2 * w * 16, config.feature_dim)
        self.act = nn.SiLU()
        self.head = nn.Linear(config.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features. x (N, 1, H, W) in [-1, 1] -> (N, D)."""
        h = self.conv(x).flatten(1)  # N (2w * 16)
        return self.act(self.fc(h))  # N D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. x (N, 1, H, W) in [-1, 1] -> (N, 10)."""
        return self.head(self.features(x))


def images_to_input(images: np.ndarray, image_size: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, 1, H, W) in [-1, 1], the channels averaged.

    Args:
        images: uint8 images, C = 1 or 3.
        image_size: if given, H and W must equal it (the classifier reads one resolution only).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ConfigError(f"expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise ConfigError(
            f"images are {images.shape[1]}x{images.shape[2]} but the classifier reads {image_size}x{image_size}"
        )
    x = torch.from_numpy(images).float().mean(dim=3, keepdim=True)  # N H W 1
    return (x / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()  # N 1 H W


@torch.no_grad()
def classify(model: DigitClassifier, images: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Features and predicted classes of uint8 images.

    Args:
        model: a trained DigitClassifier.
        images: uint8 (N, H, W, C) at the classifier's image_size.
    Returns:
        (features float64 (N, D), predictions int64 (N,)).
    """
    x = images_to_input(images, model.config.image_size)
    was_training = model.training
    model.eval()
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size])  # n D
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy().astype(np.int64)


def extract_features(model: DigitClassifier, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Penultimate-layer features of uint8 images (N, H, W, C) -> float64 (N, D)."""
    return classify(model, images, batch_size)[0]


def split_arrays(config: ClassifierConfig, split: str, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The real digits of one split at the classifier's resolution.

    Args:
        split: "train", "holdout" or "all".
        channels: of the returned images (3: as the generator's samples).
    Returns:
        (uint8 (N, H, W, channels), labels int64 (N,)).
    """
    from disploss.data import digits_arrays, split_indices

    if split not in ("train", "holdout", "all"):
        raise ConfigError(f"unknown split {split!r}; valid choices: train, holdout, all")
    x, y = digits_arrays(config.image_size, channels)
    if split == "all":
        return x, y
    train, holdout = split_indices(len(y), config.holdout_fraction, config.split_seed)
    keep = train if split == "train" else holdout
    return x[keep], y[keep]


def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose predicted class is the label."""
    return float((classify(model, images)[1] == np.asarray(labels)).mean())


def train_classifier(config: ClassifierConfig) -> tuple[DigitClassifier, dict]:
    """Train on the train split (deterministic for a config; the global RNG is left untouched).

    Returns:
        (model in eval mode, {"train_accuracy", "holdout_accuracy", "num_train", "num_holdout"}).
    """
    x_train, y_train = split_arrays(config, "train")
    x_hold, y_hold = split_arrays(config, "holdout")
    inputs, targets = images_to_input(x_train), torch.from_numpy(y_train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DigitClassifier(config)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = -(-len(inputs) // config.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(inputs))
            for i in range(0, len(inputs), config.batch_size):
                idx = order[i : i + config.batch_size]
                loss = nn.functional.cross_entropy(model(inputs[idx]), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval().requires_grad_(False)
    info = {
        "train_accuracy": accuracy(model, x_train, y_train),
        "holdout_accuracy": accuracy(model, x_hold, y_hold),
        "num_train": int(len(y_train)),
        "num_holdout": int(len(y_hold)),
    }
    return model, info


def default_cache_dir() -> Path:
    """$DISPLOSS_CACHE, else $XDG_CACHE_HOME/disploss, else ~/.cache/disploss."""
    if os.environ.get("DISPLOSS_CACHE"):
        return Path(os.environ["DISPLOSS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "disploss"


def cache_path(config: ClassifierConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the weights of `config` are cached: {cache_dir}/digit-classifier-{key}.pt."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"digit-classifier-{config.key()}.pt"


def load_or_train(config: ClassifierConfig, cache_dir: str | os.PathLike | None = None) -> tuple[DigitClassifier, dict]:
    """The cached classifier of `config`, trained and cached first if absent (or unreadable).

    Args:
        config: the classifier's settings.
        cache_dir: cache folder (default: `default_cache_dir()`).
    Returns:
        (model in eval mode, info): info holds train_accuracy, holdout_accuracy, num_train, num_holdout,
        path (the cache file), cached (True when loaded rather than trained now), key and config.
    """
    from disploss.fileio import atomic_write

    path = cache_path(config, cache_dir)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
            # a truncated or foreign file: retrain over it, but say so
            print(f"digit classifier cache {path} is unreadable ({type(err).__name__}: {err}); retraining")
            blob = None
        if blob is not None and blob.get("format") == CACHE_FORMAT and blob.get("config") == dataclasses.asdict(config):
            model = DigitClassifier(config)
            model.load_state_dict(blob["state_dict"], strict=True)
            model.eval().requires_grad_(False)
            info = {k: blob["info"][k] for k in ("train_accuracy", "holdout_accuracy", "num_train", "num_holdout")}
            return model, {
                **info,
                "path": str(path),
                "cached": True,
                "key": config.key(),
                "config": dataclasses.asdict(config),
            }
    model, info = train_classifier(config)
    blob = {
        "format": CACHE_FORMAT,
        "config": dataclasses.asdict(config),
        "info": info,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return model, {
        **info,
        "path": str(path),
        "cached": False,
        "key": config.key(),
        "config": dataclasses.asdict(config),
    }
