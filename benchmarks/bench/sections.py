"""The benchmark (`disploss bench`, or `python -m benchmarks.bench` from the repository root): throughput of
training, of the dispersive term and of sampling; MFU on CUDA.

Sections (--sections, all by default):
  train   a full training step, the very `train_step` that `disploss train` runs (forward, backward, gradient
          norm, non-finite check, AdamW, EMA), on
          synthetic latents, with and without the dispersive term (the last block; with --disp-blocks also
          other blocks, e.g. all), interleaved step by step so that all variants see the same machine load;
          images/s, peak memory, the dispersive term's share of the step and each regulariser's step-time ratio
          against none; with --reference-path also the reference code's model and loss, side by side; with
          --meanflow also the step of `train --objective meanflow` (benchmarks.bench.meanflow).
  disp    the dispersive loss alone (forward + backward): ours against the reference's formula.
  sample  sampling images/s and model evaluations (NFE) per image for each sampler, counted by a wrapper
          (this section and `paths`: benchmarks.bench.sampling).
  profile training steps (the train section's, without the dispersive term) under torch.profiler: the ops by
          device time and their share in groups (attention, matmuls, optimizer, the rest), a Chrome trace beside --json.
  paths   the code paths of sampling against the previous default, interleaved batch by batch in one run: adaptive
          dopri5 with one step size per batch (the previous default) and per image (the default now), and the
          fixed-step ab2 (11 grid points) eager fp32 at a small and a large batch, with torch.compile, with bf16.

FLOPs convention (stated once): models.forward_flops gives multiply-accumulates (MACs) of one forward pass
of one image, the DiT "Gflops" number. One MAC = 2 FLOPs; a training step costs 3 forward passes (forward,
and a backward of twice the forward), so training FLOPs per image = 3 x 2 x MACs, and sampling FLOPs per
model evaluation = 2 x MACs per image. Activation recomputation (--grad-checkpointing), attention softmax,
norms, the loss and the optimizer are not counted (model FLOPs, not hardware FLOPs). MFU = achieved model
FLOP/s / peak; the default peak is the H100/H200 SXM dense datasheet value for the precision (bf16 989,
TF32 494.7, FP32 66.9 TFLOP/s); bf16 runs are also reported against the ~790 TFLOP/s that an H100 reaches
in practice (docs/paper.md).

Weights: the models are randomly initialised, and the layers that the reference zero-initialises (adaLN
and the final layer, whose output is exactly 0 at init) are re-drawn from N(0, 0.02), so the field is not
trivially zero; the NFE of the adaptive dopri5 solver therefore describes a random network, not a trained one.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch

from benchmarks.bench.config import BenchConfig, block_specs
from benchmarks.bench.harness import (
    DATASHEET_PEAK_TFLOPS,
    MFU,
    loadavg,
    log,
    meta,
    redraw_zero_init,
    sync,
    time_fn,
    time_interleaved,
)
from benchmarks.bench.reference import reference_training
from benchmarks.bench.sampling import bench_paths, bench_sampling
from disploss.runtime import autocast, set_precision


def bench(cfg: BenchConfig) -> dict:
    """Run the chosen sections; returns the report (plain JSON types). Global torch settings (threads, TF32)
    are restored afterwards."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        return _bench(cfg)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def _bench(cfg: BenchConfig) -> dict:
    from disploss.models import create_model, forward_flops

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = cfg.threads or (1 if cfg.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    set_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    model = None
    if {"train", "sample", "paths", "profile"} & set(cfg.section_list):
        with device:  # built on the device: initialising SiT-XL/2 on the host takes many seconds
            model = create_model(
                cfg.model, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes
            )
        redraw_zero_init(model, cfg.seed)
        model.grad_checkpointing = cfg.grad_checkpointing
    macs = forward_flops(model.config()) if model is not None else None
    peak = cfg.peak_tflops or DATASHEET_PEAK_TFLOPS[cfg.precision]
    report = {
        "meta": meta(cfg, device, model, macs, peak),
        "config": dataclasses.asdict(cfg),
    }
    what = (f"{cfg.model} {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, {macs / 1e9:.2f} GMACs/image forward"
            if model is not None else "no model")  # fmt: skip
    log(f"{what}; {cfg.precision}{' + compile' if cfg.compile else ''} on {report['meta']['device_name']}")
    mfu = MFU(device, cfg.precision, peak)
    if "train" in cfg.section_list:
        report["train"] = bench_train(cfg, model, device, macs, mfu)
    if "disp" in cfg.section_list:
        report["dispersive"] = bench_dispersive(cfg, device)
    if "sample" in cfg.section_list:
        report["sampling"] = bench_sampling(cfg, model, device, macs, mfu)
    if "paths" in cfg.section_list:
        report["paths"] = bench_paths(cfg, model, device)
    if "profile" in cfg.section_list:
        report["profile"] = bench_profile(cfg, model, device)
    report["meta"]["load_average_end"] = loadavg()
    return report


# -- training ---------------------------------------------------------------------------------------------
def bench_train(cfg: BenchConfig, model, device, macs: float, mfu: MFU) -> dict:
    """Full training steps (disploss.training.step.train_step, what `disploss train` runs), with and without the
    dispersive term (and the reference's, with --reference-path)."""
    from disploss.errors import ConfigError
    from disploss.training import TrainConfig
    from disploss.training.config import disp_blocks
    from disploss.training.ema import EMA
    from disploss.training.objective import Objective, build_regularizer
    from disploss.training.step import StepOptions, train_step
    from disploss.transport import create_transport

    model.train()
    B, C, S = cfg.batch, cfg.in_channels, cfg.input_size
    x = torch.randn(B, C, S, S, device=device)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    transport = create_transport()
    opt = _adamw(model.parameters(), cfg.adamw)
    ema = EMA(model)
    net = torch.compile(model) if cfg.compile else model
    options = StepOptions(precision=cfg.precision)

    # The regularisers of `disploss train --disp` (last block: ours_disp) and of `--disp-block SPEC` for each
    # --disp-blocks value (ours_disp[SPEC]); each is enabled only during the steps of its variant.
    specs = {"ours_disp": "-1", **{f"ours_disp[{spec}]": spec for spec in block_specs(cfg.disp_blocks)}}
    for spec in specs.values():
        try:
            disp_blocks(spec, len(model.blocks), cfg.model)
        except ConfigError as err:
            raise ConfigError(f"--disp-blocks: {err}") from None
    regularizers = {
        name: build_regularizer(model, TrainConfig(
            model=cfg.model, disp=True, disp_block=spec, disp_weight=cfg.disp_weight, disp_tau=cfg.disp_tau,
            precision=cfg.precision, compile=cfg.compile, grad_checkpointing=cfg.grad_checkpointing))
        for name, spec in specs.items()
    }  # fmt: skip

    def ours(variant: str) -> Callable[[], None]:
        objective = Objective(transport, regularizers.get(variant))

        def step() -> None:
            for name, regularizer in regularizers.items():
                regularizer.enabled = name == variant
            regularised[variant] = list(train_step(net, objective, opt, ema, x, y, options).layers)

        return step

    regularised: dict[str, list[str]] = {}  # the layers each variant's last step regularised

    selected = {f"ours_{v}" for v in cfg.train_variants.split(",")}  # --train-variants; --disp-blocks always
    variants = {name: ours(name) for name in ("ours_nodisp", *regularizers) if name in selected or "[" in name}
    if cfg.meanflow:  # the MeanFlow step beside the flow step, same batch (benchmarks.bench.meanflow)
        from benchmarks.bench import meanflow as mf_bench

        mf_steps, mf_parts = mf_bench.meanflow_variants(cfg, model, x, y, device, lambda p: _adamw(p, cfg.adamw))
        variants.update(mf_steps)
    reference = {"status": "not requested (--reference-path)"}
    if cfg.reference_path:
        reference = reference_training(cfg, model, x, y, device, autocast(device, cfg.precision))
        variants.update(reference.pop("steps", {}))

    log(
        f"train: batch {B}, {len(variants)} variants x ({cfg.warmup} warm-up + {cfg.steps} measured) steps, interleaved"
    )
    times, mems, warm_s = time_interleaved(variants, cfg.warmup, cfg.steps, device)
    flops_per_step = 3 * 2 * macs * B
    out: dict = {"batch": B, "train_flops_per_image": 6 * macs, "warmup_s": warm_s}
    for name in variants:
        med, best = statistics.median(times[name]), min(times[name])
        out[name] = {
            "step_ms": 1e3 * med, "step_ms_min": 1e3 * best, "step_ms_all": [1e3 * t for t in times[name]],
            "images_per_sec": B / med, "images_per_sec_best": B / best, "peak_mem_gb": mems[name],
            "regularised_layers": regularised.get(name),
            **mfu(flops_per_step / med),
        }  # fmt: skip
        log(f"  {name:<18} {1e3 * med:9.1f} ms/step (min {1e3 * best:.1f})  {B / med:9.1f} img/s  "
             f"peak {mems[name]:.2f} GB")  # fmt: skip
    if {"ours_nodisp", "ours_disp"} <= set(variants):  # (with --train-variants nodisp alone: no share to give)
        _dispersive_share(cfg, model, out, times, variants, regularizers, device, B)
    if "reference_nodisp" in out:
        for kind, key in (("", "step_ms"), ("_min", "step_ms_min")):
            reference[f"speedup_nodisp{kind}"] = out["reference_nodisp"][key] / out["ours_nodisp"][key]
            reference[f"speedup_disp{kind}"] = out["reference_disp"][key] / out["ours_disp"][key]
        log(f"  reference / ours step time: {reference['speedup_nodisp']:.2f}x without disp, "
             f"{reference['speedup_disp']:.2f}x with (minima: {reference['speedup_nodisp_min']:.2f}x, "
             f"{reference['speedup_disp_min']:.2f}x)")  # fmt: skip
    else:
        log(f"  reference: {reference['status']}")
    out["reference"] = reference
    if cfg.meanflow:
        params = {
            "ours_nodisp": [p for p in model.parameters() if p.requires_grad],
            "ours_meanflow": list(mf_parts["model"].parameters()),
        }
        out["meanflow"] = mf_bench.summarise(out, variants, params, log)
        mf_parts["regularizer"].remove()
        del mf_parts
    for regularizer in regularizers.values():
        regularizer.remove()
    model.zero_grad(set_to_none=True)  # frees the gradients (and with the optimizer, its state) before sampling
    return out


def _dispersive_share(cfg, model, out: dict, times: dict, variants: dict, regularizers: dict, device, B: int) -> None:
    """The dispersive term's share of the step (three estimates) and each regulariser's step-time ratios."""
    from disploss.dispersive import dispersive_loss

    # The dispersive term alone at this model's activation shape (B, T, D): a less noisy share than the difference.
    z = torch.randn(B, model.x_embedder.num_patches, model.hidden_size, device=device, requires_grad=True)
    t_disp = time_fn(lambda: dispersive_loss(z, tau=cfg.disp_tau).backward(), cfg.warmup, cfg.steps, device)
    t_with, t_without = out["ours_disp"]["step_ms"], out["ours_nodisp"]["step_ms"]
    out["disp_term_ms"] = 1e3 * t_disp
    # Three estimates of the term's share: the difference of the step medians and of the step minima (both
    # noisy on a loaded machine, where they can even come out negative), and the loss alone over the step.
    out["disp_share_of_step"] = (t_with - t_without) / t_with
    out["disp_share_of_step_min"] = 1 - out["ours_nodisp"]["step_ms_min"] / out["ours_disp"]["step_ms_min"]
    out["disp_term_share_of_step"] = 1e3 * t_disp / t_with
    log(f"  dispersive term share of the step: {100 * out['disp_share_of_step']:.1f}% (medians), "
         f"{100 * out['disp_share_of_step_min']:.1f}% (minima), {100 * out['disp_term_share_of_step']:.1f}% "
         f"(the loss alone, {1e3 * t_disp:.2f} ms fwd+bwd)")  # fmt: skip
    # Each regulariser's cost as step-time ratios against no regulariser (the ratio within each round is the least
    # noisy: both steps of a round see nearly the same load).
    out["overhead"] = {name: _overhead(times[name], times["ours_nodisp"]) for name in regularizers}
    for name, regularizer in regularizers.items():
        over = out["overhead"][name]
        over["blocks"] = len(regularizer.layer_names)
        over["loss_alone_share_of_step"] = over["blocks"] * t_disp / statistics.median(times[name])
        log(f"  {name:<18} / ours_nodisp step time: {over['ratio_paired']:.3f} (per round; quartiles "
             f"{over['ratio_paired_q1']:.3f}-{over['ratio_paired_q3']:.3f}), {over['ratio_medians']:.3f} (medians), "
             f"{over['ratio_minima']:.3f} (minima); {over['blocks']} block(s), the loss alone "
             f"{100 * over['loss_alone_share_of_step']:.1f}% of the step")  # fmt: skip


def _overhead(with_s: list[float], without_s: list[float]) -> dict:
    """Step-time ratios with / without a regulariser from interleaved timings (round i of both lists is one
    round): of the medians, of the minima, and the median and quartiles of the per-round ratios."""
    paired = [w / o for w, o in zip(with_s, without_s)]
    q1, q2, q3 = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
    return {
        "ratio_medians": statistics.median(with_s) / statistics.median(without_s),
        "ratio_minima": min(with_s) / min(without_s),
        "ratio_paired": q2, "ratio_paired_q1": q1, "ratio_paired_q3": q3,
    }  # fmt: skip


# -- dispersive loss alone --------------------------------------------------------------------------------
def bench_dispersive(cfg: BenchConfig, device) -> dict:
    """Forward + backward of dispersive_loss vs the reference formula on z (B, M) float32 (as the residual
    stream is, also under bf16 autocast)."""
    from disploss.dispersive import dispersive_loss, reference_infonce_l2

    B, M = cfg.disp_batch, cfg.disp_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(B, M, generator=gen).to(device).requires_grad_(True)
    fns = {
        "ours": lambda: dispersive_loss(z, tau=1.0).backward(),
        "reference": lambda: reference_infonce_l2(z).backward(),
    }
    log(f"disp: B={B}, M={M}, forward + backward, {cfg.warmup} warm-up + {cfg.steps} measured, interleaved")
    times, mems, _ = time_interleaved(fns, cfg.warmup, cfg.steps, device)
    with torch.no_grad():
        ours_v, ref_v = dispersive_loss(z).item(), reference_infonce_l2(z).item()
    out = {"B": B, "M": M, "dtype": "float32", "ours_value": ours_v, "reference_value": ref_v,
           "abs_diff": abs(ours_v - ref_v)}  # fmt: skip
    for name in fns:
        out[f"{name}_ms"] = 1e3 * statistics.median(times[name])
        out[f"{name}_ms_min"] = 1e3 * min(times[name])
        out[f"{name}_ms_all"] = [1e3 * t for t in times[name]]
        out[f"{name}_peak_mem_gb"] = mems[name]
    out["speedup"] = out["reference_ms"] / out["ours_ms"]
    log(f"  ours {out['ours_ms']:.2f} ms, reference formula {out['reference_ms']:.2f} ms: "
         f"{out['speedup']:.2f}x; values {ours_v:.6f} vs {ref_v:.6f}")  # fmt: skip
    return out


def bench_profile(cfg: BenchConfig, model, device) -> dict:
    """cfg.profile_steps training steps (no dispersive term) under torch.profiler after cfg.warmup steps."""
    from torch.profiler import ProfilerActivity, profile

    from disploss.training.ema import EMA
    from disploss.training.objective import Objective
    from disploss.training.step import StepOptions, train_step
    from disploss.transport import create_transport

    model.train()
    B, C, S = cfg.batch, cfg.in_channels, cfg.input_size
    x = torch.randn(B, C, S, S, device=device)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    net = torch.compile(model) if cfg.compile else model
    parts = (net, Objective(create_transport()), _adamw(model.parameters(), cfg.adamw), EMA(model))
    options = StepOptions(precision=cfg.precision)
    for _ in range(max(cfg.warmup, 1)):
        train_step(*parts, x, y, options)
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    log(f"profile: {cfg.profile_steps} steps of batch {B} under torch.profiler")
    with profile(activities=activities) as prof:
        for _ in range(cfg.profile_steps):
            train_step(*parts, x, y, options)
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    groups = {"attention": ("attention", "sdpa", "flash", "fmha", "cudnn_attn"),
              "matmul": ("mm", "gemm", "matmul", "linear", "cutlass", "sm90", "sm80", "nvjet"),
              "optimizer": ("adam", "_foreach", "multi_tensor"), "ema": ("lerp",)}  # fmt: skip
    shares = {g: 0.0 for g in (*groups, "other")}
    for e in events:
        group = next((g for g, keys in groups.items() if any(k in e.key.lower() for k in keys)), "other")
        shares[group] += getattr(e, key) / total
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:25]
    table = [{"name": e.key, "share": getattr(e, key) / total, "ms_per_step": getattr(e, key) / 1e3 / cfg.profile_steps,
              "calls_per_step": e.count / cfg.profile_steps} for e in top]  # fmt: skip
    log("  device-time shares: " + ", ".join(f"{g} {100 * v:.1f}%" for g, v in shares.items()))
    for row in table[:15]:
        log(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.2f} ms/step  {row['name'][:90]}")
    if cfg.json:
        trace = f"{cfg.json.removesuffix('.json')}.trace.json.gz"  # not *.json: summarize.py reads those
        prof.export_chrome_trace(trace)
        log(f"  Chrome trace: {trace}")
    model.zero_grad(set_to_none=True)
    return {"steps": cfg.profile_steps, "time_key": key, "shares": shares, "top": table,
            "ms_per_step_profiled": total / 1e3 / cfg.profile_steps}  # fmt: skip


def _adamw(params, impl: str) -> torch.optim.Optimizer:
    from disploss.training.step import make_adamw

    kwargs = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0}
    if impl == "auto":  # what `disploss train` uses
        return make_adamw(params, **kwargs)
    if impl == "fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=impl == "foreach", **kwargs)
