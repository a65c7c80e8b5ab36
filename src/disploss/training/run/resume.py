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
    of_this_model = latest_of_runs(cfg.results_dir, cfg.model)
    for newest in of_this_model:
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
    passed_over += _runs_of_other_models(cfg, {p.parent.parent for p in of_this_model})
    if not passed_over:
        return Resume(notes=[f"--ckpt latest: no run with a checkpoint in {cfg.results_dir} yet: a fresh run starts"])
    more = f" (and {len(passed_over) - 3} more)" if len(passed_over) > 3 else ""
    return Resume(warnings=[
        f"--ckpt latest: no run of {cfg.model} in {cfg.results_dir} has this command's experiment flags, so a fresh "
        f"run starts; the newest one differs: {passed_over[0]}"
        + (f"; the others found: {'; '.join(passed_over[1:3])}{more}" if len(passed_over) > 1 else "")
    ])  # fmt: skip


def _runs_of_other_models(cfg: TrainConfig, seen: set[Path]) -> list[str]:
    """The run folders in --results-dir with a checkpoint that `latest_of_runs` leaves out (their folder names
    another model), newest first, each named with the flags that differ (from its config.json)."""
    import re

    from disploss.checkpoint import find_latest

    root = Path(cfg.results_dir)
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder in seen or not re.match(r"\d{3,}-", folder.name) or not folder.is_dir():
            continue
        newest = find_latest(folder / "checkpoints")
        if newest is not None:
            stored = _stored_config(folder) or {}
            differences = experiment_differences(stored, cfg) or ["--model: its folder names another model"]
            found.append((newest.stat().st_mtime, f"{folder.name} ({', '.join(differences)})"))
    return [text for _, text in sorted(found, reverse=True)]


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


# -- random state and the split of the global batch ---------------------------------------------------------------
def rng_state(device: torch.device) -> dict:
    """This process's CPU (and CUDA) generator states (kept in checkpoints for inspection: the draws of a step are
    seeded per micro-batch, disploss.training.step, so resuming needs none)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def check_process_split(cfg: TrainConfig, resume: Resume, world: int, num_items: int) -> None:
    """Refuse, in one line naming the checkpoint's split, to continue a run under another split of its global
    batch that would change its data or its random draws; a run continues exactly under any number of processes P
    and --grad-accum-steps K with the same P x K micro-batches per step (disploss.training.step), and, with
    --disp-gather (a term across the processes), under the same P and K.

    Args:
        cfg: this run's settings; resume: what it continues (nothing to check unless a step and a data order);
        world: this run's number of processes; num_items: the dataset's size (the epoch's length).
    Raises:
        ConfigError: naming the checkpoint's processes and K, and what to run instead.
    """
    from disploss.training.loader import steps_per_epoch

    args = _args(resume.state) if resume.state is not None else {}
    if not resume.step or "world_size" not in args:
        return
    old_world, old_k, k = int(args["world_size"]), int(args.get("grad_accum_steps", 1)), cfg.grad_accum_steps
    if (old_world, old_k) == (world, k):
        return
    batch = cfg.global_batch_size
    old_n, n = old_world * old_k, world * k
    was = (
        f"--ckpt {resume.path} was trained by {old_world} process(es) x --grad-accum-steps {old_k} ({old_n} "
        f"micro-batches of {batch // old_n} per step); this run has {world} x {k}"
    )
    if cfg.disp_gather:
        raise ConfigError(
            f"{was}, and with --disp-gather the dispersive term spans the processes: continue with {old_world} "
            f"process(es) and --grad-accum-steps {old_k}"
        )
    if old_n != n:
        other = f"--grad-accum-steps {old_n // world} with {world} process(es), or " if old_n % world == 0 else ""
        raise ConfigError(
            f"{was}: continue with {old_n} micro-batches per step ({other}{old_world} process(es) with "
            f"--grad-accum-steps {old_k}), so that each dispersive term and every random draw stay the same"
        )
    old_steps = steps_per_epoch(num_items, old_world, batch // old_world)
    if old_steps != steps_per_epoch(num_items, world, batch // world) or old_steps * batch > num_items:
        raise ConfigError(
            f"{was}: the {num_items} items do not split into whole steps alike under both (the sampler pads an epoch "
            f"to a multiple of the processes), so the epochs would differ; continue with {old_world} process(es) and "
            f"--grad-accum-steps {old_k}"
        )
