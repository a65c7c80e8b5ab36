"""The sampling sections of `disploss bench` (see benchmarks.bench.sections): `sample`, each sampler's images/s
and model calls per image, and `paths`, the sampling code paths (per-image step control, fixed steps, compile,
bf16) against the previous default, interleaved batch by batch."""

from __future__ import annotations

import importlib
import statistics
import time

import torch

from benchmarks.bench.config import BenchConfig
from benchmarks.bench.harness import MFU, log, sync, time_interleaved


def bench_sampling(cfg: BenchConfig, model, device, macs: float, mfu: MFU) -> dict:
    """Images/s and model evaluations per image of each sampler (no guidance), NFE counted by a wrapper."""
    from disploss.transport import Sampler, create_transport

    model.eval()
    net = torch.compile(model) if cfg.compile else model
    bf16 = cfg.precision == "bf16"
    calls, batches_started = [0], [1]

    def model_fn(x, t, y):
        calls[0] += 1
        if cfg.max_nfe and calls[0] > cfg.max_nfe * batches_started[0]:
            raise _TooManyCalls
        if not bf16:
            return net(x, t, y)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return net(x, t, y).float()  # the solver integrates in float32 (as `disploss sample` does)

    sampler = Sampler(create_transport())

    def ode(method, **kw):
        return sampler.sample_ode(sampling_method=method, num_steps=cfg.sample_steps, keep_trajectory=False, **kw)

    fns = {
        "dopri5": ode("dopri5"), "dopri5-batch": ode("dopri5", step_control="batch"), "euler": ode("euler"),
        "heun2": ode("heun2"), "ab2": ode("ab2"), "ab3": ode("ab3"),
        "sde-euler": sampler.sample_sde(sampling_method="Euler", num_steps=cfg.sample_steps),
    }  # fmt: skip
    B, C, S = cfg.sample_batch, cfg.in_channels, cfg.input_size
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(B, C, S, S, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (B,), generator=gen).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(cfg.warmup, 1)):  # compiles the eval graph with --compile
            model_fn(x, torch.rand(B, device=device), y)
    sync(device)
    out: dict = {"batch": B, "batches": cfg.sample_batches, "num_steps": cfg.sample_steps, "cfg_scale": 1.0,
                 "warmup_s": time.perf_counter() - t0}  # fmt: skip
    log(f"sample: batch {B}, {cfg.sample_batches} batch(es) per sampler, {cfg.sample_steps} grid points")
    for name in cfg.sampler_list:
        try:
            if name == "dopri5":
                importlib.import_module("torchdiffeq")
        except ImportError:
            out[name] = {"status": "skipped: torchdiffeq is not installed"}
            log(f"  {name:<10} skipped: torchdiffeq is not installed")
            continue
        calls[0] = 0
        sync(device)
        t0 = time.perf_counter()
        try:
            for b in range(cfg.sample_batches):
                batches_started[0] = b + 1
                fns[name](x, model_fn, y=y)
        except _TooManyCalls:
            out[name] = {"status": f"stopped: more than --max-nfe {cfg.max_nfe} model calls for one batch",
                         "seconds": time.perf_counter() - t0}  # fmt: skip
            log(f"  {name:<10} {out[name]['status']}")
            continue
        sync(device)
        dt = time.perf_counter() - t0
        nfe = calls[0] / cfg.sample_batches
        images = B * cfg.sample_batches
        out[name] = {
            "images_per_sec": images / dt, "nfe_per_image": nfe, "ms_per_nfe": 1e3 * dt / calls[0],
            "seconds": dt, **mfu(2 * macs * B * calls[0] / dt),
        }  # fmt: skip
        log(f"  {name:<10} {images / dt:9.2f} img/s  NFE/image {nfe:6.0f}  {1e3 * dt / calls[0]:8.1f} ms/NFE")
    return out


def bench_paths(cfg: BenchConfig, model, device) -> dict:
    """Images/s of sampling code paths, interleaved batch by batch so that load changes hit them alike; the ratio of
    each to the previous default (dopri5 with one step size per batch, eager fp32, the small batch)."""
    from disploss.sampling.guidance import guided_model_fn
    from disploss.transport import Sampler, create_transport

    model.eval()
    small, large = cfg.paths_batch_sizes
    sampler = Sampler(create_transport())
    C, S = cfg.in_channels, cfg.input_size
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(large, C, S, S, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (large,), generator=gen).to(device)
    nfe: dict[str, list[int]] = {}

    def variant(name, method, batch, bf16=False, compile=False, **kw):
        fn, _ = guided_model_fn(model, 1.0, 3, bf16=bf16, compile=compile)
        solve = sampler.sample_ode(sampling_method=method, num_steps=11, keep_trajectory=False, **kw)
        rows = nfe.setdefault(name, [0, 0])

        def counted(xs, ts, y):
            rows[0] += len(xs)
            return fn(xs, ts, y)

        def run():
            rows[1] += batch
            with torch.no_grad():
                solve(x[:batch], counted, y=y[:batch])

        return name, (run, batch)

    variants = dict([
        variant(f"dopri5 batch-steps, eager fp32, batch {small} (previous default)", "dopri5", small,
                step_control="batch"),
        variant(f"dopri5 per-image, eager fp32, batch {small}", "dopri5", small),
        variant(f"ab2 11 points, eager fp32, batch {small}", "ab2", small),
        variant(f"ab2 11 points, eager fp32, batch {large}", "ab2", large),
        variant(f"ab2 11 points, compile fp32, batch {large}", "ab2", large, compile=True),
        variant(f"ab2 11 points, eager bf16, batch {large}", "ab2", large, bf16=True),
        variant(f"ab2 11 points, compile bf16, batch {large}", "ab2", large, bf16=True, compile=True),
    ])  # fmt: skip
    log(f"paths: {len(variants)} variants x ({max(cfg.warmup, 1)} warm-up + {cfg.steps} measured) batches, interleaved")
    times, _, warm_s = time_interleaved({k: v[0] for k, v in variants.items()}, max(cfg.warmup, 1), cfg.steps, device)
    out: dict = {"warmup_s": warm_s, "small_batch": small, "large_batch": large, "variants": []}  # in order
    base = None
    for name, (_, batch) in variants.items():
        med = statistics.median(times[name])
        rate = batch / med
        base = base or rate
        calls, images = nfe[name]
        out["variants"].append({"name": name, "images_per_sec": rate, "batch_s": med, "batch_s_all": times[name],
                                "nfe_per_image": calls / images, "ratio_to_previous": rate / base})  # fmt: skip
        log(f"  {name:<58} {rate:9.2f} img/s  {rate / base:6.2f}x  NFE/image {calls / images:5.1f}")
    return out


class _TooManyCalls(Exception):
    """A sampler went past --max-nfe model calls."""
