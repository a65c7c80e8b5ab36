"""The state of a run across processes and restarts: where it resumes from, its checkpoints (weights, optimizer,
step, every process's random state) and its run folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.errors import ConfigError, UsageError
from disploss.training.config import TrainConfig, experiment_differences

CHECKPOINT_FORMAT = "disploss-train-v1"


@dataclass
class Resume:
    """What a run starts from: the checkpoint path and its loaded state (None for a fresh start; only 'model' and
    'ema' when just its weights are taken), the step, the run folder it continues (None: a new folder), and the
    lines that say why (`notes`) or warn (`warnings`), logged once the run's logger exists."""

    path: str | None = None
    state: dict | None = None
    step: int = 0
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def find_resume(cfg: TrainConfig) -> Resume:
    """Resolve --ckpt (a run folder belongs to one experiment: EXPERIMENT_FIELDS in training/config.py).

    - 'latest': the newest checkpoint of the newest run of this model in --results-dir whose stored experiment
      flags equal this command's, continued in its folder; runs of other experiments are passed over (named in
      a note); when none matches, a fresh run, with a warning naming the flags that differ.
    - PATH, a training checkpoint of ours: continued in its own run folder when its experiment flags match. Kept
      anywhere else (not in `{run}/checkpoints/` beside a config.json), a new run folder under --results-dir
      continues its optimizer, step and data order; trained with other experiment flags, a new run takes only its
      weights (step 0, a new optimizer). Nothing is ever written next to PATH.
    - PATH, a released or foreign file: its weights initialise a new run.
    """
    if cfg.ckpt is None:
        return Resume()
    if cfg.ckpt == "latest":
        return _latest_matching_run(cfg)
    return _from_path(cfg, cfg.ckpt)


def _latest_matching_run(cfg: TrainConfig) -> Resume:
    from disploss.checkpoint import latest_of_runs, load_latest

    passed_over = []
    for newest in latest_of_runs(cfg.results_dir, cfg.model):
        run_dir = newest.parent.parent
        stored = _stored_config(run_dir)
        differences = experiment_differences(stored, cfg) if stored is not None else []
        found = None if differences else load_latest(run_dir / "checkpoints")
        if found is not None and stored is None:  # no config.json: the checkpoint's own record
            differences = experiment_differences(_args(found[1]), cfg)
        if differences:
            passed_over.append(f"{run_dir.name} ({', '.join(differences)})")
        elif found is not None:
            path, state = found
            notes = [f"--ckpt latest: passed over the run(s) of other experiments: {'; '.join(passed_over)}"]
            return Resume(str(path), state, int(state.get("step", 0)), run_dir, notes=notes if passed_over else [])
    if not passed_over:
        return Resume()
    return Resume(warnings=[
        f"--ckpt latest: no run of {cfg.model} in {cfg.results_dir} has this command's experiment flags, so a fresh "
        f"run starts; the newest one differs: {passed_over[0]}"
    ])  # fmt: skip


def _from_path(cfg: TrainConfig, path: str) -> Resume:
    from disploss.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if "step" not in state:  # a released or foreign file: its weights initialise a new run
        extra = " and optimizer state" if "opt" in state else ""
        return Resume(path, state, notes=[f"a new run starts from the weights{extra} of {path} (step 0)"])
    step, home = int(state["step"]), run_folder_of(path)
    differences = experiment_differences(_args(state), cfg)
    if differences:
        weights = {k: state[k] for k in ("model", "ema") if k in state}
        return Resume(path, weights, warnings=[
            f"--ckpt {path} was trained with other experiment flags ({', '.join(differences)}): a new run takes only "
            "its weights (step 0, a new optimizer)"
        ])  # fmt: skip
    if home is not None:
        return Resume(path, state, step, home)
    return Resume(path, state, step, notes=[
        f"--ckpt {path} is not in a run folder of ours: a new run folder continues it (its optimizer, step {step} "
        "and data order); nothing is written next to it"
    ])  # fmt: skip


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder of ours that holds the checkpoint `path` (`{run}/checkpoints/{step:07d}.pt`, with the
    run's config.json and an indexed folder name), or None."""
    import re

    from disploss.checkpoint import checkpoint_step

    path = Path(path).resolve()
    home = path.parent.parent
    if checkpoint_step(path) is None or path.parent.name != "checkpoints" or not re.match(r"\d{3,}-", home.name):
        return None
    return home if (home / "config.json").is_file() else None


def _stored_config(run_dir: Path) -> dict | None:
    import json

    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def _args(state: dict) -> dict:
    return state["args"] if isinstance(state.get("args"), dict) else {}


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
    run_dir: Path, step: int, epoch: int, model, ema, opt, config: dict, device, world: int, skipped: int, logger,
    lock=None,
) -> Path:  # fmt: skip
    """Every process sends its random state; rank 0 writes `checkpoints/{step:07d}.pt` atomically, with each
    tensor's checksum, then applies --keep-last / --keep-every; every process gets rank 0's outcome, so a failed
    write (a full disk: one line naming the last good checkpoint) stops them all instead of leaving them waiting.

    Returns:
        The checkpoint's path.
    """
    from disploss.checkpoint import checkpoint_path, save_checkpoint
    from disploss.training.retention import prune_checkpoints

    rng = [rng_state(device)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = [{k: v.cpu() for k, v in s.items()} for s in gathered]
    path = checkpoint_path(run_dir / "checkpoints", step)
    error: Exception | None = None
    if dist.is_main():
        try:
            if lock is not None:
                lock.check()  # never write into a folder another job took over
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": config,
                "step": step, "epoch": epoch, "rng": rng, "skipped_steps": skipped, "format": CHECKPOINT_FORMAT,
            }  # fmt: skip
            save_checkpoint(path, state, checksums=True)
            logger.info(f"saved checkpoint {path}")
            prune_checkpoints(path.parent, config.get("keep_last"), config.get("keep_every"), step, logger)
        except OSError as err:
            error = _write_failure(path, err)
        except Exception as err:  # sent to the other processes, then raised here with its traceback
            error = err
    if world > 1:  # also the barrier after rank 0's write
        sent = error if error is None or isinstance(error, (OSError, UsageError)) else RuntimeError(
            f"process 0 failed to write checkpoint {path}: {type(error).__name__}: {error}"
        )  # fmt: skip
        shared = dist.broadcast_object(sent)
        if not dist.is_main() and shared is not None:  # printed once, by rank 0; the others stop quietly
            error = dist.StoppedByAnotherProcess(f"stopped: process 0 failed ({shared})", 0)
    if error is not None:
        raise error
    return path


def _write_failure(path: Path, err: OSError) -> Exception:
    """A one-line error for a checkpoint that could not be written, naming the last good one."""
    import errno

    from disploss.checkpoint import CheckpointWriteError, find_latest

    if not isinstance(err, CheckpointWriteError) and err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return err
    last = find_latest(path.parent)
    return CheckpointWriteError(
        err.errno or errno.EIO,
        f"cannot write checkpoint {path}: {err.strerror or err}; the last good checkpoint is "
        f"{last if last is not None else 'none yet'}: free some space (or pass --keep-last K), then run the same "
        "command with --ckpt latest",
    )


# -- the run folder -----------------------------------------------------------------------------------------------
def prepare_run_dir(cfg: TrainConfig, resume: Resume, model: torch.nn.Module, is_main: bool, on_exit):
    """Rank 0 checks the disk, creates a new experiment folder (or takes the resumed one) and locks it for this
    job (the lock is released by `on_exit`, a contextlib.ExitStack); every rank gets the path, or rank 0's error
    to raise, so that no rank waits forever for a folder that never comes.

    Returns:
        (run folder, its RunLock on rank 0 / None elsewhere).
    """
    import sys

    from disploss.training.rundir import RunLock, check_writable, checkpoint_size_bytes, create_experiment_dir

    result: str | Exception | None = None
    lock = None
    run_dir = resume.run_dir
    if is_main:
        try:
            # Before anything is created: an unwritable --results-dir or a full disk stops the run here. Two
            # checkpoints fit at once: the last one and the one being written beside it; their real size is the
            # resumed checkpoint's, else the estimate from the model and the optimizer state.
            size = Path(resume.path).stat().st_size if resume.step else checkpoint_size_bytes(model)
            check_writable(run_dir or cfg.results_dir, min_free_bytes=2 * size)
            if run_dir is None:
                # A MeanFlow run says so in its folder's name: 000-SiT-B-2-Linear-meanflow-None
                prediction = cfg.prediction if cfg.objective == "flow" else "meanflow"
                run_dir = create_experiment_dir(cfg.results_dir, cfg.model, cfg.path_type, prediction, cfg.loss_weight)
            lock = RunLock(run_dir, notify=lambda line: print(line, file=sys.stderr, flush=True)).acquire()
            on_exit.callback(lock.release)
            _remove_stale_temporaries(run_dir / "checkpoints")  # after the lock: never another job's save
            result = str(run_dir)
        except Exception as err:  # raised below, on every rank
            result = err
    result = dist.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return Path(result), lock


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
