"""`train(cfg)`: SiT training with flow matching and, with cfg.disp, dispersive loss.

Reads top to bottom: setup, resume, data, loop {train_step, housekeeping: log line, checkpoint, sample grid}.
The step itself (forward, backward, AdamW, EMA) is `disploss.training.step.train_step`, shared with the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from disploss import distributed as dist
from disploss.errors import ConfigError
from disploss.training.config import TrainConfig, validate


def train(cfg: TrainConfig) -> Path:
    """Train; returns the run folder. See TrainConfig for the options."""
    from disploss.models import create_model, parse_model_name
    from disploss.runtime import set_precision
    from disploss.training import loader as data
    from disploss.training import state as st
    from disploss.training.ema import EMA
    from disploss.training.runlog import RunLogger
    from disploss.training.step import NonFiniteWatch, StepParts, make_adamw, nonfinite_term, train_step
    from disploss.transport import create_transport

    # -- setup ----------------------------------------------------------------------------------------------------
    info = dist.init(cfg.device)
    device, world, rank = info.device, info.world_size, info.rank
    validate(cfg, world)
    set_precision(cfg.precision)
    torch.manual_seed(cfg.global_seed * world + rank)
    local_batch = cfg.global_batch_size // world
    td = data.build_data(cfg, device)
    steps_per_epoch = data.steps_per_epoch(len(td.dataset), world, local_batch)
    _check_patch(cfg, td.input_size, parse_model_name(cfg.model)[3])
    grid_codec = td.codec
    if td.codec is None and cfg.sample_every > 0:  # cached latents: grids decode with the VAE that made them
        from disploss.data.vae import load_vae

        grid_codec = load_vae(td.dataset.vae, device)
    model = create_model(cfg.model, input_size=td.input_size, in_channels=td.in_channels, num_classes=cfg.num_classes)
    model = model.to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    transport = create_transport(cfg.path_type, cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps)
    opt = make_adamw(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)

    # -- resume -----------------------------------------------------------------------------------------------------
    resume = st.find_resume(cfg)
    if resume.state is not None:
        st.load_weights(model, resume.state, "model", resume.path, cfg)
        if "opt" in resume.state:
            opt.load_state_dict(resume.state["opt"])
    ema = EMA(model)  # an exact copy of the model (the reference's update_ema(decay=0))
    if resume.state is not None:
        st.load_weights(ema.model, resume.state, "ema", resume.path, cfg)
    step = resume.step
    run_dir = st.prepare_run_dir(cfg, resume.run_dir, model, info.is_main)
    config = {**cfg.as_dict(), "model_config": model.config(), "world_size": world, "run_dir": str(run_dir)}
    logger = RunLogger(
        run_dir, resume_step=step or None, wandb=cfg.wandb, wandb_config=config, tensorboard=cfg.tensorboard
    )
    if info.is_main:
        from disploss.fileio import atomic_write_json

        atomic_write_json(run_dir / "config.json", config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"run folder {run_dir}; {world} process(es) on {device}; {n_params:,} parameters")
    if resume.path is not None:
        logger.info(f"resumed from {resume.path} at step {step}")
    for note in td.notes:
        logger.warning(note)

    # -- data and the step --------------------------------------------------------------------------------------------
    loader, sampler = data.make_loader(td.dataset, local_batch, world, rank, cfg.global_seed, cfg.num_workers, device)
    if resume.state is not None and "rng" in resume.state:
        st.restore_rng(resume.state["rng"], rank, world, device, logger)
    max_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    logger.total_steps = max_steps  # progress and ETA on the log lines
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        net = torch.compile(net)
    model.train()
    parts = StepParts(
        net=net, objective=flow_objective(transport, cfg), opt=opt, ema=ema, device=device, precision=cfg.precision,
        params=[p for p in model.parameters() if p.requires_grad], grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
        skip_nonfinite=cfg.on_nonfinite == "skip",
    )  # fmt: skip
    encode = td.codec.encode if td.codec is not None and td.codec.spec != "none" else None

    # -- loop -------------------------------------------------------------------------------------------------------
    sums = torch.zeros(4, device=device)  # loss, flow, disp, steps that updated the weights since the last log line
    watch = NonFiniteWatch(device)
    skipped = int(resume.state.get("skipped_steps", 0)) if resume.state is not None else 0
    t_log, log_start, out = time.time(), step, None
    if step >= max_steps:
        logger.info(f"nothing to do: step {step} >= {max_steps}")
    while step < max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_position(epoch, offset * local_batch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if encode is not None:
                x = encode(x, sample=True)
            out = train_step(parts, x, y)
            step += 1
            if parts.skip_nonfinite and not out.updated:
                skipped += 1
                logger.warning(f"step {step}: non-finite {nonfinite_term(out)}; step skipped (--on-nonfinite skip)")
            else:
                watch.record(step, out)
            if out.updated:
                sums += torch.stack([out.loss, out.flow, out.disp, torch.ones((), device=device)])

            # -- housekeeping ---------------------------------------------------------------------------------------
            last = step == max_steps
            if step % cfg.log_every == 0 or last:
                watch.check()
                totals = dist.all_reduce_sum(sums) / world
                n, dt = float(totals[3]), time.time() - t_log  # n: steps averaged (skipped ones are not)
                mean = [float(v) / n if n else float("nan") for v in totals[:3]]
                logger.log_metrics(step, {
                    "loss": mean[0], "flow": mean[1], "disp": mean[2], "steps_per_sec": (step - log_start) / dt,
                    "images_per_sec": (step - log_start) * cfg.global_batch_size / dt, "lr": opt.param_groups[0]["lr"],
                    "grad_norm": float(out.grad_norm), "epoch": epoch, "peak_mem_gb": st.peak_memory_gb(device),
                    "skipped_steps": skipped,
                })  # fmt: skip
                sums.zero_()
                t_log, log_start = time.time(), step
            if step % cfg.ckpt_every == 0 or last:
                watch.check()
                st.save_training_checkpoint(
                    run_dir, step, epoch, model, ema, opt, config, device, world, skipped, logger
                )
            if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or last):
                watch.check()
                _sample_grid(
                    ema.model, grid_codec, transport, cfg, run_dir / "samples" / f"{step:07d}.png", device, logger
                )
            if step >= max_steps:
                break
    logger.info(f"done at step {step}")
    logger.close()
    dist.barrier()
    return run_dir


def flow_objective(transport, cfg: TrainConfig):
    """The training objective of a run: flow matching (or score / noise) plus lambda * dispersive on one block."""
    disp = dict(
        disp_weight=cfg.disp_weight if cfg.disp else 0.0, disp_tau=cfg.disp_tau, disp_variant=cfg.disp_variant,
        disp_block=cfg.disp_block, disp_gather=cfg.disp_gather, disp_margin=cfg.disp_margin,
    )  # fmt: skip

    def objective(net, x, y):
        return transport.training_losses(net, x, dict(y=y), **disp)

    return objective


def _check_patch(cfg: TrainConfig, input_size: int, patch: int) -> None:
    if input_size % patch:
        factor = cfg.image_size // input_size
        unit = factor * patch
        near = " or ".join(str(k * unit) for k in (cfg.image_size // unit, cfg.image_size // unit + 1) if k > 0)
        raise ConfigError(
            f"--image-size {cfg.image_size} gives latents of side {input_size} (VAE factor {factor}), which the patch "
            f"size {patch} of --model {cfg.model} does not divide; valid sizes nearby: {near}"
        )


@torch.no_grad()
def _sample_grid(ema_model, codec, transport, cfg: TrainConfig, path: Path, device, logger) -> None:
    """Rank 0 writes a class-conditional grid from the EMA weights (disploss.sampling.grid.training_grid)."""
    from disploss.sampling.grid import grid_labels, training_grid

    if dist.is_main():
        start = time.time()
        classes, per_row = grid_labels(cfg.num_classes)
        logger.info(f"sampling grid {path.name}: {len(classes) * per_row} images from the EMA weights, Heun ODE with "
                    f"{cfg.sample_steps} grid points ({2 * (cfg.sample_steps - 1)} model calls), cfg {cfg.cfg_scale}")  # fmt: skip
        training_grid(
            ema_model, codec, transport, num_classes=cfg.num_classes, cfg_scale=cfg.cfg_scale,
            sample_steps=cfg.sample_steps, seed=cfg.global_seed, path=path, device=device,
        )  # fmt: skip
        logger.log_image("samples", str(path), int(path.stem))
        logger.info(f"wrote sample grid {path} in {time.time() - start:.0f} s")
    dist.barrier()
