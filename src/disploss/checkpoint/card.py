"""The model card (README.md) of an exported model folder: YAML front matter for the hub, then what the model is, how
it was trained (from the checkpoint's stored run configuration), how to sample it, and the metrics of a
`disploss evaluate --out` JSON, each with the sampler settings its samples were made with.

Pure text from plain dicts: config (the SiT constructor arguments), info (config.json's "disploss" entry, see
disploss.checkpoint.export) and evaluation ({"metrics", "num_samples", "reference", "sample_config"}).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The settings of a sample folder's sample_config.json that are flags of sample_ddp.py, in the order shown.
_SAMPLER_FLAGS = (
    "sampling_method", "num_sampling_steps", "atol", "rtol", "step_control", "time_schedule", "time_rho",
    "diffusion_form", "diffusion_norm", "last_step", "last_step_size", "cfg_scale", "guide_channels",
    "global_seed", "pixel_conversion", "precision",
)  # fmt: skip
_METRICS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"), ("precision", "Precision"),
            ("recall", "Recall"))  # fmt: skip
_VARIANT_NAMES = {"infonce_l2": "InfoNCE-L2", "infonce_cosine": "InfoNCE-cosine", "hinge": "hinge",
                  "covariance": "covariance", "infonce_l2_ln": "InfoNCE-L2 on layer-normed features"}  # fmt: skip


def _model_line(config: Mapping[str, Any], info: Mapping[str, Any], params: int) -> str:
    name = info.get("model_name") or "SiT"
    shape = (f"depth {config['depth']}, width {config['hidden_size']}, {config['num_heads']} heads, patch "
             f"{config['patch_size']}")  # fmt: skip
    return f"{name} ({shape}), {params / 1e6:.1f}M parameters"


def _input_line(config: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    side, channels = config["input_size"], config["in_channels"]
    vae = training.get("vae")
    if vae == "none" or (vae is None and channels == 3):
        space = f"{side}x{side} pixels ({channels} channels)"
    else:
        label = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}.get(vae, vae or "a VAE")
        size = f", {training['image_size']} px images" if training.get("image_size") else ""
        space = f"{side}x{side}x{channels} latents of {label}{size}"
    return f"{space}; {config['num_classes']} classes (+ the null class of classifier-free guidance)"


def _objective_line(config: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    path, prediction = training.get("path_type", "Linear"), training.get("prediction", "velocity")
    if config.get("meanflow"):
        return f"MeanFlow (average velocity, one-step sampling) on the {path} path"
    recorded = "" if "path_type" in training else " (the reference's defaults; not recorded by the checkpoint)"
    return f"flow matching, {path} path, {prediction} prediction{recorded}"


def _dispersive_line(training: Mapping[str, Any]) -> str:
    if "disp" not in training:
        return "not recorded by the checkpoint"
    if not training["disp"]:
        return "none (trained without the dispersive term)"
    variant = training.get("disp_variant", "infonce_l2")
    parts = [f"{_VARIANT_NAMES.get(variant, variant)}", f"lambda {training.get('disp_weight', 0.25)}"]
    if variant.startswith("infonce"):
        parts.append(f"tau {training.get('disp_tau', 1.0)}")
    if variant == "hinge":
        parts.append(f"margin {training.get('disp_margin', 1.0)}")
    parts.append(f"on block {training.get('disp_block', '-1')}")
    if training.get("disp_gather"):
        parts.append("over the global batch")
    return ", ".join(parts)


def _training_line(info: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    parts = [f"{info['step']} steps" if info.get("step") is not None else "steps not recorded"]
    for key, label in (("global_batch_size", "global batch"), ("lr", "lr"), ("ema_decay", "EMA decay"),
                       ("precision", "precision"), ("global_seed", "seed")):  # fmt: skip
        if key in training:
            parts.append(f"{label} {training[key]}")
    if training.get("dataset"):
        parts.append(f"on {training['dataset']}")
    return ", ".join(parts)


def sampler_flags(sample_config: Mapping[str, Any]) -> list[str]:
    """The sample_ddp.py flags that reproduce a sample folder's images, from its sample_config.json."""
    flags = []
    if sample_config.get("vae") in ("ema", "mse", "none"):  # a local VAE folder's path means nothing elsewhere
        flags += ["--vae", sample_config["vae"]]
    for key in _SAMPLER_FLAGS:
        value = sample_config.get(key)
        if value is None or (key == "guide_channels" and value == "unused"):
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    if sample_config.get("reverse"):
        flags.append("--reverse")
    if sample_config.get("weights") == "model":
        flags += ["--weights", "model"]
    return flags


def describe_sampler(sample_config: Mapping[str, Any]) -> str:
    """One line, e.g. 'ODE dopri5, 250 grid points, cfg 1.5 (first 3 channels), seed 0'."""
    sc = sample_config
    text = f"{sc.get('mode', '?')} {sc.get('sampling_method', '?')}, {sc.get('num_sampling_steps', '?')} grid points"
    if sc.get("mode") == "MeanFlow":
        text = f"MeanFlow, {sc.get('num_sampling_steps', '?')} step(s)"
    if sc.get("time_schedule", "uniform") != "uniform":
        text += f", {sc['time_schedule']} schedule (rho {sc.get('time_rho')})"
    guide = sc.get("guide_channels")
    cfg = sc.get("cfg_scale", 1.0)
    text += f", cfg {cfg}" + (f" (guiding {guide} channels)" if cfg > 1 and guide not in (None, "unused") else "")
    return text + f", seed {sc.get('global_seed', 0)}"


def render_card(
    config: Mapping[str, Any], info: Mapping[str, Any], params: int, *, evaluation: Mapping[str, Any] | None = None,
    license: str = "other", where: str = "THIS_FOLDER",
) -> str:  # fmt: skip
    """The README.md of a model folder.

    Args:
        config: SiT constructor arguments; info: config.json's "disploss" entry; params: the parameter count.
        evaluation: {"metrics": {name: value}, "num_samples", "reference", "sample_config"} or None.
        license: the front matter's license id.
        where: how the commands name the model (the folder or the hub id it is pushed to).
    """
    training = info.get("training") or {}
    meanflow = bool(config.get("meanflow"))
    tags = ["disploss", "sit", "diffusion-transformer", "meanflow" if meanflow else "flow-matching",
            "image-generation", "class-conditional"]  # fmt: skip
    if training.get("disp"):
        tags.append("dispersive-loss")
    front = ["---", "library_name: disploss", f"license: {license}", "tags:", *[f"- {t}" for t in tags]]
    if training.get("dataset"):
        front += ["datasets:", f"- {training['dataset']}"]
    front.append("---")
    name = info.get("model_name") or "SiT"
    title = f"# {name}" + (" trained with Dispersive Loss" if training.get("disp") else "")
    weights = {"ema": "the EMA weights", "model": "the raw (non-EMA) weights"}.get(
        info.get("weights"), "the file's only state dict"
    )
    rows = [
        ("model", _model_line(config, info, params)),
        ("input", _input_line(config, training)),
        ("objective", _objective_line(config, training)),
        ("dispersive loss", _dispersive_line(training)),
        ("training", _training_line(info, training)),
        ("weights", f"{weights} of `{info.get('source', '?')}` (fingerprint `{info.get('fingerprint', '?')}`)"),
    ]
    mode = "MeanFlow" if meanflow else "ODE"
    lines = [
        *front, "", title, "", f"Exported by `disploss export` from `{info.get('source', '?')}`.", "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Use", "", "```bash", "pip install 'disploss[vae]'",
        f"python sample.py {mode} --ckpt {where}        # a grid of samples",
        f"torchrun --nproc_per_node=N sample_ddp.py {mode} --ckpt {where} --num-fid-samples 50000   # an ADM .npz",
        "```", "", "```python", "from disploss.models import SiT", "", f'model = SiT.from_pretrained("{where}")', "```",
        "", "Time convention: t = 0 is noise, t = 1 is data.", "", "## Evaluation", "",
    ]  # fmt: skip
    if evaluation is None:
        lines.append("No metrics were given to `disploss export` (`--metrics EVAL.json`, written by "
                     "`disploss evaluate --out`).")  # fmt: skip
    else:
        sc = evaluation["sample_config"]
        samples = evaluation.get("num_samples") or sc.get("num_fid_samples")
        sampler = describe_sampler(sc)
        reference = evaluation.get("reference") or "the reference batch"
        lines += [f"Against `{reference}`, {samples} samples, ADM's evaluator (`disploss evaluate`):", "",
                  "| metric | value | samples | sampler |", "|---|---|---|---|"]  # fmt: skip
        for key, label in _METRICS:
            value = evaluation["metrics"].get(key)
            if value is not None:
                lines.append(f"| {label} | {value:.4g} | {samples} | {sampler} |")
        command = " ".join(["torchrun --nproc_per_node=N sample_ddp.py", sc.get("mode", mode), "--ckpt", where,
                            "--num-fid-samples", str(samples), *sampler_flags(sc)])  # fmt: skip
        lines += ["", "The samples were made with:", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"
