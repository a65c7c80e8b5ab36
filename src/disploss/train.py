"""`disploss train` / `torchrun train.py`: SiT training with flow matching and, with --disp, dispersive loss.

The loop reads top to bottom: setup, resume, loop {forward, backward, step, EMA, housekeeping}. EMA,
checkpoint I/O, logging, data and distributed helpers live in their own modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.config import add_dataclass_arguments, from_namespace

DIGITS = "builtin:digits"
PRECISIONS = ("fp32", "tf32", "bf16")


def _f(default, help, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """Every training flag; names and defaults of the reference's flags are kept."""

    data_path: str | None = _f(None, f"ImageFolder root (class sub-folders), or {DIGITS} for scikit-learn's digits")
    results_dir: str = _f("results", "parent folder of the experiment folders")
    model: str = _f("SiT-XL/2", "model preset, e.g. SiT-XL/2, SiT-B/2, SiT-S/2 (SiT-T/* are tiny demo models)")
    image_size: int = _f(256, "image side in pixels (the patch and the VAE factor must divide it)")
    num_classes: int = _f(1000, "number of classes")
    epochs: int = _f(1400, "epochs (--max-steps takes precedence)")
    global_batch_size: int = _f(256, "batch over all processes (must be divisible by their number)")
    global_seed: int = _f(0, "seed; process r uses global_seed * world_size + r")
    vae: str = _f("ema", "ema | mse (stabilityai/sd-vae-ft-*), a local diffusers folder, or none (pixel space)")
    num_workers: int = _f(4, "data loader workers per process")
    log_every: int = _f(100, "steps between log lines")
    ckpt_every: int = _f(50_000, "steps between checkpoints")
    sample_every: int = _f(10_000, "steps between sample grids written into the run folder (0: never)")
    cfg_scale: float = _f(4.0, "guidance scale of the in-training sample grids")
    wandb: bool = _f(False, "log to Weights & Biases (reads WANDB_KEY, ENTITY, PROJECT)")
    tensorboard: bool = _f(False, "write tensorboard event files into the run folder")
    ckpt: str | None = _f(None, "resume from this checkpoint, or 'latest' (newest in --results-dir, else fresh)")
    disp: bool = _f(False, "add the dispersive loss")
    disp_weight: float = _f(0.25, "lambda, the weight of the dispersive term")
    disp_tau: float = _f(1.0, "temperature of the InfoNCE variants")
    disp_variant: str = _f("infonce_l2", "dispersive variant", choices=("infonce_l2", "infonce_cosine", "hinge", "covariance"))
    disp_block: int = _f(-1, "block whose output is regularised, from 0 (negative: from the end)")
    disp_gather: bool = _f(False, "dispersive term over the global batch (all-gather) instead of the local one")
    disp_margin: float = _f(1.0, "epsilon of the hinge variant")
    path_type: str = _f("Linear", "interpolant path", choices=("Linear", "GVP", "VP"))
    prediction: str = _f("velocity", "model prediction", choices=("velocity", "score", "noise"))
    loss_weight: str | None = _f(None, "loss weight (score / noise)", choices=(None, "velocity", "likelihood"), allow_none_literal=True)
    sample_eps: float | None = _f(None, "sampling eps (default: by path and prediction)")
    train_eps: float | None = _f(None, "training eps (default: by path and prediction)")
    max_steps: int | None = _f(None, "stop at this step (takes precedence over --epochs)")
    latents: str | None = _f(None, "train from a latent cache written by `disploss extract-latents`")
    precision: str = _f("tf32", "fp32, tf32 (the reference: fp32 with TF32 matmuls) or bf16 autocast", choices=PRECISIONS)
    compile: bool = _f(False, "torch.compile the model")
    grad_checkpointing: bool = _f(False, "recompute block activations in backward (less memory)")
    lr: float = _f(1e-4, "AdamW learning rate (constant)")
    beta2: float = _f(0.999, "AdamW beta2 (the paper's JAX runs used 0.95)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: no clipping, the reference)")
    ema_decay: float = _f(0.9999, "EMA decay per step")
    on_nonfinite: str = _f("error", "a non-finite loss or gradient: stop with an error, or skip the step", choices=("error", "skip"))
    on_bad_image: str = _f("skip", "an unreadable image: skip it with a warning, or stop", choices=("skip", "error"))
    device: str | None = _f(None, "cuda or cpu (default: cuda when available)")
    sample_steps: int = _f(50, "Heun ODE steps of the in-training sample grids")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    """`disploss train`: 0 when done; one line `disploss train: error: ...` and 2 for a user error (flags,
    data, checkpoint, run folder), 1 for a non-finite loss; anything else keeps its traceback."""
    cfg = from_namespace(TrainConfig, args)
    try:
        train(cfg)
    except NonFiniteError as err:
        print(f"disploss train: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"disploss train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


# A full or read-only disk mid-run is the user's to fix, not a bug: no traceback for these. (An OSError without
# errno was raised on purpose with an explanation, e.g. load_vae offline.)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _is_user_error(err: Exception) -> bool:
    # Configuration and input errors carry a message meant for the user; anything else keeps its traceback.
    if isinstance(err, (ValueError, FileNotFoundError, PermissionError, ImportError)):
        return True
    if isinstance(err, OSError) and (err.errno is None or err.errno in _USER_ERRNOS):
        return True
    return type(err).__name__ in ("NotWritableError", "InsufficientDiskSpaceError", "WandbConfigError")


def _one_line(err: Exception) -> str:
    """The message of `err` on one line; for an error re-raised from a DataLoader worker (whose message is
    the worker's whole traceback), the original exception's own message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last  # "pkg.UnreadableImageError: msg" -> msg
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the term."""


# ---------------------------------------------------------------------------------------------------------
def validate(cfg: TrainConfig, world_size: int) -> None:
    """Check the flags that need no data: one-line errors naming the flag and the valid values."""
    from disploss.models import MODEL_PRESETS, parse_model_name

    if cfg.model not in MODEL_PRESETS:
        raise ValueError(f"--model {cfg.model!r} is not a known model; valid choices: {', '.join(MODEL_PRESETS)}")
    depth, _, _, patch = parse_model_name(cfg.model)
    if cfg.disp and not -depth <= cfg.disp_block < depth:
        raise ValueError(
            f"--disp-block {cfg.disp_block} is out of range: {cfg.model} has {depth} blocks "
            f"(valid: 0..{depth - 1}, or -{depth}..-1 from the end)"
        )
    if cfg.data_path is None and cfg.latents is None:
        raise ValueError("--data-path is required (or --latents DIR to train from cached latents)")
    if cfg.global_batch_size % world_size:
        raise ValueError(
            f"--global-batch-size {cfg.global_batch_size} is not divisible by the number of processes {world_size}"
        )
    if cfg.vae == "none" and cfg.latents is None and cfg.image_size % patch:
        near = " or ".join(str(k * patch) for k in (cfg.image_size // patch, cfg.image_size // patch + 1) if k > 0)
        raise ValueError(
            f"--image-size {cfg.image_size} is not divisible by the patch size {patch} of --model {cfg.model}; "
            f"valid sizes nearby: {near}"
        )
    if cfg.disp and not (cfg.disp_weight > 0 and cfg.disp_tau > 0):
        raise ValueError("--disp-weight and --disp-tau must be positive")
    for name in ("log_every", "ckpt_every", "global_batch_size", "num_classes", "epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {cfg.max_steps}")
    if cfg.cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1 disables guidance), got {cfg.cfg_scale}")


def _set_precision(precision: str) -> None:
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def build_data(cfg: TrainConfig, device: torch.device):
    """Dataset, latent codec (or None when the dataset yields latents) and the model's input geometry."""
    from disploss import data
    from disploss.vae import load_vae

    if cfg.latents is not None:
        dataset = data.LatentsDataset(cfg.latents)
        if dataset.num_classes > cfg.num_classes:
            raise ValueError(
                f"the latent cache {cfg.latents} has {dataset.num_classes} classes but --num-classes is {cfg.num_classes}"
            )
        if dataset.image_size != cfg.image_size:
            raise ValueError(f"the latent cache {cfg.latents} was made at --image-size {dataset.image_size}, not {cfg.image_size}")
        c, h, _ = dataset.latent_shape
        return dataset, None, c, h
    # The data first: a mistyped --data-path is reported at once, not after a VAE download attempt.
    if cfg.data_path == DIGITS:
        if cfg.num_classes < 10:
            raise ValueError(f"the digits have 10 classes but --num-classes is {cfg.num_classes}")
        dataset = data.DigitsDataset(image_size=cfg.image_size, channels=3)
    else:
        dataset = data.ImageFolderDataset(
            cfg.data_path, cfg.image_size, num_classes=cfg.num_classes, on_bad_image=cfg.on_bad_image
        )
    codec = load_vae(cfg.vae, device)
    input_size = codec.latent_size(cfg.image_size)
    return dataset, codec, codec.latent_channels, input_size


class EpochSeeded(torch.utils.data.Dataset):
    """Per-sample randomness (flips, posterior draws) as a function of (seed, epoch, index) only.

    Items are requested as (epoch, index); the wrapped dataset runs under a forked CPU RNG seeded from
    those, so a resumed run, any number of loader workers and the main process's own stream all stay exact.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class ResumableSampler(torch.utils.data.Sampler):
    """The reference's DistributedSampler order (shuffle, seed, set_epoch), started at any batch.

    Yields (epoch, index) keys for EpochSeeded.
    """

    def __init__(self, n: int, world_size: int, rank: int, seed: int):
        self.inner = torch.utils.data.DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start_index: int) -> None:
        self.epoch, self.start = epoch, start_index

    def __len__(self) -> int:
        return len(self.inner) - self.start

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        for index in list(self.inner)[self.start :]:
            yield (self.epoch, index)


# ---------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train; returns the run folder. See TrainConfig for the options."""
    from disploss import checkpoint as ckio
    from disploss.ema import EMA
    from disploss.models import create_model, parse_model_name
    from disploss.runlog import RunLogger
    from disploss.transport import create_transport
    from disploss.vae import IdentityCodec

    # -- setup ----------------------------------------------------------------------------------------------
    info = dist.init(cfg.device)
    device, world, rank = info.device, info.world_size, info.rank
    validate(cfg, world)
    _set_precision(cfg.precision)
    torch.manual_seed(cfg.global_seed * world + rank)
    local_batch = cfg.global_batch_size // world

    dataset, codec, in_channels, input_size = build_data(cfg, device)
    steps_per_epoch = math.ceil(len(dataset) / world) // local_batch  # DistributedSampler pads to a multiple
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset has {len(dataset)} items: fewer than one local batch of {local_batch} per process "
            "(lower --global-batch-size)"
        )
    patch = parse_model_name(cfg.model)[3]
    if input_size % patch:
        factor = cfg.image_size // input_size
        unit = factor * patch
        near = " or ".join(str(k * unit) for k in (cfg.image_size // unit, cfg.image_size // unit + 1) if k > 0)
        raise ValueError(
            f"--image-size {cfg.image_size} gives latents of side {input_size} (VAE factor {factor}), which the patch "
            f"size {patch} of --model {cfg.model} does not divide; valid sizes nearby: {near}"
        )
    # Trained from cached latents: the grids are decoded with the VAE that made them, loaded now to fail early.
    grid_codec = codec
    if codec is None and cfg.sample_every > 0:
        from disploss.vae import load_vae

        grid_codec = load_vae(dataset.vae, device)
    model = create_model(cfg.model, input_size=input_size, in_channels=in_channels, num_classes=cfg.num_classes).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    transport = create_transport(cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps)
    opt = make_adamw(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)

    # -- resume -----------------------------------------------------------------------------------------------
    ckpt_path = cfg.ckpt
    if ckpt_path == "latest":
        found = ckio.find_latest_run(cfg.results_dir, cfg.model)
        ckpt_path = str(found) if found is not None else None
    step, run_dir, state = 0, None, None
    if ckpt_path is not None:
        state = ckio.load_checkpoint(ckpt_path)
        weights, _ = ckio.load_sit_weights(state, prefer="model")
        _load_weights(model, weights, ckpt_path, cfg)
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        if "step" in state:  # a disploss training checkpoint: continue that run in its folder
            step = int(state["step"])
            run_dir = Path(ckpt_path).resolve().parent.parent
    ema = EMA(model)  # an exact copy of the model (the reference's update_ema(decay=0))
    if state is not None:
        ema_weights, _ = ckio.load_sit_weights(state, prefer="ema")
        _load_weights(ema.model, ema_weights, ckpt_path, cfg)

    run_dir = _prepare_run_dir(cfg, run_dir, model, info.is_main)
    config = {**dataclasses.asdict(cfg), "model_config": model.config(), "world_size": world, "run_dir": str(run_dir)}
    logger = RunLogger(
        run_dir, resume_step=step if step else None, wandb=cfg.wandb, wandb_config=config, tensorboard=cfg.tensorboard
    )
    if info.is_main:
        from disploss.fileio import atomic_write_json

        atomic_write_json(run_dir / "config.json", config)
    logger.info(f"run folder {run_dir}; {world} process(es) on {device}; {sum(p.numel() for p in model.parameters()):,} parameters")
    if ckpt_path is not None:
        logger.info(f"resumed from {ckpt_path} at step {step}")

    # -- data ------------------------------------------------------------------------------------------------
    sampler = ResumableSampler(len(dataset), world, rank, cfg.global_seed)
    loader = torch.utils.data.DataLoader(
        EpochSeeded(dataset, cfg.global_seed),
        batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator(),  # the loader's own seed draw must not consume the training RNG stream
    )  # fmt: skip
    if state is not None and "rng" in state:
        _restore_rng(state["rng"], rank, world, device, logger)
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    # -- model wrappers ---------------------------------------------------------------------------------------
    train_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        train_model = torch.compile(train_model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    disp_kwargs = dict(
        disp_weight=cfg.disp_weight if cfg.disp else 0.0, disp_tau=cfg.disp_tau, disp_variant=cfg.disp_variant,
        disp_block=cfg.disp_block, disp_gather=cfg.disp_gather, disp_margin=cfg.disp_margin,
    )  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    # -- loop -------------------------------------------------------------------------------------------------
    sums = torch.zeros(4, device=device)  # loss, flow, disp, steps since the last log line
    bad = torch.full((3,), -1.0, device=device)  # first non-finite step, and its term flags (flow, disp)
    skipped = int(state.get("skipped_steps", 0)) if state is not None else 0
    grad_norm, t_log = torch.zeros((), device=device), time.time()
    log_start = step
    if info.is_main and step >= max_steps:
        logger.info(f"nothing to do: step {step} >= {max_steps}")
    while step < max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, offset * local_batch)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if codec is not None and not isinstance(codec, IdentityCodec):
                with torch.no_grad():
                    x = codec.encode(x, sample=True)
            with autocast:
                terms = transport.training_losses(train_model, x, dict(y=y), **disp_kwargs)
            loss = terms["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            flow, disp = terms["flow"].detach().mean(), terms["disp"].detach().float()
            finite = torch.isfinite(grad_norm) & torch.isfinite(flow) & torch.isfinite(disp)
            update = True
            if cfg.on_nonfinite == "skip":  # needs the answer now: one host sync per step
                # Every process must agree (a local loss can be non-finite while the averaged gradient is not).
                update = float(dist.all_reduce_sum((~finite).float())) == 0
                if not update:
                    skipped += 1
                    term = _term(not torch.isfinite(flow), not torch.isfinite(disp))
                    logger.warning(f"step {step + 1}: non-finite {term}; step skipped (--on-nonfinite skip)")
                    opt.zero_grad(set_to_none=True)
            else:  # recorded on the device; checked at log and checkpoint steps (no per-step sync)
                new_bad = (~finite) & (bad[0] < 0)
                flags = torch.stack([torch.tensor(float(step + 1), device=device), (~torch.isfinite(flow)).float(), (~torch.isfinite(disp)).float()])
                bad = torch.where(new_bad, flags, bad)
            if update:
                opt.step()
                ema.update(cfg.ema_decay)
                sums += torch.stack([loss.detach(), flow, disp, torch.ones((), device=device)])
            step += 1

            # -- housekeeping ------------------------------------------------------------------------------
            if step % cfg.log_every == 0 or step == max_steps:
                _check_finite(bad, cfg)
                totals = dist.all_reduce_sum(sums) / world
                n = float(totals[3])  # steps that updated the weights (skipped ones are not averaged)
                dt = time.time() - t_log
                steps_done = step - log_start
                mean = [float(v) / n if n else math.nan for v in totals[:3]]
                metrics = {
                    "loss": mean[0], "flow": mean[1], "disp": mean[2],
                    "steps_per_sec": steps_done / dt, "images_per_sec": steps_done * cfg.global_batch_size / dt,
                    "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm), "epoch": epoch,
                    "peak_mem_gb": _peak_memory_gb(device), "skipped_steps": skipped,
                }  # fmt: skip
                logger.log_metrics(step, metrics)
                sums.zero_()
                t_log, log_start = time.time(), step
            if step % cfg.ckpt_every == 0 or step == max_steps:
                _check_finite(bad, cfg)
                _save(run_dir, step, model, ema, opt, config, epoch, device, world, logger, skipped)
            if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == max_steps):
                _check_finite(bad, cfg)
                _sample_grid(ema.model, grid_codec, transport, cfg, run_dir, step, device, logger)
            if step >= max_steps:
                break
    logger.info(f"done at step {step}")
    logger.close()
    dist.barrier()
    return run_dir


# ---------------------------------------------------------------------------------------------------------
def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA, and CPU since torch 2.4), else the default foreach one.

    Fused and foreach compute the same update (tests/test_fast_paths.py); fused is one kernel per step.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # this torch has no fused kernel for the device
        return torch.optim.AdamW(params, **kwargs)


def _load_weights(model: torch.nn.Module, weights: dict, path, cfg: TrainConfig) -> None:
    """Load `weights` strictly; a checkpoint of another model size, class count, image size or latent space
    is a one-line error naming the flags to change (load_state_dict would raise a bare RuntimeError)."""
    from disploss.checkpoint import _mismatch_causes, infer_sit_config

    model_sd = model.state_dict()
    fits = weights.keys() == model_sd.keys() and all(weights[k].shape == v.shape for k, v in model_sd.items())
    if not fits:
        model_cfg = model.config()
        causes = _mismatch_causes(
            infer_sit_config(weights, num_heads=model.num_heads), model_cfg, cfg.image_size,
            max(cfg.image_size // model_cfg["input_size"], 1),
        )
        raise ValueError(
            f"--ckpt {path} does not fit the model built from the flags (--model {cfg.model}, --image-size "
            f"{cfg.image_size}, --num-classes {cfg.num_classes}, --vae {cfg.vae}): "
            + ("; ".join(causes) if causes else "its state dict has other keys")
        )
    model.load_state_dict(weights, strict=True)


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path | None, model: torch.nn.Module, is_main: bool) -> Path:
    """Rank 0 checks the disk and creates a new experiment folder (or cleans the resumed one); every rank
    gets the path, or rank 0's error to raise, so that no rank waits forever for a folder that never comes."""
    from disploss.rundir import check_writable, checkpoint_size_bytes, create_experiment_dir

    result: str | Exception | None = None
    if is_main:
        try:
            # Before anything is created: an unwritable --results-dir or a full disk stops the run here.
            # Two checkpoints fit at once: the last one and the one being written beside it.
            check_writable(run_dir or cfg.results_dir, min_free_bytes=2 * checkpoint_size_bytes(model))
            if run_dir is None:
                run_dir = create_experiment_dir(
                    cfg.results_dir, cfg.model, cfg.path_type, cfg.prediction, cfg.loss_weight
                )
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


def _term(flow_bad, disp_bad) -> str:
    return "flow loss" if flow_bad else "dispersive loss" if disp_bad else "gradient"


def _check_finite(bad: torch.Tensor, cfg: TrainConfig) -> None:
    first, flow_bad, disp_bad = bad.tolist()
    if first >= 0:
        raise NonFiniteError(
            f"non-finite {_term(flow_bad, disp_bad)} at step {int(first)}; the last checkpoint written before it "
            "is intact. "
            "Lower --lr, set --grad-clip, or pass --on-nonfinite skip to skip such steps"
        )


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(states: list, rank: int, world: int, device: torch.device, logger) -> None:
    if len(states) != world:
        logger.warning(f"checkpoint has random states of {len(states)} processes, this run has {world}: reseeding")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def _save(run_dir: Path, step, model, ema, opt, config, epoch, device, world, logger, skipped: int) -> None:
    from disploss.checkpoint import checkpoint_path, save_checkpoint

    rng = [_rng_state(device)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = [{k: v.cpu() for k, v in s.items()} for s in gathered]
    if dist.is_main():
        state = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": config,
            "step": step, "epoch": epoch, "rng": rng, "skipped_steps": skipped,
            "format": "disploss-train-v1",
        }  # fmt: skip
        path = save_checkpoint(checkpoint_path(run_dir / "checkpoints", step), state)
        logger.info(f"saved checkpoint {path}")
    dist.barrier()


def grid_labels(num_classes: int) -> tuple[list[int], int]:
    """Classes of the in-training grid (a row per class, up to 10 rows) and samples per row."""
    rows = min(num_classes, 10)
    classes = sorted({round(i * (num_classes - 1) / max(rows - 1, 1)) for i in range(rows)})
    return classes, (8 if num_classes <= 10 else 4)


@torch.no_grad()
def _sample_grid(ema_model, codec, transport, cfg, run_dir, step, device, logger) -> None:
    """A class-conditional grid from the EMA weights (rank 0), fixed noise, Heun ODE, the run's own classes."""
    from disploss.imageio import save_grid, to_uint8
    from disploss.sample import cfg_batch, guided_model_fn
    from disploss.transport import Sampler

    if not dist.is_main():
        dist.barrier()
        return
    classes, per_row = grid_labels(cfg.num_classes)
    y = torch.tensor([c for c in classes for _ in range(per_row)], device=device)
    gen = torch.Generator().manual_seed(cfg.global_seed)
    shape = (len(y), ema_model.in_channels, ema_model.input_size, ema_model.input_size)
    z = torch.randn(shape, generator=gen).to(device)
    fn = Sampler(transport).sample_ode(sampling_method="heun2", num_steps=cfg.sample_steps, keep_trajectory=False)
    model_fn, doubled = guided_model_fn(ema_model, cfg.cfg_scale, guide_channels=3)
    zz, yy = cfg_batch(z, y, cfg.num_classes, doubled)
    out = fn(zz, model_fn, y=yy)[-1][: len(y)]
    images = to_uint8(codec.decode(out), mode="round")
    path = run_dir / "samples" / f"{step:07d}.png"
    save_grid(images, path, nrow=per_row, zoom=max(1, 64 // images.shape[1]))  # tiny images: enlarged to see
    logger.log_image("samples", str(path), step)
    logger.info(f"wrote sample grid {path}")
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    from disploss.cli import run_command

    return run_command("train", list(sys.argv[1:] if argv is None else argv))
