"""The state of a run across processes and restarts: where it resumes from, its checkpoints (weights, optimizer,
step, every process's random state) and its run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.errors import ConfigError
from disploss.training.config import TrainConfig

CHECKPOINT_FORMAT = "disploss-train-v1"


@dataclass
class Resume:
    """What a run starts from: the checkpoint path and its loaded state (None for a fresh start), the step, and
    the run folder it continues (None: a new folder)."""

    path: str | None = None
    state: dict | None = None
    step: int = 0
    run_dir: Path | None = None


def find_resume(cfg: TrainConfig) -> Resume:
    """Resolve --ckpt: a path, 'latest' (newest checkpoint of this model in --results-dir, else a fresh start)."""
    from disploss.checkpoint import find_latest_run, load_checkpoint

    path = cfg.ckpt
    if path == "latest":
        found = find_latest_run(cfg.results_dir, cfg.model)
        path = str(found) if found is not None else None
    if path is None:
        return Resume()
    state = load_checkpoint(path)
    if "step" in state:  # a disploss training checkpoint: continue that run in its folder
        return Resume(path, state, int(state["step"]), Path(path).resolve().parent.parent)
    return Resume(path, state)  # a released or foreign file: its weights initialise a new run


def load_weights(model: torch.nn.Module, state: dict, prefer: str, path, cfg: TrainConfig) -> None:
    """Load the `prefer`red weights ('model' or 'ema') of a checkpoint strictly; a checkpoint of another model
    size, class count, image size or latent space is a one-line error naming the flags to change."""
    from disploss.checkpoint import infer_sit_config, load_sit_weights
    from disploss.checkpoint.sit import mismatch_causes

    weights, _ = load_sit_weights(state, prefer=prefer)
    model_sd = model.state_dict()
    fits = weights.keys() == model_sd.keys() and all(weights[k].shape == v.shape for k, v in model_sd.items())
    if not fits:
        model_cfg = model.config()
        causes = mismatch_causes(
            infer_sit_config(weights, num_heads=model.num_heads), model_cfg, cfg.image_size,
            max(cfg.image_size // model_cfg["input_size"], 1),
        )  # fmt: skip
        raise ConfigError(
            f"--ckpt {path} does not fit the model built from the flags (--model {cfg.model}, --image-size "
            f"{cfg.image_size}, --num-classes {cfg.num_classes}, --vae {cfg.vae}): "
            + ("; ".join(causes) if causes else "its state dict has other keys")
        )
    model.load_state_dict(weights, strict=True)


# -- random state -------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """This process's CPU (and CUDA) generator states."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(states: list, rank: int, world: int, device: torch.device, logger) -> None:
    """Restore this process's generators from a checkpoint's per-process list (reseeded by the caller's seed
    instead, with a warning, when the number of processes changed)."""
    if len(states) != world:
        logger.warning(f"checkpoint has random states of {len(states)} processes, this run has {world}: reseeding")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


# -- checkpoints --------------------------------------------------------------------------------------------------
def save_training_checkpoint(
    run_dir: Path, step: int, epoch: int, model, ema, opt, config: dict, device, world: int, skipped: int, logger
) -> None:
    """Every process sends its random state; rank 0 writes `checkpoints/{step:07d}.pt` atomically; all wait."""
    from disploss.checkpoint import checkpoint_path, save_checkpoint

    rng = [rng_state(device)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = [{k: v.cpu() for k, v in s.items()} for s in gathered]
    if dist.is_main():
        state = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": config,
            "step": step, "epoch": epoch, "rng": rng, "skipped_steps": skipped, "format": CHECKPOINT_FORMAT,
        }  # fmt: skip
        path = save_checkpoint(checkpoint_path(run_dir / "checkpoints", step), state)
        logger.info(f"saved checkpoint {path}")
    dist.barrier()


# -- the run folder -----------------------------------------------------------------------------------------------
def prepare_run_dir(cfg: TrainConfig, run_dir: Path | None, model: torch.nn.Module, is_main: bool) -> Path:
    """Rank 0 checks the disk and creates a new experiment folder (or cleans the resumed one); every rank
    gets the path, or rank 0's error to raise, so that no rank waits forever for a folder that never comes."""
    from disploss.training.rundir import check_writable, checkpoint_size_bytes, create_experiment_dir

    result: str | Exception | None = None
    if is_main:
        try:
            # Before anything is created: an unwritable --results-dir or a full disk stops the run here.
            # Two checkpoints fit at once: the last one and the one being written beside it.
            check_writable(run_dir or cfg.results_dir, min_free_bytes=2 * checkpoint_size_bytes(model))
            if run_dir is None:
                # A MeanFlow run says so in its folder's name: 000-SiT-B-2-Linear-meanflow-None
                prediction = cfg.prediction if cfg.objective == "flow" else "meanflow"
                run_dir = create_experiment_dir(cfg.results_dir, cfg.model, cfg.path_type, prediction, cfg.loss_weight)
            else:
                _remove_stale_temporaries(run_dir / "checkpoints")
            result = str(run_dir)
        except Exception as err:  # raised below, on every rank
            result = err
    result = dist.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return Path(result)


def _remove_stale_temporaries(checkpoint_dir: Path) -> None:
    # A run killed while writing a checkpoint leaves `.{step:07d}.pt.*.tmp` (as big as a checkpoint); nothing
    # reads them, and repeated kills would fill the disk.
    for tmp in checkpoint_dir.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
