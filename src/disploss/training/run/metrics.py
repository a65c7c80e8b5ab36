"""Means of per-step scalars between log lines, accumulated on the device (no host sync per step) and averaged
over processes with one all-reduce at the log step."""

from __future__ import annotations

import torch

from disploss import distributed as dist


class RunningMeans:
    """Sums of named 0-d tensors over the steps since the last `pop`, averaged over steps and processes.

    Names are fixed by the first `add` (every process adds the same names, so the all-reduce lines up).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one step's values (detached 0-d tensors on the device)."""
        if self.sums is None:
            self.names = list(values)
            self.sums = torch.zeros(len(self.names), device=self.device)
        self.sums += torch.stack([values[n].detach().float().reshape(()) for n in self.names])
        self.count += 1

    def pop(self, world_size: int) -> dict[str, float]:
        """{name: mean over the steps added and the processes} (NaN when no step was added); resets."""
        count = torch.tensor(float(self.count), device=self.device)
        sums = self.sums if self.sums is not None else torch.zeros(0, device=self.device)
        totals = dist.all_reduce_sum(torch.cat([sums, count.reshape(1)])) / world_size
        n = float(totals[-1])
        means = {name: float(v) / n if n else float("nan") for name, v in zip(self.names, totals[:-1])}
        if self.sums is not None:
            self.sums.zero_()
        self.count = 0
        return means
