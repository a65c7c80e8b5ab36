"""`train(cfg)`: SiT training with flow matching (or MeanFlow) and, with cfg.disp, dispersive loss.

Reads top to bottom: setup, resume, the step, loop {train_step, housekeeping: log line, checkpoint, stop on a
signal, sample grid}. The objective, with the dispersive term, is `disploss.training.objective`; the step itself
(forward, backward, AdamW, EMA) is `disploss.training.step.train_step`, shared with the benchmark. The run's
operations (run folder and lock, resume, checkpoints, preemption, preflight, logs) are `disploss.training.run`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.training.config import TrainConfig
from disploss.training.run import preemption


def train(cfg: TrainConfig) -> Path:
    """Train; returns the run folder. See TrainConfig for the options.

    SIGTERM, SIGUSR1 and SIGINT stop the run after the current step with a checkpoint and raise
    `preemption.Stopped` (training/run/preemption.py); the run folder stays locked to this job until it ends.
    """
    with preemption.stop_signals(), contextlib.ExitStack() as on_exit:
        return _train(cfg, on_exit)


def _train(cfg: TrainConfig, on_exit: contextlib.ExitStack) -> Path:
    """train() top to bottom; `on_exit` closes the log and releases the run folder's lock however it ends."""
    from disploss.models import create_model, parse_model_name
    from disploss.runtime import peak_memory_gb, set_precision
    from disploss.training import loader as data
    from disploss.training.ema import EMA
    from disploss.training.objective import DispersionWatch, build_objective, build_regularizer
    from disploss.training.run.checkpoints import names_the_last_checkpoint, save_training_checkpoint
    from disploss.training.run.folder import prepare_run_dir
    from disploss.training.run.metrics import RunningMeans
    from disploss.training.run.plots import plot_run
    from disploss.training.run.preflight import check_patch, preflight
    from disploss.training.run.resume import check_process_split, find_resume, load_weights
    from disploss.training.step import NonFiniteWatch, StepOptions, make_adamw, nonfinite_term, train_step
    from disploss.transport import create_transport

    # -- setup: processes, cheap checks, data, model, optimizer ---------------------------------------------------
    info = dist.init(cfg.device)
    device, world, rank = info.device, info.world_size, info.rank
    # Cheap checks first (data, processes, wandb, output folder), on every process at once: a mistake is printed once.
    dataset = dist.on_every_rank(preflight, cfg, world, info.is_main)
    set_precision(cfg.precision)
    # The initial weights from the seed alone (the same for any number of processes; DDP also broadcasts rank 0's);
    # each step's random draws are seeded per micro-batch (disploss.training.step).
    torch.manual_seed(cfg.global_seed)
    local_batch = cfg.global_batch_size // world  # --grad-accum-steps micro-batches of it per step
    td = dist.on_every_rank(data.build_data, cfg, device, dataset)  # the VAE
    steps_per_epoch = data.steps_per_epoch(len(td.dataset), world, local_batch)
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    check_patch(cfg, td.input_size, parse_model_name(cfg.model)[3])
    model = create_model(
        cfg.model, input_size=td.input_size, in_channels=td.in_channels, num_classes=cfg.num_classes,
        meanflow=cfg.objective == "meanflow",  # MeanFlow: a second time input (disploss.meanflow)
    ).to(device)  # fmt: skip
    model.grad_checkpointing = cfg.grad_checkpointing
    transport = create_transport(cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps)
    opt = make_adamw(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)

    # -- resume: weights, optimizer, step, run folder, log, random state --------------------------------------------
    resume = dist.on_every_rank(find_resume, cfg)
    dist.on_every_rank(check_process_split, cfg, resume, world, len(td.dataset))  # the same split, or one line
    if resume.state is not None:
        dist.on_every_rank(load_weights, model, resume.state, "model", resume.path, cfg)
        if "opt" in resume.state:
            opt.load_state_dict(resume.state["opt"])
    ema = EMA(model)  # an exact copy of the model (the reference's update_ema(decay=0))
    if resume.state is not None:
        load_weights(ema.model, resume.state, "ema", resume.path, cfg)
    step = resume.step
    run_dir, lock = dist.on_every_rank(prepare_run_dir, cfg, resume, model, info.is_main, on_exit)
    on_exit.enter_context(names_the_last_checkpoint(run_dir))  # a full disk anywhere: one line naming the last good one
    config = {**cfg.as_dict(), "model_config": model.config(), "world_size": world, "run_dir": str(run_dir)}
    logger = _start_log(cfg, config, run_dir, model, resume, td.notes, info, on_exit)
    logger.total_steps = max_steps  # progress and ETA on the log lines
    _log_the_plan(cfg, model, local_batch, max_steps, device, logger)
    if hasattr(td.dataset, "log_skips_to"):
        td.dataset.log_skips_to(logger.log_path)  # unreadable images skipped, by any process: in log.txt too
    loader, sampler = data.make_loader(td.dataset, local_batch, world, rank, cfg.global_seed, cfg.num_workers, device)

    # -- the step: the objective (flow matching or MeanFlow, + the dispersive term), DDP, compile ----------------------
    regularizer = build_regularizer(model, cfg)  # hooks on the unwrapped model, before DDP and compile wrap it
    objective = build_objective(cfg, transport, regularizer)
    dispersion = DispersionWatch(model, cfg, regularizer)  # diagnostics of the (would-be) regularised blocks
    net = _wrap(model, world, device, cfg.compile)
    options = StepOptions.of(cfg)
    encode = td.codec.encode if td.codec is not None and td.codec.spec != "none" else None
    model.train()

    # -- loop -------------------------------------------------------------------------------------------------------
    means = RunningMeans(device)  # loss, flow, disp (and each block's) over the updating steps since the last log
    watch = NonFiniteWatch(device, resume.path, resume.state)  # names a checkpoint that was not finite
    skipped = int(resume.state.get("skipped_steps", 0)) if resume.state is not None else 0
    t_log, log_start = time.time(), step
    if step >= max_steps:
        logger.info(f"nothing to do: step {step} >= {max_steps}")
    poll = preemption.StopPoll(cfg.ckpt_every_minutes, world)  # from here a signal stops after the current step
    while step < max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, offset * local_batch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if encode is not None:
                x = encode(x, sample=True)
            dispersion.before_step((step + 1) % cfg.log_every == 0 or step + 1 == max_steps)
            out = train_step(net, objective, opt, ema, x, y, options, step=step)
            step += 1
            if options.skip_nonfinite and not out.updated:
                skipped += 1
                logger.warning(f"step {step}: non-finite {nonfinite_term(out)}; step skipped (--on-nonfinite skip)")
            else:
                watch.record(step, out)
            if out.updated:
                means.add({"loss": out.loss, "flow": out.flow, "disp": out.disp, **_prefixed("disp/", out.layers)})

            # -- housekeeping: log line, checkpoint, stop on a signal, sample grid ----------------------------------
            last = step == max_steps
            stop = poll.poll()  # one small collective: a stop signal or --ckpt-every-minutes on any process
            if step % cfg.log_every == 0 or last:
                watch.check()
                dt = time.time() - t_log
                logger.log_metrics(step, {
                    **means.pop(world), **_mean_over_ranks(dispersion.collect(), world), "steps_per_sec": (step - log_start) / dt,
                    "images_per_sec": (step - log_start) * cfg.global_batch_size / dt, "lr": opt.param_groups[0]["lr"],
                    "grad_norm": float(out.grad_norm), "epoch": epoch, "peak_mem_gb": peak_memory_gb(device),
                    "skipped_steps": skipped,
                })  # fmt: skip
                t_log, log_start = time.time(), step
            if step % cfg.ckpt_every == 0 or last or stop.save:
                watch.check()
                saved = save_training_checkpoint(
                    run_dir, step, epoch, model, ema, opt, config, device, world, skipped, logger, lock
                )
                poll.saved()
            if stop.signum and not last:
                stopped = preemption.Stopped(stop.signum, step, saved)
                logger.warning(str(stopped))
                raise stopped
            if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or last):
                watch.check()
                _sample_grid(
                    ema.model if cfg.sample_weights == "ema" else model, td.grid_codec, transport, cfg,
                    run_dir / "samples" / f"{step:07d}.png", device, logger,
                )  # fmt: skip
            if step >= max_steps:
                break
    logger.info(f"done at step {step}")
    if info.is_main and (curve := plot_run(run_dir)) is not None:
        logger.info(f"wrote {curve}")
    logger.close()
    dist.barrier()
    return run_dir


def _start_log(cfg: TrainConfig, config: dict, run_dir: Path, model, resume, notes: list, info, on_exit):
    """The run's logger (closed by `on_exit`), config.json (rank 0), and the opening lines of log.txt."""
    from disploss.training.run.log import RunLogger

    logger = RunLogger(
        run_dir, resume_step=resume.step or None, wandb=cfg.wandb, wandb_config=config, tensorboard=cfg.tensorboard
    )
    on_exit.callback(logger.close)
    if info.is_main:
        from disploss.fileio import atomic_write_json

        atomic_write_json(run_dir / "config.json", config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"run folder {run_dir}; {info.world_size} process(es) on {info.device}; {n_params:,} parameters")
    if resume.step:
        logger.info(f"resumed from {resume.path} at step {resume.step}")
    for line in resume.notes:
        logger.info(line)
    for line in [*resume.warnings, *notes]:
        logger.warning(line)
    return logger


def _wrap(model: torch.nn.Module, world: int, device: torch.device, compile: bool):
    """The model as the step calls it: DistributedDataParallel over several processes, then torch.compile."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return torch.compile(net) if compile else net


def _prefixed(prefix: str, values: dict) -> dict:
    return {prefix + k: v for k, v in values.items()}


def _mean_over_ranks(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    if not values:
        return {}
    totals = dist.all_reduce_sum(torch.stack(list(values.values()))) / world
    return {k: float(v) for k, v in zip(values, totals)}


def _log_the_plan(cfg: TrainConfig, model, local_batch: int, max_steps: int, device, logger) -> None:
    """Before the first step: the preset, the step's cost on this device (a warning when it would take minutes),
    the EMA's horizon against the run's length, and what MeanFlow's logged losses are."""
    from disploss.training import presets
    from disploss.training.ema import horizon_warning
    from disploss.training.run import cost

    if not logger.enabled:  # rank 0 says it
        return
    if (line := presets.describe(cfg)) is not None:
        logger.info(line)
    estimate = cost.estimate(model.config(), local_batch, cfg, device)
    logger.info(cost.cost_line(estimate, cfg, model.config(), local_batch, device))
    for warning in (cost.slow_step_warning(estimate, cfg, device),
                    horizon_warning(max_steps, cfg.ema_decay, cfg.ema_warmup_power)):  # fmt: skip
        if warning is not None:
            logger.warning(warning)
    if cfg.objective == "meanflow":
        mf = cfg.meanflow
        logger.console_labels = {"loss": "loss (weighted)", "flow": "mse"}
        logger.info(
            f"MeanFlow: 'loss (weighted)' is the adaptively weighted loss ||delta||^2 / (||delta||^2 + {mf.weight_c:g})"
            f"^{mf.weight_p:g} per sample{' + lambda x dispersive' if cfg.disp else ''}, about 1 while ||delta||^2 >> "
            f"{mf.weight_c:g}, so it barely moves; 'mse' (metrics.jsonl: flow) is the unweighted mean squared error "
            "to the target, the one to watch"
        )


@torch.no_grad()
def _sample_grid(weights, codec, transport, cfg: TrainConfig, path: Path, device, logger) -> None:
    """Rank 0 writes a class-conditional grid from `weights` (the EMA, or the model with --sample-weights model;
    disploss.sampling.grid.training_grid)."""
    from disploss.sampling.grid import grid_labels, training_grid, training_grid_sampler

    if dist.is_main():
        start = time.time()
        classes, per_row = grid_labels(cfg.num_classes)
        which = "the EMA weights" if cfg.sample_weights == "ema" else "the model's raw weights (--sample-weights model)"
        described = training_grid_sampler(weights, cfg.sample_steps, cfg.cfg_scale)[2]
        logger.info(f"sampling grid {path.name}: {len(classes) * per_row} images from {which}, {described}")
        training_grid(
            weights, codec, transport, num_classes=cfg.num_classes, cfg_scale=cfg.cfg_scale,
            sample_steps=cfg.sample_steps, seed=cfg.global_seed, path=path, device=device,
        )  # fmt: skip
        logger.log_image("samples", str(path), int(path.stem))
        logger.info(f"wrote sample grid {path} in {time.time() - start:.0f} s")
    dist.barrier()
