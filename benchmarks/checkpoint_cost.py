"""What the checksums, the finiteness check and the weights' fingerprint of training checkpoints cost, on a real
training state.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/checkpoint_cost.py --model SiT-B/2 --dir /tmp

Builds the model, one AdamW step (so the optimizer holds its moments), an EMA copy, and times: the CRC-32 of every
tensor, save_checkpoint without / with checksums, load_checkpoint without / with verification (median of --repeat
runs; the file is in the page cache after the first write, so the times are CPU costs, not the disk's), and the
fingerprint of the EMA weights that keys a sample folder (disploss.statedict.fingerprint).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from disploss.checkpoint import load_checkpoint, save_checkpoint
from disploss.checkpoint.io import tensor_checksums, verify_checkpoint
from disploss.models import create_model
from disploss.statedict import fingerprint


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SiT-B/2")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    model = create_model(args.model, input_size=32, in_channels=4, num_classes=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([0, 1])).square().mean().backward()
    opt.step()
    state = {"model": model.state_dict(), "ema": {k: v.clone() for k, v in model.state_dict().items()},
             "opt": opt.state_dict(), "step": 1, "args": {"model": args.model}}  # fmt: skip
    gb = sum(t.numel() * t.element_size() for t in _tensors(state)) / 1e9
    path = Path(args.dir) / "checkpoint_cost.pt"
    rows = {
        "crc32 of every tensor": timed(lambda: tensor_checksums(state), args.repeat),
        "fingerprint of the EMA weights": timed(lambda: fingerprint(state["ema"]), args.repeat),
        "save, no checksums": timed(lambda: save_checkpoint(path, state), args.repeat),
        "save, with checksums": timed(lambda: save_checkpoint(path, state, checksums=True), args.repeat),
        "load, not verified": timed(lambda: load_checkpoint(path, verify=False), args.repeat),
        "load, verified (crc32 + finite)": timed(lambda: load_checkpoint(path), args.repeat),
    }
    loaded = load_checkpoint(path, verify=False)
    rows["finite check alone"] = timed(lambda: verify_checkpoint({k: v for k, v in loaded.items()}), args.repeat)
    path.unlink()
    print(f"{args.model}: {gb:.2f} GB of tensors, {path.parent} (median of {args.repeat})")
    for name, seconds in rows.items():
        print(f"  {name:<34} {seconds:6.2f} s")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


if __name__ == "__main__":
    main()
