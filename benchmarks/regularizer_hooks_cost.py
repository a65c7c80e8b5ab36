"""What the regulariser's bounds cost (issue 20, item 4): the root pre- and post-hooks, the version counters, the
grouping by layer, against the regulariser before them, on the case where hooks weigh most: a 12-layer MLP (64
wide, batch 16) with every layer hooked, forward + loss(), the two versions interleaved in one process.

    git show c46f748:src/disploss/regularizer.py > /tmp/old_regularizer.py
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/regularizer_hooks_cost.py --base /tmp/old_regularizer.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import timeit

import torch
from torch import nn

import disploss.regularizer as new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the regularizer.py to compare with")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("base_regularizer", args.base)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)]).train()
    x = torch.randn(16, 64)
    times: dict[str, list[float]] = {"base": [], "new": []}
    for _ in range(args.rounds):
        for name, module in (("base", base), ("new", new)):
            reg = module.DispersiveRegularizer(model, layers=[str(i) for i in range(12)])
            times[name].append(min(timeit.repeat(lambda reg=reg: (model(x), reg.loss()), number=50, repeat=3)) / 50)
            reg.remove()
    for name, values in times.items():
        median, fastest = statistics.median(values) * 1e6, min(values) * 1e6
        print(f"{name}: median {median:.1f} us, min {fastest:.1f} us per forward + loss()")
    ratios = [n / b for n, b in zip(times["new"], times["base"])]
    q = statistics.quantiles(ratios, n=4)
    print(f"new / base per round: median {statistics.median(ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}")


if __name__ == "__main__":
    main()
