"""Where and in which precision the work runs: one definition shared by training, sampling and the benchmark.

Precisions (the --precision flag everywhere):
- fp32: float32 everywhere, TF32 off.
- tf32: float32 with TF32 matmuls and convolutions on Ampere+ GPUs (the reference's setting).
- bf16: the model under bfloat16 autocast; what autocast leaves in float32 may use TF32.
"""

from __future__ import annotations

import contextlib

import torch

from disploss.errors import ConfigError

PRECISIONS = ("fp32", "tf32", "bf16")
DEVICES = ("cuda", "cpu")

__all__ = [
    "DEVICES", "PRECISIONS", "autocast", "matmul_flops_per_second", "peak_memory_gb", "resolve_device",
    "set_precision",
]  # fmt: skip


def set_precision(precision: str) -> None:
    """TF32 matmuls for 'tf32' and 'bf16', off for 'fp32' (a process-wide torch setting)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision: bfloat16 for 'bf16', a no-op otherwise."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def resolve_device(name: str | None) -> torch.device:
    """'cuda' | 'cpu' | None (CUDA when available); a one-line error for a device that is not there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"--device {name!r} is not a valid device; valid choices: {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu"
        )
    return torch.device(name)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on the CPU the process's peak resident set, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def matmul_flops_per_second(device: torch.device, precision: str = "fp32", budget_s: float = 0.05) -> float:
    """What this device does in square matmuls, in FLOP/s, measured for about `budget_s` seconds (a rough speed for
    estimates: smaller or memory-bound operations run slower, so estimates from it are optimistic).

    Args:
        device: where to measure (CUDA is synchronised around the timed calls).
        precision: 'bf16' measures bfloat16 matmuls, else float32 (with TF32 as set_precision left it).
        budget_s: seconds of timed work (after one warm-up call).
    """
    import time

    side = 2048 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.full((side, side), 0.5, device=device, dtype=dtype)  # no random draw: the run's streams stay as they are
    b = torch.full((side, side), 0.25, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, thread pool)
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        a @ b
        calls += 1
        if calls % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                return 2 * side**3 * calls / elapsed
