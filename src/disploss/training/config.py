"""TrainConfig: every setting of a training run (the flags of `disploss train` / `train.py`).

The reference's flags keep their names and defaults. The resolved configuration is written to the run folder
(config.json) and into every checkpoint ('args', as a plain dict).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from disploss.data.images import BAD_IMAGE_POLICIES
from disploss.dispersive import ALL_VARIANTS
from disploss.errors import ConfigError
from disploss.meanflow import MeanFlowSettings
from disploss.options import all_of, at_least, check_options, finite, flag_name, in_interval, option, positive
from disploss.runtime import DEVICES, PRECISIONS
from disploss.sampling.config import check_cfg_scale
from disploss.transport import LOSS_WEIGHTS, PATH_TYPES, PREDICTIONS

DIGITS = "builtin:digits"
NONFINITE_POLICIES = ("error", "skip")
SAMPLE_WEIGHTS = ("ema", "model")
# --preset NAME: named settings laid under the flags given (disploss.training.presets, where they are defined).
PRESET_HELP = {
    "release": "the official PyTorch release: lambda 0.25, tau 1, the last block, AdamW beta2 0.999 (the defaults)",
    "jax": "the paper's JAX runs: lambda 0.5, tau 0.5, the block at depth // 4, AdamW beta2 0.95",
    "demo": "the CPU demo: SiT-T/2 on 8 px pixels (--vae none), batch 64, lr 1e-3, EMA 0.99, 1500 steps, "
    "InfoNCE-cosine 0.25 / 0.5",
}
OBJECTIVES = ("flow", "meanflow")  # flow matching (SiT); MeanFlow (disploss.meanflow: 1-step sampling)


def check_block_spec(spec: str) -> str | None:
    """--disp-block syntax: 'all' or comma-separated integers."""
    if spec == "all" or all(part.strip().lstrip("-").isdigit() for part in spec.split(",")):
        return None
    return f"{spec!r} is not a block index, a comma list of them (0,6,27) or all"


@dataclass(frozen=True)
class TrainConfig:
    """Every training flag; names and defaults of the reference's flags are kept."""

    data_path: str | None = option(None, f"ImageFolder root (class sub-folders), or {DIGITS} for scikit-learn's digits")
    results_dir: str = option("results", "parent folder of the experiment folders")
    model: str = option("SiT-XL/2", "model preset, e.g. SiT-XL/2, SiT-B/2, SiT-S/2 (SiT-T/* are tiny demo models)")
    image_size: int = option(256, "image side in pixels (the patch and the VAE factor must divide it)")
    num_classes: int = option(1000, "number of classes", check=at_least(1))
    epochs: int = option(1400, "epochs (--max-steps takes precedence)", check=at_least(1))
    global_batch_size: int = option(
        256, "batch over all processes (must be divisible by their number)", check=at_least(1)
    )
    global_seed: int = option(
        0, "seed: of the initial weights, and with the step and the micro-batch of every random draw of training (the "
        "same for any number of processes)",
    )  # fmt: skip
    grad_accum_steps: int = option(
        1, "micro-batches per process and optimizer step: --global-batch-size = processes x K x the micro-batch, each "
        "micro-batch with its own dispersive term (8 GPUs x 32 = 1 GPU x K 8 x 32)", check=at_least(1), metavar="K",
    )  # fmt: skip
    vae: str = option("ema", "ema | mse (stabilityai/sd-vae-ft-*), a local diffusers folder, or none (pixel space)")
    num_workers: int = option(4, "data loader workers per process", check=at_least(0))
    log_every: int = option(100, "steps between log lines", check=at_least(1))
    ckpt_every: int = option(50_000, "steps between checkpoints", check=at_least(1))
    sample_every: int = option(
        10_000, "steps between sample grids written into the run folder (0: never)", check=at_least(0)
    )
    cfg_scale: float = option(4.0, "guidance scale of the in-training sample grids", check=check_cfg_scale)
    wandb: bool = option(False, "log to Weights & Biases (reads WANDB_KEY, ENTITY, PROJECT)")
    tensorboard: bool = option(False, "write tensorboard event files into the run folder")
    ckpt: str | None = option(
        None,
        "resume from this checkpoint, or 'latest' (the newest run of this experiment in --results-dir, else fresh)",
    )
    disp: bool = option(False, "add the dispersive loss")
    disp_weight: float = option(0.25, "lambda, the weight of the dispersive term", check=finite)
    disp_tau: float = option(1.0, "temperature of the InfoNCE variants", check=finite)
    disp_variant: str = option("infonce_l2", "dispersive variant", choices=ALL_VARIANTS)
    disp_block: str = option(
        "-1", "blocks whose outputs are regularised: an index from 0 (negative: from the end), a comma list such as "
        "0,6,27, or all; one dispersive term per block, averaged", parse=str, check=check_block_spec,
    )  # fmt: skip
    disp_gather: bool = option(
        False, "dispersive term over every process's micro-batch together (all-gather; the global batch with "
        "--grad-accum-steps 1) instead of the local one",
    )  # fmt: skip
    disp_margin: float = option(1.0, "epsilon of the hinge variant", check=finite)
    path_type: str = option("Linear", "interpolant path", choices=PATH_TYPES)
    prediction: str = option("velocity", "model prediction", choices=PREDICTIONS)
    loss_weight: str | None = option(None, "loss weight (score / noise)", choices=LOSS_WEIGHTS, none_literal=True)
    sample_eps: float | None = option(
        None, "sampling eps (default: by path and prediction)", check=in_interval(0.0, 0.5)
    )
    train_eps: float | None = option(
        None, "training eps (default: by path and prediction)", check=in_interval(0.0, 0.5)
    )
    max_steps: int | None = option(None, "stop at this step (takes precedence over --epochs)", check=at_least(0))
    latents: str | None = option(None, "train from a latent cache written by `disploss extract-latents`")
    precision: str = option(
        "tf32", "fp32, tf32 (the reference: fp32 with TF32 matmuls) or bf16 autocast", choices=PRECISIONS
    )
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute block activations in backward (less memory)")
    lr: float = option(1e-4, "AdamW learning rate (constant)", check=all_of(positive, finite))
    beta2: float = option(0.999, "AdamW beta2 (the paper's JAX runs used 0.95)", check=in_interval(0.0, 1.0))
    weight_decay: float = option(0.0, "AdamW weight decay", check=all_of(at_least(0.0), finite))
    grad_clip: float = option(
        0.0, "clip the gradient norm to this value (0: no clipping, the reference)", check=all_of(at_least(0.0), finite)
    )
    ema_decay: float = option(
        0.9999, "EMA decay per step; the EMA averages about the last 1 / (1 - decay) steps", check=in_interval(0.0, 1.0)
    )
    ema_warmup_power: float | None = option(
        None, "warm the EMA up: decay min(--ema-decay, 1 - (1 + step)^-P), k-diffusion's EMAWarmup (0.6667 for a "
        "million steps or more, 0.75 for fewer); default: the reference's constant decay", check=all_of(positive, finite),
        metavar="P",
    )  # fmt: skip
    on_nonfinite: str = option(
        "error", "a non-finite loss or gradient: stop with an error, or skip the step", choices=NONFINITE_POLICIES
    )
    no_flip: bool = option(
        False, "no random horizontal flip of the training images (the reference flips them; a mirrored digit or "
        "letter is not one)",
    )  # fmt: skip
    on_bad_image: str = option(
        "skip", "an unreadable image: skip it with a warning, or stop", choices=BAD_IMAGE_POLICIES
    )
    device: str | None = option(None, "cuda or cpu (default: cuda when available)", choices=(None, *DEVICES))
    sample_steps: int = option(
        50, "points of the Heun ODE time grid of the in-training sample grids", check=at_least(2)
    )
    sample_weights: str = option(
        "ema",
        "weights of the in-training sample grids: the EMA (the reference) or the model's raw weights",
        choices=SAMPLE_WEIGHTS,
    )
    # Restarts, preemption and disk (README "When things go wrong").
    ckpt_every_minutes: float | None = option(
        None, "also write a checkpoint when this many minutes passed since the last one (whichever comes first)",
        check=all_of(positive, finite),
    )  # fmt: skip
    keep_last: int | None = option(
        None, "keep only the newest K checkpoints, deleted after a new one is complete (default: keep all)",
        check=at_least(1), metavar="K",
    )  # fmt: skip
    keep_every: int | None = option(
        None, "also keep forever the checkpoints at steps divisible by N (a multiple of --ckpt-every)",
        check=at_least(1), metavar="N",
    )  # fmt: skip
    # -- MeanFlow (issue 12): the objective and its settings (--meanflow-*, disploss.meanflow.MeanFlowSettings) --
    objective: str = option(
        "flow", "flow: flow matching (the reference); meanflow: MeanFlow's average velocity, sampled in 1 step "
        "(`sample.py MeanFlow`); needs --path-type Linear --prediction velocity", choices=OBJECTIVES,
    )  # fmt: skip
    meanflow: MeanFlowSettings = option(default_factory=MeanFlowSettings)
    preset: str | None = option(
        None, "named settings, which the flags given override (--disp still turns the term on): "
        + "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items()) + " (docs/reproducing.md)",
        choices=(None, *PRESET_HELP),
    )  # fmt: skip

    def __post_init__(self):
        if isinstance(self.disp_block, int):  # TrainConfig(disp_block=6) from Python
            object.__setattr__(self, "disp_block", str(self.disp_block))
        check_options(self)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """What no single option can check alone: the model's depth and patch, and options that go together.
        (What depends on the run's environment, the data and the number of processes, is checked by
        disploss.training.run.preflight.)

        Raises:
            ConfigError: naming the flag and the valid values.
        """
        from disploss.models import MODEL_PRESETS, parse_model_name

        if self.model not in MODEL_PRESETS:
            raise ConfigError(f"--model {self.model!r} is not a known model; valid choices: {', '.join(MODEL_PRESETS)}")
        depth, _, _, patch = parse_model_name(self.model)
        disp_blocks(self.disp_block, depth, self.model)  # regularised with --disp, watched (diagnostics) without
        if self.vae == "none" and self.latents is None and self.image_size % patch:
            near = " or ".join(
                str(k * patch) for k in (self.image_size // patch, self.image_size // patch + 1) if k > 0
            )
            raise ConfigError(
                f"--image-size {self.image_size} is not divisible by the patch size {patch} of --model {self.model}; "
                f"valid sizes nearby: {near}"
            )
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --grad-accum-steps "
                f"{self.grad_accum_steps} (global batch = processes x K x micro-batch)"
            )
        if self.disp and not (self.disp_weight > 0 and self.disp_tau > 0):
            raise ConfigError("--disp-weight and --disp-tau must be positive")
        if self.keep_every is not None and self.keep_every % self.ckpt_every:
            raise ConfigError(
                f"--keep-every {self.keep_every} must be a multiple of --ckpt-every {self.ckpt_every} (the checkpoints "
                "kept forever are those at steps divisible by it)"
            )
        if self.objective == "meanflow" and (self.path_type, self.prediction) != ("Linear", "velocity"):
            flag, value, need = (
                ("--path-type", self.path_type, "Linear") if self.path_type != "Linear" else
                ("--prediction", self.prediction, "velocity")
            )  # fmt: skip
            raise ConfigError(
                f"--objective meanflow does not support {flag} {value}: MeanFlow learns the average velocity of the "
                f"Linear path; use {flag} {need} (the default)"
            )

    def as_dict(self) -> dict:
        """The configuration as a plain dict (config.json, the 'args' of every checkpoint)."""
        return dataclasses.asdict(self)


def disp_blocks(spec: str, depth: int, model: str = "the model") -> list[int]:
    """The block indices of a --disp-block value for a model of `depth` blocks, from 0, in order, without repeats.

    Raises:
        ConfigError: an index outside -depth..depth-1.
    """
    if spec == "all":
        return list(range(depth))
    out: list[int] = []
    for part in spec.split(","):
        index = int(part)
        if not -depth <= index < depth:
            raise ConfigError(
                f"--disp-block {part.strip()} is out of range: {model} has {depth} blocks "
                f"(valid: 0..{depth - 1}, or -{depth}..-1 from the end)"
            )
        if index % depth not in out:
            out.append(index % depth)
    return sorted(out)


# The flags that define an experiment: `--ckpt latest` continues only a run whose stored configuration has the
# same values, and a training checkpoint whose values differ only gives its weights to a new run. The others may
# change between the restarts of one run: how long (--epochs, --max-steps), how often to log, save and sample,
# retention, workers, device, precision, --compile, --grad-checkpointing, the policies and the logging backends.
# --grad-accum-steps may change with the number of processes so long as processes x K (the micro-batches of a step)
# stays: a resume checks that (training/run/resume.py, check_process_split). --preset is recorded, its values compared.
EXPERIMENT_FIELDS = (
    "data_path", "latents", "model", "image_size", "num_classes", "vae", "global_batch_size", "global_seed",
    "disp", "disp_weight", "disp_tau", "disp_variant", "disp_block", "disp_gather", "disp_margin",
    "path_type", "prediction", "loss_weight", "train_eps", "lr", "beta2", "weight_decay", "grad_clip", "ema_decay",
    "ema_warmup_power", "no_flip", "objective", "meanflow",
)  # fmt: skip
_DISP_FIELDS = ("disp_weight", "disp_tau", "disp_variant", "disp_block", "disp_gather", "disp_margin")


def experiment_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """The experiment flags whose stored value (a run's config.json, a checkpoint's 'args') differs from `cfg`.

    Only the keys present in `stored` are compared (converted reference checkpoints store fewer); the dispersive
    settings only when one side has --disp on. Paths are equal when they name the same folder.

    Returns:
        One entry per differing flag, e.g. "--disp-weight 0.5 (this command: 0.25)"; empty when they match.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = []
    for name in EXPERIMENT_FIELDS:
        if name not in stored or (name in _DISP_FIELDS and not (stored.get("disp") or cfg.disp)):
            continue
        old, new = stored[name], getattr(cfg, name)
        if name == "meanflow" and not (stored.get("objective") == "meanflow" or cfg.objective == "meanflow"):
            continue
        if dataclasses.is_dataclass(new):  # a nested config is stored as its dict
            new = dataclasses.asdict(new)
        if name == "disp_block":  # stored as an int by older versions
            old, new = str(old), str(new)
        paths = name in ("data_path", "latents", "vae") and old and new  # the same folder, however written
        if old == new or (paths and os.path.realpath(old) == os.path.realpath(new)):
            continue
        out.append(f"{flag_name(fields[name])} {old} (this command: {new})")
    return out
