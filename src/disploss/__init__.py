"""disploss: SiT diffusion transformers trained with Dispersive Loss (Wang & He, 2025).

Importing the package is light: the public names below are resolved on first use, and heavy or optional
dependencies (diffusers, torchdiffeq, scipy, wandb, torch-fidelity) are imported where they are used.

Time convention (stated once, used everywhere): t = 0 is Gaussian noise, t = 1 is data.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "dispersive_loss": "disploss.dispersive",
    "dispersion_stats": "disploss.dispersive",
    "DispersiveRegularizer": "disploss.regularizer",
    "TrainConfig": "disploss.training",
    "train": "disploss.training",
    "UsageError": "disploss.errors",
    "SiT": "disploss.models",
    "SiT_models": "disploss.models",
    "create_model": "disploss.models",
    "Sampler": "disploss.transport",
    "Transport": "disploss.transport",
    "create_transport": "disploss.transport",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'disploss' has no attribute {name!r}")
