"""Timing harness of the benchmark: interleaved timing, peak memory, MFU, machine metadata."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# H100/H200 SXM dense datasheet peaks, TFLOP/s, by precision; and what an H100 reaches in practice (bf16).
DATASHEET_PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}
MEASURED_PEAK_TFLOPS_BF16 = 790.0


def time_interleaved(fns: dict[str, Callable[[], None]], warmup: int, steps: int, device: torch.device):
    """Warm each function up, then time them in turn, one call each per round (the order rotates), so
    that load changes on a shared machine hit every variant alike.

    Returns (seconds per call lists, peak memory GB per function, warm-up seconds).
    """
    t0 = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    warm_s = time.perf_counter() - t0
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    mems = dict.fromkeys(names, 0.0)
    for i in range(steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            reset_peak(device)
            sync(device)
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
            mems[name] = max(mems[name], peak_gb(device))
    return times, mems, warm_s


def time_fn(fn: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    times, _, _ = time_interleaved({"fn": fn}, warmup, steps, device)
    return statistics.median(times["fn"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def peak_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MFU:
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


@torch.no_grad()
def redraw_zero_init(model, seed: int) -> None:
    # adaLN-Zero makes the output exactly 0 at init; a zero field would make the samplers trivially cheap.
    device = model.pos_embed.device
    gen = torch.Generator(device).manual_seed(seed + 1)
    layers = [*(b.adaLN_modulation[-1] for b in model.blocks), model.final_layer.adaLN_modulation[-1],
              model.final_layer.linear]  # fmt: skip
    for layer in layers:
        layer.weight.normal_(0, 0.02, generator=gen)
        layer.bias.normal_(0, 0.02, generator=gen)


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def meta(cfg, device, model, macs: float, peak: float) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_start": loadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "parameters": sum(p.numel() for p in model.parameters()) if model is not None else None,
        "forward_macs_per_image": macs,
        "flops_convention": "training FLOPs/image = 3 x 2 x forward MACs (forward_flops); sampling FLOPs/NFE/image "
                            "= 2 x MACs; recomputation, softmax, norms, loss and optimizer not counted",
        "peak_tflops": peak if device.type == "cuda" else None,
        "peak_mem": "torch.cuda.max_memory_allocated during the variant's calls" if device.type == "cuda" else
                    "process peak resident set (VmHWM) during the variant's calls: every model of the process and "
                    "memory the allocator keeps are included, so it is not a per-variant footprint",
        "command": command_line(),
    }  # fmt: skip


def command_line() -> str | None:
    """The command line of this process if it is the benchmark's: `disploss bench ...` or `python -m
    benchmarks.bench ...`; None when the benchmark runs inside another program (a test)."""
    if sys.argv[1:2] == ["bench"]:
        return " ".join(["disploss", "bench", *sys.argv[2:]])
    if Path(sys.argv[0]).parts[-3:] == ("benchmarks", "bench", "__main__.py"):
        return " ".join(["python", "-m", "benchmarks.bench", *sys.argv[1:]])
    return None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
