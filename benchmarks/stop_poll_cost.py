"""What the per-step stop poll costs: one all-reduce (MAX) of two int64 on the CPU (gloo), as StopPoll.poll does.

OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/stop_poll_cost.py
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def main(rounds: int = 5000) -> None:
    dist.init_process_group("gloo")
    flags = torch.zeros(2, dtype=torch.int64)
    for _ in range(200):  # warm-up
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    start = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    seconds = (time.perf_counter() - start) / rounds
    if dist.get_rank() == 0:
        print(f"gloo all-reduce MAX of 2 int64, {dist.get_world_size()} processes: {seconds * 1e6:.0f} us per step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
