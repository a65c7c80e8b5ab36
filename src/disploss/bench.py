"""`disploss bench`: throughput of training, of the dispersive term and of sampling; MFU on CUDA.

Sections (--sections, all by default):
  train   a full training step as `disploss train` runs it (forward, backward, gradient norm, AdamW, EMA) on
          synthetic latents, with and without the dispersive term, interleaved step by step so that both
          see the same machine load; images/s, peak memory, the dispersive term's share of the step; with
          --reference-path also the reference code's model and loss, side by side in the same process.
  disp    the dispersive loss alone (forward + backward): ours against the reference's formula.
  sample  sampling images/s and model evaluations (NFE) per image for each sampler, counted by a wrapper.

FLOPs convention (stated once): models.forward_flops gives multiply-accumulates (MACs) of one forward pass
of one image, the DiT "Gflops" number. One MAC = 2 FLOPs; a training step costs 3 forward passes (forward,
and a backward of twice the forward), so training FLOPs per image = 3 x 2 x MACs, and sampling FLOPs per
model evaluation = 2 x MACs per image. Activation recomputation (--grad-checkpointing), attention softmax,
norms, the loss and the optimizer are not counted (model FLOPs, not hardware FLOPs). MFU = achieved model
FLOP/s / peak; the default peak is the H100/H200 SXM dense datasheet value for the precision (bf16 989,
TF32 494.7, FP32 66.9 TFLOP/s); bf16 runs are also reported against the ~790 TFLOP/s that an H100 reaches
in practice (PAPER.md).

Weights: the models are randomly initialised, and the layers that the reference zero-initialises (adaLN
and the final layer, whose output is exactly 0 at init) are re-drawn from N(0, 0.02), so the field is not
trivially zero; the NFE of the adaptive dopri5 solver therefore describes a random network, not a trained one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import inspect
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
SECTIONS = ("train", "disp", "sample")
SAMPLERS = ("dopri5", "euler", "heun2", "sde-euler")
ADAMW_IMPLS = ("auto", "fused", "foreach", "for-loop")
# H100/H200 SXM dense datasheet peaks, TFLOP/s, by precision; and what an H100 reaches in practice (bf16).
DATASHEET_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}
MEASURED_PEAK_TFLOPS_BF16 = 790.0
VAE_FACTOR = 8  # SD-VAE: 256 px images -> 32 x 32 x 4 latents

# --quick: tiny settings for CI (seconds on a CPU); explicit flags still win.
QUICK = dict(model="SiT-T/2", batch=4, input_size=8, num_classes=10, steps=3, warmup=2, disp_batch=8,
             disp_dim=4096, sample_batch=2, sample_batches=1, sample_steps=4)  # fmt: skip
FULL = dict(model="SiT-XL/2", batch=32, input_size=None, num_classes=1000, steps=10, warmup=3, disp_batch=32,
            disp_dim=256 * 1152, sample_batch=None, sample_batches=1, sample_steps=50)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to measure")
    g.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    g.add_argument("--quick", action="store_true", help=f"tiny settings for CI, seconds on a CPU: {QUICK}")
    g.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    g.add_argument("--reference-path", metavar="DIR",
                   help="a checkout of the reference code (SiT / DispLoss: models.py with SiT_models, needs timm): "
                        "time its model and loss beside ours in the train section")  # fmt: skip
    m = parser.add_argument_group("model and data")
    m.add_argument("--model", help=f"model preset (default {FULL['model']}; --quick {QUICK['model']})")
    m.add_argument("--batch", type=int, help=f"training batch per device (default {FULL['batch']})")
    size = m.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, help=f"image side in pixels; latents are image/{VAE_FACTOR} (default 256)")
    size.add_argument("--input-size", type=int, help="latent (model input) side, instead of --image-size")
    m.add_argument("--in-channels", type=int, default=4, help="model input channels (default: %(default)s)")
    m.add_argument("--num-classes", type=int, help=f"classes (default {FULL['num_classes']})")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    r = parser.add_argument_group("how to run")
    r.add_argument("--precision", choices=PRECISIONS, default="tf32",
                   help="fp32, tf32 (fp32 with TF32 matmuls, the reference) or bf16 autocast (default: %(default)s)")  # fmt: skip
    r.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model (the warm-up then compiles)")
    r.add_argument("--adamw", choices=ADAMW_IMPLS, default="auto",
                   help="AdamW implementation; auto = what `disploss train` uses (fused where torch has it)")  # fmt: skip
    r.add_argument("--steps", type=int, help=f"measured steps per variant (default {FULL['steps']})")
    r.add_argument("--warmup", type=int, help=f"warm-up steps per variant, not measured (default {FULL['warmup']})")
    r.add_argument("--threads", type=int,
                   help="CPU threads of torch (default: torch's; --quick on a CPU: 1, since two threads on a loaded "
                        "2-core machine can be 10-100x slower while OpenMP waits for a descheduled thread)")  # fmt: skip
    r.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    r.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s for MFU (default: H100/H200 dense datasheet for the precision: "
                        "bf16 989, tf32 494.7, fp32 66.9)")  # fmt: skip
    d = parser.add_argument_group("dispersive term")
    d.add_argument("--disp-weight", type=float, default=0.25, help="lambda (default: %(default)s, the reference's)")
    d.add_argument("--disp-tau", type=float, default=1.0, help="temperature (default: %(default)s)")
    d.add_argument("--disp-batch", type=int, help=f"B of the loss-alone timing (default {FULL['disp_batch']})")
    d.add_argument("--disp-dim", type=int, help=f"M = T*D of the loss-alone timing (default {FULL['disp_dim']} = 256*1152)")
    s = parser.add_argument_group("sampling")
    s.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)} (default: all)")
    s.add_argument("--sample-batch", type=int, help="sampling batch (default: --batch)")
    s.add_argument("--sample-batches", type=int, help="measured batches per sampler (default 1)")
    s.add_argument("--max-nfe", type=int,
                   help="stop a sampler after this many model calls per batch and report it (guards the adaptive "
                        "dopri5, whose NFE has no bound; default: no limit)")  # fmt: skip
    s.add_argument("--sample-steps", type=int,
                   help=f"grid points of the fixed-step samplers and the SDE (default {FULL['sample_steps']}); "
                        "dopri5 is adaptive")  # fmt: skip


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset options from the --quick or the full defaults; check the lists and sizes."""
    base = QUICK if args.quick else FULL
    out = argparse.Namespace(**vars(args))
    for key, value in base.items():
        if getattr(out, key, None) is None:
            setattr(out, key, value)
    if out.input_size is None:
        out.input_size = (out.image_size or 256) // VAE_FACTOR
    if out.sample_batch is None:
        out.sample_batch = out.batch
    out.sections = _parse_list(out.sections, SECTIONS, "--sections")
    out.samplers = _parse_list(out.samplers, SAMPLERS, "--samplers")
    for name in ("batch", "steps", "disp_batch", "disp_dim", "sample_batch", "sample_batches", "input_size", "threads",
                 "max_nfe"):  # fmt: skip
        if getattr(out, name) is not None and getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(out, name)}")
    if out.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {out.warmup}")
    if out.peak_tflops is not None and not out.peak_tflops > 0:
        raise ValueError(f"--peak-tflops must be positive, got {out.peak_tflops}")
    if out.sample_steps < 2:
        raise ValueError(f"--sample-steps must be at least 2, got {out.sample_steps}")
    return out


def _parse_list(text: str, choices: tuple[str, ...], flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in choices]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or 'empty list'}; valid choices: {', '.join(choices)}")
    return items


def run(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(args)
        from disploss.models import parse_model_name

        patch = parse_model_name(cfg.model)[3]
        if cfg.input_size % patch:
            raise ValueError(f"the input size {cfg.input_size} is not divisible by the patch size {patch} of {cfg.model}")
    except ValueError as err:
        print(f"disploss bench: error: {err}", file=sys.stderr)
        return 2
    report = bench(cfg)
    if cfg.json:
        from disploss.fileio import atomic_write_json

        atomic_write_json(cfg.json, report)
        _log(f"wrote {cfg.json}")
    return 0


# ---------------------------------------------------------------------------------------------------------
def bench(cfg: argparse.Namespace) -> dict:
    """Run the chosen sections; returns the report (plain JSON types). Global torch settings (threads, TF32)
    are restored afterwards."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        return _bench(cfg)
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def _bench(cfg: argparse.Namespace) -> dict:
    from disploss.models import create_model, forward_flops

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = cfg.threads or (1 if cfg.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    _set_precision(cfg.precision)
    torch.manual_seed(cfg.seed)
    model = None
    if {"train", "sample"} & set(cfg.sections):
        with device:  # built on the device: initialising SiT-XL/2 on the host takes many seconds
            model = create_model(
                cfg.model, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes
            )
        _redraw_zero_init(model, cfg.seed)
        model.grad_checkpointing = cfg.grad_checkpointing
    macs = forward_flops(model.config()) if model is not None else None
    peak = cfg.peak_tflops or DATASHEET_PEAK_TFLOPS[cfg.precision]
    report = {
        "meta": _meta(cfg, device, model, macs, peak),
        "config": {k: v for k, v in vars(cfg).items()},
    }
    what = (f"{cfg.model} {cfg.input_size}x{cfg.input_size}x{cfg.in_channels}, {macs / 1e9:.2f} GMACs/image forward"
            if model is not None else "no model")  # fmt: skip
    _log(f"{what}; {cfg.precision}{' + compile' if cfg.compile else ''} on {report['meta']['device_name']}")
    mfu = _MFU(device, cfg.precision, peak)
    if "train" in cfg.sections:
        report["train"] = bench_train(cfg, model, device, macs, mfu)
    if "disp" in cfg.sections:
        report["dispersive"] = bench_dispersive(cfg, device)
    if "sample" in cfg.sections:
        report["sampling"] = bench_sampling(cfg, model, device, macs, mfu)
    report["meta"]["load_average_end"] = _loadavg()
    return report


# -- training ---------------------------------------------------------------------------------------------
def bench_train(cfg, model, device, macs: float, mfu: "_MFU") -> dict:
    """Full training steps, with and without the dispersive term (and the reference's, with --reference-path)."""
    from disploss.dispersive import dispersive_loss
    from disploss.ema import EMA
    from disploss.transport import create_transport

    model.train()
    B, C, S = cfg.batch, cfg.in_channels, cfg.input_size
    x = torch.randn(B, C, S, S, device=device)
    y = torch.randint(0, cfg.num_classes, (B,), device=device)
    transport = create_transport()
    opt = _adamw(model.parameters(), device, cfg.adamw)
    ema = EMA(model)
    net = torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast(device, cfg.precision)

    def ours(disp_weight: float) -> Callable[[], None]:
        # The loop body of disploss.train, minus data loading and logging.
        def step() -> None:
            with autocast:
                terms = transport.training_losses(net, x, dict(y=y), disp_weight=disp_weight, disp_tau=cfg.disp_tau)
            loss = terms["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, math.inf)  # train.py's gradient norm (its non-finite check)
            opt.step()
            ema.update(0.9999)

        return step

    variants = {"ours_nodisp": ours(0.0), "ours_disp": ours(cfg.disp_weight)}
    reference = {"status": "not requested (--reference-path)"}
    if cfg.reference_path:
        reference = _reference_training(cfg, model, x, y, device, autocast)
        variants.update(reference.pop("steps", {}))

    _log(f"train: batch {B}, {len(variants)} variants x ({cfg.warmup} warm-up + {cfg.steps} measured) steps, interleaved")
    times, mems, warm_s = _time_interleaved(variants, cfg.warmup, cfg.steps, device)
    flops_per_step = 3 * 2 * macs * B
    out: dict = {"batch": B, "train_flops_per_image": 6 * macs, "warmup_s": warm_s}
    for name in variants:
        med, best = statistics.median(times[name]), min(times[name])
        out[name] = {
            "step_ms": 1e3 * med, "step_ms_min": 1e3 * best, "step_ms_all": [1e3 * t for t in times[name]],
            "images_per_sec": B / med, "images_per_sec_best": B / best, "peak_mem_gb": mems[name],
            **mfu(flops_per_step / med),
        }  # fmt: skip
        _log(f"  {name:<18} {1e3 * med:9.1f} ms/step (min {1e3 * best:.1f})  {B / med:9.1f} img/s  "
             f"peak {mems[name]:.2f} GB")  # fmt: skip
    # The dispersive term alone at this model's activation shape (B, T, D): a less noisy share than the difference.
    z = torch.randn(B, model.x_embedder.num_patches, model.hidden_size, device=device, requires_grad=True)
    t_disp = _time_fn(lambda: dispersive_loss(z, tau=cfg.disp_tau).backward(), cfg.warmup, cfg.steps, device)
    t_with, t_without = out["ours_disp"]["step_ms"], out["ours_nodisp"]["step_ms"]
    out["disp_term_ms"] = 1e3 * t_disp
    # Three estimates of the term's share: the difference of the step medians and of the step minima (both
    # noisy on a loaded machine, where they can even come out negative), and the loss alone over the step.
    out["disp_share_of_step"] = (t_with - t_without) / t_with
    out["disp_share_of_step_min"] = 1 - out["ours_nodisp"]["step_ms_min"] / out["ours_disp"]["step_ms_min"]
    out["disp_term_share_of_step"] = 1e3 * t_disp / t_with
    _log(f"  dispersive term share of the step: {100 * out['disp_share_of_step']:.1f}% (medians), "
         f"{100 * out['disp_share_of_step_min']:.1f}% (minima), {100 * out['disp_term_share_of_step']:.1f}% "
         f"(the loss alone, {1e3 * t_disp:.2f} ms fwd+bwd)")  # fmt: skip
    if "reference_nodisp" in out:
        for kind, key in (("", "step_ms"), ("_min", "step_ms_min")):
            reference[f"speedup_nodisp{kind}"] = out["reference_nodisp"][key] / out["ours_nodisp"][key]
            reference[f"speedup_disp{kind}"] = out["reference_disp"][key] / out["ours_disp"][key]
        _log(f"  reference / ours step time: {reference['speedup_nodisp']:.2f}x without disp, "
             f"{reference['speedup_disp']:.2f}x with (minima: {reference['speedup_nodisp_min']:.2f}x, "
             f"{reference['speedup_disp_min']:.2f}x)")  # fmt: skip
    else:
        _log(f"  reference: {reference['status']}")
    out["reference"] = reference
    model.zero_grad(set_to_none=True)  # frees the gradients (and with the optimizer, its state) before sampling
    return out


def _reference_training(cfg, model, x, y, device, autocast) -> dict:
    """The reference's model (its models.py) with the reference's loss, optimizer and EMA, as training steps.

    Returns {'status', 'forward_max_abs_diff', 'steps': {'reference_nodisp': fn, 'reference_disp': fn}} or,
    when the reference cannot be loaded, {'status': why}.
    """
    from disploss.dispersive import reference_infonce_l2

    module, why = load_reference_models(cfg.reference_path)
    if module is None:
        return {"status": why}
    if cfg.model not in getattr(module, "SiT_models", {}):
        return {"status": f"the reference has no {cfg.model}; its models: {', '.join(getattr(module, 'SiT_models', {}))}"}
    ref = module.SiT_models[cfg.model](input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes)
    ref.load_state_dict(model.state_dict(), strict=True)  # same key names: the same network, so the same work
    ref = ref.to(device)
    # Sanity: the two implementations compute the same function (eval mode: no label dropout).
    model.eval()
    ref.eval()
    with torch.no_grad():
        t = torch.rand(len(x), device=device)
        diff = (model(x, t, y) - ref(x, t, y)).abs().max().item()
    model.train()
    ref.train()
    # The reference's train.py: AdamW(lr=1e-4, weight_decay=0) with torch's default implementation, the EMA
    # as a loop of mul_/add_ over named parameters, t drawn on the CPU, flow loss + 0.25 * disp_loss(act[-1]).
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0)
    ema = copy.deepcopy(ref).requires_grad_(False)
    ema_params, ref_params = dict(ema.named_parameters()), dict(ref.named_parameters())
    net = torch.compile(ref) if cfg.compile else ref
    takes_return_act = "return_act" in inspect.signature(ref.forward).parameters
    captured: list[torch.Tensor] = []
    if not takes_return_act:  # willisma/SiT itself: capture the last block's output with a hook
        ref.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))

    def step_fn(disp: bool) -> Callable[[], None]:
        def step() -> None:
            x0 = torch.randn_like(x)
            t = torch.rand((x.shape[0],)).to(x)
            te = t.view(-1, 1, 1, 1)
            xt, ut = te * x + (1 - te) * x0, x - x0
            captured.clear()
            with autocast:
                if disp and takes_return_act:
                    out, act = net(xt, t, y, return_act=True)
                    z = act[-1]
                else:
                    out = net(xt, t, y)
                    z = captured[-1] if captured else None
                loss = ((out.float() - ut) ** 2).mean(dim=(1, 2, 3))
                if disp:
                    loss = loss + 0.25 * reference_infonce_l2(z)
            loss = loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for name, p in ref_params.items():
                    ema_params[name].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

        return step

    return {
        "status": "ok",
        "path": str(Path(cfg.reference_path).resolve()),
        "forward_max_abs_diff": diff,
        "steps": {"reference_nodisp": step_fn(False), "reference_disp": step_fn(True)},
    }


def load_reference_models(path: str | os.PathLike):
    """Import DIR/models.py of the reference under a private name. Returns (module, None) or (None, why)."""
    file = Path(path) / "models.py"
    if not file.is_file():
        return None, f"{file} does not exist: --reference-path must be a checkout of the SiT / DispLoss code"
    spec = importlib.util.spec_from_file_location("_disploss_bench_reference_models", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        return None, (
            f"the reference model needs {err.name!r}, which is not installed (its models.py imports timm's "
            "PatchEmbed/Attention/Mlp); install it to time the reference model; the reference loss formula "
            "is timed in the disp section regardless"
        )
    return module, None


# -- dispersive loss alone --------------------------------------------------------------------------------
def bench_dispersive(cfg, device) -> dict:
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
    _log(f"disp: B={B}, M={M}, forward + backward, {cfg.warmup} warm-up + {cfg.steps} measured, interleaved")
    times, mems, _ = _time_interleaved(fns, cfg.warmup, cfg.steps, device)
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
    _log(f"  ours {out['ours_ms']:.2f} ms, reference formula {out['reference_ms']:.2f} ms: "
         f"{out['speedup']:.2f}x; values {ours_v:.6f} vs {ref_v:.6f}")  # fmt: skip
    return out


# -- sampling ---------------------------------------------------------------------------------------------
def bench_sampling(cfg, model, device, macs: float, mfu: "_MFU") -> dict:
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
    fns = {
        "dopri5": sampler.sample_ode(sampling_method="dopri5", num_steps=cfg.sample_steps, keep_trajectory=False),
        "euler": sampler.sample_ode(sampling_method="euler", num_steps=cfg.sample_steps, keep_trajectory=False),
        "heun2": sampler.sample_ode(sampling_method="heun2", num_steps=cfg.sample_steps, keep_trajectory=False),
        "sde-euler": sampler.sample_sde(sampling_method="Euler", num_steps=cfg.sample_steps),
    }
    B, C, S = cfg.sample_batch, cfg.in_channels, cfg.input_size
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(B, C, S, S, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (B,), generator=gen).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(max(cfg.warmup, 1)):  # compiles the eval graph with --compile
            model_fn(x, torch.rand(B, device=device), y)
    _sync(device)
    out: dict = {"batch": B, "batches": cfg.sample_batches, "num_steps": cfg.sample_steps, "cfg_scale": 1.0,
                 "warmup_s": time.perf_counter() - t0}  # fmt: skip
    _log(f"sample: batch {B}, {cfg.sample_batches} batch(es) per sampler, {cfg.sample_steps} grid points")
    for name in cfg.samplers:
        try:
            if name == "dopri5":
                importlib.import_module("torchdiffeq")
        except ImportError:
            out[name] = {"status": "skipped: torchdiffeq is not installed"}
            _log(f"  {name:<10} skipped: torchdiffeq is not installed")
            continue
        calls[0] = 0
        _sync(device)
        t0 = time.perf_counter()
        try:
            for b in range(cfg.sample_batches):
                batches_started[0] = b + 1
                fns[name](x, model_fn, y=y)
        except _TooManyCalls:
            out[name] = {"status": f"stopped: more than --max-nfe {cfg.max_nfe} model calls for one batch",
                         "seconds": time.perf_counter() - t0}  # fmt: skip
            _log(f"  {name:<10} {out[name]['status']}")
            continue
        _sync(device)
        dt = time.perf_counter() - t0
        nfe = calls[0] / cfg.sample_batches
        images = B * cfg.sample_batches
        out[name] = {
            "images_per_sec": images / dt, "nfe_per_image": nfe, "ms_per_nfe": 1e3 * dt / calls[0],
            "seconds": dt, **mfu(2 * macs * B * calls[0] / dt),
        }  # fmt: skip
        _log(f"  {name:<10} {images / dt:9.2f} img/s  NFE/image {nfe:6.0f}  {1e3 * dt / calls[0]:8.1f} ms/NFE")
    return out


class _TooManyCalls(Exception):
    """A sampler went past --max-nfe model calls."""


# ---------------------------------------------------------------------------------------------------------
def _time_interleaved(fns: dict[str, Callable[[], None]], warmup: int, steps: int, device: torch.device):
    """Warm each function up, then time them in turn, one call each per round (the order rotates), so
    that load changes on a shared machine hit every variant alike.

    Returns (seconds per call lists, peak memory GB per function, warm-up seconds).
    """
    t0 = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    warm_s = time.perf_counter() - t0
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    mems = dict.fromkeys(names, 0.0)
    for i in range(steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            _reset_peak(device)
            _sync(device)
            t = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t)
            mems[name] = max(mems[name], _peak_gb(device))
    return times, mems, warm_s


def _time_fn(fn: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    times, _, _ = _time_interleaved({"fn": fn}, warmup, steps, device)
    return statistics.median(times["fn"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def _peak_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _MFU:
    """Achieved model TFLOP/s, and on CUDA the MFU against the peak (and the measured bf16 peak)."""

    def __init__(self, device: torch.device, precision: str, peak_tflops: float):
        self.cuda = device.type == "cuda"
        self.bf16 = precision == "bf16"
        self.peak = peak_tflops

    def __call__(self, flops_per_sec: float) -> dict:
        out = {"model_tflops": flops_per_sec / 1e12}
        if self.cuda:
            out["mfu"] = flops_per_sec / 1e12 / self.peak
            if self.bf16:
                out["mfu_vs_measured_790"] = flops_per_sec / 1e12 / MEASURED_PEAK_TFLOPS_BF16
        return out


def _adamw(params, device: torch.device, impl: str) -> torch.optim.Optimizer:
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0}
    if impl == "auto":  # disploss.train's choice
        from disploss.train import make_adamw

        return make_adamw(params, **kwargs)
    if impl == "fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, foreach=impl == "foreach", **kwargs)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _set_precision(precision: str) -> None:
    # As disploss.train: TF32 matmuls for tf32 and bf16 (the fp32 work left outside autocast), off for fp32.
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()
def _redraw_zero_init(model, seed: int) -> None:
    # adaLN-Zero makes the output exactly 0 at init; a zero field would make the samplers trivially cheap.
    device = model.pos_embed.device
    gen = torch.Generator(device).manual_seed(seed + 1)
    layers = [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1],
              model.final_layer.linear]  # fmt: skip
    for layer in layers:
        layer.weight.normal_(0, 0.02, generator=gen)
        layer.bias.normal_(0, 0.02, generator=gen)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _meta(cfg, device, model, macs: float, peak: float) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_start": _loadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "parameters": sum(p.numel() for p in model.parameters()) if model is not None else None,
        "forward_macs_per_image": macs,
        "flops_convention": "training FLOPs/image = 3 x 2 x forward MACs (forward_flops); sampling FLOPs/NFE/image "
                            "= 2 x MACs; recomputation, softmax, norms, loss and optimizer not counted",
        "peak_tflops": peak if device.type == "cuda" else None,
        "peak_mem": "torch.cuda.max_memory_allocated during the variant's calls" if device.type == "cuda" else
                    "process peak resident set (VmHWM) during the variant's calls: every model of the process and "
                    "memory the allocator keeps are included, so it is not a per-variant footprint",
        "command": " ".join(["disploss", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
    }  # fmt: skip


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from disploss.cli import run_command

    return run_command("bench", list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

