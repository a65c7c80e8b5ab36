"""Where a run resumes from (`find_resume`: --ckpt latest | PATH, a run folder belongs to one experiment), the
weights it loads, and every process's random state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from disploss.errors import ConfigError
from disploss.training.config import TrainConfig, experiment_differences


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
    - A model folder or hub id (`disploss export`, SiT.save_pretrained): its weights initialise a new run, model and
      EMA alike, with a fresh optimizer (fine-tuning).
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
    from disploss.hub import is_model_folder, names_hub_id

    if is_model_folder(path) or names_hub_id(path):
        return _from_model_folder(path)
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


def _from_model_folder(path: str) -> Resume:
    from disploss.checkpoint import load_folder, load_sit_weights
    from disploss.hub import resolve

    weights, _ = load_sit_weights(load_folder(resolve(path, flag="--ckpt")))  # checked finite
    return Resume(path, {"model": weights, "ema": dict(weights)}, notes=[
        f"--ckpt {path} is a model folder: a new run fine-tunes its weights (step 0, a fresh optimizer, the EMA "
        "starting from the same weights)"
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

    weights, _ = load_sit_weights(state, prefer=prefer, source=str(path))
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
