"""`disploss export CKPT OUT`: a checkpoint as a model folder (disploss.hub: config.json + model.safetensors) with a
model card (disploss.checkpoint.card) that says how it was trained and, given an evaluation, how well it samples.

CKPT is one of our training checkpoints, a released SiT / DispLoss `.pt` (a pickle carrying code is loaded only with
trust=True, by the trusted conversion of disploss.checkpoint.convert), or a `.safetensors` export. config.json's
"disploss" entry records which weights were taken, their fingerprint (disploss.statedict.fingerprint), the step, and
the training settings that sampling reads (path, prediction, VAE, image size) and that the card shows; local paths
are left out but for the VAE's, which sampling needs (the dataset is named by its folder's name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from disploss.checkpoint.io import NonFiniteCheckpointError, UnsafeCheckpointError, import_safetensors
from disploss.checkpoint.sit import WEIGHT_CHOICES, describe_config, load_sit_weights, select_weights
from disploss.errors import ConfigError, MissingFileError
from disploss.fileio import check_folder_creatable, read_json_object

# The run settings a model folder keeps: what sampling reads, then what the card shows.
SAMPLING_KEYS = ("image_size", "num_classes", "vae", "path_type", "prediction", "loss_weight", "train_eps",
                 "sample_eps")  # fmt: skip
RUN_KEYS = (
    "objective", "meanflow", "disp", "disp_weight", "disp_tau", "disp_variant", "disp_block", "disp_gather",
    "disp_margin", "global_batch_size", "global_seed", "lr", "beta2", "weight_decay", "grad_clip", "ema_decay",
    "precision", "epochs", "max_steps",
)  # fmt: skip
_METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


def dataset_name(args: Mapping[str, Any]) -> str | None:
    """The dataset of a run's configuration by name: 'digits' for the bundled digits, else the name of its
    --data-path folder (its parent's for a split folder: /data/imagenet/train -> imagenet), else None."""
    data = args.get("data_path")
    if not isinstance(data, str) or not data:
        return None
    if data.startswith("builtin:"):
        return data.split(":", 1)[1]
    path = Path(data.rstrip("/"))
    return (path.parent.name if path.name in ("train", "val", "training", "validation") else path.name) or None


def training_settings(args: Mapping[str, Any]) -> dict:
    """The settings of a run's stored configuration that a model folder keeps (SAMPLING_KEYS, RUN_KEYS, dataset)."""
    out = {key: args[key] for key in (*SAMPLING_KEYS, *RUN_KEYS) if key in args}
    if dataset_name(args):
        out["dataset"] = dataset_name(args)
    return out


def read_evaluation(metrics: str | os.PathLike, sample_config: str | os.PathLike | None = None) -> dict:
    """The metrics of a `disploss evaluate --out` JSON and the sampler settings its samples were made with.

    Args:
        metrics: the JSON; it holds the sample folder's settings ("sample_config") when the evaluated .npz was
            written by sample_ddp.py.
        sample_config: a sample folder's sample_config.json, for a JSON that does not hold them.
    Returns:
        {"metrics": {fid, sfid, ...}, "num_samples", "reference", "sample_config"}.
    Raises:
        ConfigError: no sampler settings, or two that differ; MissingFileError.
    """
    data = _read_json(metrics, "--metrics")
    if not any(data.get(key) is not None for key in _METRIC_KEYS):
        raise ConfigError(f"--metrics {metrics} holds none of {', '.join(_METRIC_KEYS)}: pass the JSON that "
                          "`disploss evaluate --out` wrote")  # fmt: skip
    settings = data.get("sample_config")
    if sample_config is not None:
        given = _read_json(sample_config, "--sample-config")
        if settings is not None and settings != given:
            raise ConfigError(f"--sample-config {sample_config} differs from the sampler settings recorded in "
                              f"--metrics {metrics}; leave --sample-config out")  # fmt: skip
        settings = given
    if not isinstance(settings, Mapping):
        raise ConfigError(
            f"--metrics {metrics} does not record the sampler settings its samples were made with (an .npz outside "
            "a sample folder, or an older disploss evaluate): pass --sample-config SAMPLE_FOLDER/sample_config.json"
        )
    return {
        "metrics": {key: data[key] for key in _METRIC_KEYS if data.get(key) is not None},
        "num_samples": data.get("num_samples"),
        "reference": Path(data["reference_batch"]).name if data.get("reference_batch") else None,
        "sample_config": dict(settings),
    }


def _read_json(path: str | os.PathLike, flag: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{flag} {path}: no such file")
    return read_json_object(path, f"{flag} {path}")


def _check_out(out: Path, src: Path) -> None:
    if out.resolve() == src.resolve() or src.resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"OUT {out} would hold or replace CKPT {src}; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT {out} exists and is not an empty folder; choose a new folder (nothing is overwritten)")
    check_folder_creatable(out.parent, f"for OUT {out}")


def _load(src: Path, trust: bool) -> Any:
    from disploss.checkpoint.convert import _load_trusted, to_plain
    from disploss.statedict import first_nonfinite

    if src.suffix == ".safetensors":
        tensors, stored = import_safetensors(src)  # checked finite
        return {**tensors, "model_config": stored}
    try:
        obj = to_plain(_load_trusted(src, trust))  # a plain file is checked on load; a trusted pickle is not
    except UnsafeCheckpointError as err:  # the conversion's message, with this command's name
        raise UnsafeCheckpointError(str(err).replace("disploss convert-checkpoint", "disploss export")) from err
    bad = first_nonfinite(obj)
    if bad is not None:
        raise NonFiniteCheckpointError(f"checkpoint {src} holds non-finite values in {bad}: its run had diverged, "
                                       "or the file is damaged; export an earlier checkpoint")  # fmt: skip
    return obj


def export_folder(
    src: str | os.PathLike, out: str | os.PathLike, *, weights: str = "ema", trust: bool = False,
    metrics: str | os.PathLike | None = None, sample_config: str | os.PathLike | None = None,
    license: str = "other", model_name: str | None = None, num_heads: int | None = None, hub_id: str | None = None,
) -> tuple[Path, dict]:  # fmt: skip
    """Write the `weights` of checkpoint `src` to the model folder `out`, with its model card.

    Args:
        src: a .pt (ours, or a released file) or .safetensors file.
        out: a new (or empty) folder; it appears whole, and nothing is written when anything is wrong.
        weights: "ema" or "model"; a file that holds only the other one is refused (a bare state dict is taken).
        trust: load a pickle that carries code (RUNS CODE from the file; as `disploss convert-checkpoint --trust`).
        metrics, sample_config: see `read_evaluation` (the metrics must be of these weights: the fingerprints of
            the sample folder and of the weights agree).
        license: the card's license id.
        model_name, num_heads: for a file whose width does not say its heads (a preset name, or the number).
        hub_id: the id the folder will be pushed to, used in the card's commands (default: the folder's path).
    Returns:
        (out, config.json as written).
    """
    from disploss import __version__
    from disploss.checkpoint.card import render_card
    from disploss.checkpoint.latest import checkpoint_step
    from disploss.hub import INFO_KEY, write_folder
    from disploss.models import SiT, model_name_for, parse_model_name
    from disploss.statedict import fingerprint, shape_differences

    src, out = Path(src), Path(out)
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"--weights {weights!r}; valid choices: {', '.join(WEIGHT_CHOICES)}")
    if not src.is_file():
        raise MissingFileError(f"CKPT {src}: no such checkpoint file" + (" (it is a folder)" if src.is_dir() else ""))
    _check_out(out, src)
    evaluation = read_evaluation(metrics, sample_config) if metrics is not None else None
    if evaluation is None and sample_config is not None:
        raise ConfigError("--sample-config goes with --metrics (the sampler settings of its numbers)")

    obj = _load(src, trust)
    state, config = load_sit_weights(obj, prefer=weights, strict=True, source=str(src))
    _, part = select_weights(obj, weights, str(src), strict=True)
    if model_name is not None:
        depth, hidden, heads, patch = parse_model_name(model_name)
        if (depth, hidden, patch) != (config["depth"], config["hidden_size"], config["patch_size"]):
            raise ConfigError(f"--model {model_name} does not match the checkpoint: it is {describe_config(config)}")
        config["num_heads"] = heads
    if num_heads is not None:
        if num_heads < 1 or config["hidden_size"] % num_heads:
            raise ConfigError(f"--num-heads {num_heads} does not divide the width {config['hidden_size']}")
        config["num_heads"] = num_heads
    if config["num_heads"] is None:
        raise ConfigError(f"cannot tell the attention heads of {src} (width {config['hidden_size']} is not a "
                          "registered SiT width): pass --model NAME or --num-heads N")  # fmt: skip
    with torch.device("meta"):  # the shapes config.json promises, without the memory
        diff = shape_differences(state, SiT(**config).state_dict())
    if diff:
        raise ConfigError(f"{src}: the weights do not form a SiT of their own shapes:\n" + "\n".join(diff[:6]))
    args = obj.get("args") if isinstance(obj.get("args"), Mapping) else {}
    step = obj.get("step") if isinstance(obj.get("step"), int) else checkpoint_step(src)
    info = {
        "model_name": model_name or args.get("model") or model_name_for(config),
        "weights": part,
        "source": src.name,
        "step": step,
        "fingerprint": fingerprint(state),
        "training": training_settings(args),
    }
    if evaluation is not None:
        recorded = evaluation["sample_config"].get("fingerprint")
        if recorded is not None and recorded != info["fingerprint"]:
            raise ConfigError(
                f"--metrics were measured on other weights (their sample folder's fingerprint is {recorded}, the "
                f"{part} weights of {src} are {info['fingerprint']}): evaluate samples of these weights"
            )
    params = sum(t.numel() for key, t in state.items() if key != "pos_embed")  # pos_embed: a fixed table
    card = render_card(config, info, params, evaluation=evaluation, license=license, where=hub_id or str(out))
    written = {"_class_name": "SiT", "_disploss_version": __version__, **config, INFO_KEY: info}
    write_folder(out, state, written, card)
    return out, written
