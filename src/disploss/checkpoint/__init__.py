"""Checkpoints: safe I/O (io), finding the newest one (latest), SiT weights and their configuration from any
known layout, model folders included (sit), conversion of trusted pickles and safetensors export (convert), model
folders with their card (export, card).

Training checkpoints live in `{run_dir}/checkpoints/{step:07d}.pt` and hold `model`, `ema`, `opt`, `args` (the
resolved configuration as a dict), `step`, `epoch`, `rng` and each tensor's CRC-32 (`checksums`): tensors and
plain containers only, so they load with `torch.load(weights_only=True)`.
"""

from disploss.checkpoint.convert import convert_checkpoint, export_safetensors, to_plain
from disploss.checkpoint.export import export_folder
from disploss.checkpoint.io import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    UnsafeCheckpointError,
    first_nonfinite,
    import_safetensors,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from disploss.checkpoint.latest import (
    checkpoint_path,
    checkpoint_step,
    find_latest,
    find_latest_run,
    latest_of_runs,
    load_latest,
)
from disploss.checkpoint.sit import build_sit_from_checkpoint, infer_sit_config, load_folder, load_sit_weights

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "NonFiniteCheckpointError",
    "UnsafeCheckpointError",
    "build_sit_from_checkpoint",
    "checkpoint_path",
    "checkpoint_step",
    "convert_checkpoint",
    "export_folder",
    "export_safetensors",
    "find_latest",
    "find_latest_run",
    "first_nonfinite",
    "import_safetensors",
    "infer_sit_config",
    "latest_of_runs",
    "load_checkpoint",
    "load_folder",
    "load_latest",
    "load_sit_weights",
    "save_checkpoint",
    "to_plain",
    "verify_checkpoint",
]
