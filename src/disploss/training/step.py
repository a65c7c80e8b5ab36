"""One optimisation step, shared by `train()` and the benchmark (`disploss bench`), so what is timed is what is
trained: for each of K micro-batches the objective under the precision's autocast and backward (DDP all-reduces on
the last one only), then the gradient norm (and clipping), the non-finite check, AdamW, EMA. Also the watch that
turns a non-finite step into an error naming it.

How the global batch splits (--grad-accum-steps K over P processes): every step uses N = P x K micro-batches of m
samples. Process r's local batch (K m) comes from the DistributedSampler in the reference's order, and its
micro-batch k is the strided slice x[k::K]; that slice holds the samples the sampler gives rank o = P k + r of a run
with N processes and K = 1, in the same order. The random draws of a micro-batch (time, noise, label dropout,
MeanFlow's (r, t)) come from a generator seeded by (global seed, step, o). So 1 process with K = 2 and 2 processes
with K = 1 compute the same micro-batches with the same draws, and reach the same weights up to float rounding
(the gradient is the mean over the micro-batches either way); a run resumes exactly under any P and K with the
same P x K (training/run/resume.py, check_process_split).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field

import torch

from disploss import distributed as dist
from disploss.runtime import autocast


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the step and the term."""


@dataclass(frozen=True)
class StepOptions:
    """How a step runs and updates the weights.

    Attributes:
        precision: 'fp32' | 'tf32' | 'bf16' (the forward and the loss under bfloat16 autocast).
        grad_clip: clip the gradient norm to this value; 0 = no clipping (the norm is still computed: it is the
            non-finite check's input and a logged metric).
        ema_decay: EMA decay per step (the most it reaches with ema_warmup_power).
        skip_nonfinite: skip the update of a step whose loss or gradient is not finite, on every process
            (costs one host sync per step); False records it on the device for `NonFiniteWatch` to raise.
        grad_accum_steps: K, the micro-batches of each process's batch, each forward + backward on its own (the
            dispersive term per micro-batch); the gradient is their mean.
        seed: seed the random draws of each micro-batch from (seed, step, micro-batch index) (see the module
            docstring); None draws from the global generators as they are (the benchmark).
        ema_warmup_power: the EMA warm-up of disploss.training.ema.ema_decay_at; None: the constant ema_decay.
    """

    precision: str = "tf32"
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    skip_nonfinite: bool = False
    grad_accum_steps: int = 1
    seed: int | None = None
    ema_warmup_power: float | None = None

    @classmethod
    def of(cls, cfg) -> StepOptions:
        """The options of a TrainConfig (--precision, --grad-clip, --ema-decay, --on-nonfinite, --grad-accum-steps,
        --global-seed, --ema-warmup-power)."""
        return cls(
            cfg.precision, cfg.grad_clip, cfg.ema_decay, cfg.on_nonfinite == "skip", cfg.grad_accum_steps,
            cfg.global_seed, cfg.ema_warmup_power,
        )  # fmt: skip


@dataclass
class StepOutput:
    """Detached results of one step: loss, flow and disp (0-d, means over the local batch), the dispersive value
    of each regularised layer, grad_norm, whether everything was finite (a 0-d bool tensor, on the device) and
    whether the weights were updated (always True unless skip_nonfinite skipped the step)."""

    loss: torch.Tensor
    flow: torch.Tensor
    disp: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    updated: bool
    layers: dict = field(default_factory=dict)


def train_step(
    net, objective, opt, ema, x: torch.Tensor, y: torch.Tensor, options: StepOptions, step: int = 0
) -> StepOutput:
    """One optimisation step on the batch x (B, C, H, W), y (B,), in options.grad_accum_steps micro-batches.

    Args:
        net: the model as called (possibly DDP- and compile-wrapped).
        objective: (net, x, y) -> terms (disploss.training.objective.Objective).
        opt: the optimizer; its parameters are the ones whose gradient norm is taken (and clipped).
        ema: disploss.training.ema.EMA of the unwrapped model.
        options: StepOptions.
        step: the optimizer steps before this one (the micro-batches' seeds and the EMA warm-up).
    Returns:
        StepOutput: loss, flow, disp and each layer's value are means over the micro-batches.
    """
    from disploss.training.ema import ema_decay_at

    K = options.grad_accum_steps
    if x.shape[0] % K:
        raise ValueError(f"a batch of {x.shape[0]} does not split into {K} micro-batches")
    ddp = _ddp_module(net)
    opt.zero_grad(set_to_none=True)
    sums: dict = {}
    for k in range(K):
        if options.seed is not None:
            seed_micro_batch(options.seed, step, dist.get_world_size() * k + dist.get_rank(), x.device)
        # DDP all-reduces the gradients in the backward of the last micro-batch only.
        sync = contextlib.nullcontext() if ddp is None or k == K - 1 else ddp.no_sync()
        with sync:
            with autocast(x.device, options.precision):
                terms = objective(net, x[k::K], y[k::K])  # the strided slice: see the module docstring
            loss = terms["loss"].mean()
            (loss / K if K > 1 else loss).backward()
        parts = {"loss": loss.detach(), "flow": terms["flow"].detach().mean(), "disp": terms["disp"].detach().float()}
        parts.update({f"layer/{n}": v.detach() for n, v in terms["layers"].items()})
        for name, value in parts.items():
            sums[name] = value / K if name not in sums else sums[name] + value / K
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, options.grad_clip if options.grad_clip > 0 else math.inf)
    flow, disp = sums["flow"], sums["disp"]
    finite = torch.isfinite(grad_norm) & torch.isfinite(flow) & torch.isfinite(disp)
    updated = True
    if options.skip_nonfinite:  # needs the answer now: one host sync per step
        # Every process must agree (a local loss can be non-finite while the averaged gradient is not).
        updated = float(dist.all_reduce_sum((~finite).float())) == 0
        if not updated:
            opt.zero_grad(set_to_none=True)
    if updated:
        opt.step()
        ema.update(ema_decay_at(step, options.ema_decay, options.ema_warmup_power))
    layers = {name[len("layer/") :]: v for name, v in sums.items() if name.startswith("layer/")}
    return StepOutput(sums["loss"], flow, disp, grad_norm.detach(), finite, updated, layers)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of micro-batch `index` (P k + r) of optimizer step `step`: 63 bits of a hash of the three, so that
    the streams of different steps and micro-batches are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_micro_batch(seed: int, step: int, index: int, device: torch.device) -> None:
    """Seed the CPU generator (the times) and the device's (the noise, the label dropout) for one micro-batch."""
    value = micro_batch_seed(seed, step, index)
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)


def _ddp_module(net):
    """The DistributedDataParallel module under `net` (itself, or under torch.compile's wrapper), or None."""
    ddp_type = torch.nn.parallel.DistributedDataParallel
    for module in (net, getattr(net, "_orig_mod", None)):
        if isinstance(module, ddp_type):
            return module
    return None


def nonfinite_term(out: StepOutput) -> str:
    """Which term of a non-finite step was not finite (for the message)."""
    return _term(not torch.isfinite(out.flow), not torch.isfinite(out.disp))


def _term(flow_bad, disp_bad) -> str:
    return "flow loss" if flow_bad else "dispersive loss" if disp_bad else "gradient"


class NonFiniteWatch:
    """The first non-finite step of a run, recorded on the device without a host sync per step.

    `record` runs every step; `check` (at log and checkpoint steps, before anything is written) raises
    NonFiniteError naming the step and the term, and the file and tensor when the run started from a checkpoint
    whose weights were not finite already (then neither the learning rate nor the data is to blame).

    Args:
        device: where the steps run.
        origin_path, origin_state: the checkpoint the run started from and its loaded dict (None: a fresh run).
    """

    def __init__(self, device: torch.device, origin_path=None, origin_state: dict | None = None):
        self.bad = torch.full((3,), -1.0, device=device)  # first non-finite step, its term flags (flow, disp)
        self.origin_path, self.origin_state = origin_path, origin_state

    def record(self, step: int, out: StepOutput) -> None:
        new_bad = (~out.finite) & (self.bad[0] < 0)
        flags = torch.stack(
            [
                torch.tensor(float(step), device=self.bad.device),
                (~torch.isfinite(out.flow)).float(),
                (~torch.isfinite(out.disp)).float(),
            ]
        )
        self.bad = torch.where(new_bad, flags, self.bad)

    def check(self) -> None:
        first, flow_bad, disp_bad = self.bad.tolist()
        if first < 0:
            return
        where = f"non-finite {_term(flow_bad, disp_bad)} at step {int(first)}"
        from disploss.checkpoint import first_nonfinite

        inherited = first_nonfinite(self.origin_state) if self.origin_state is not None else None
        if inherited is not None:
            raise NonFiniteError(
                f"{where}: the checkpoint {self.origin_path} this run started from holds non-finite values in "
                f"{inherited}, so no setting of this run can help; start from an earlier checkpoint"
            )
        raise NonFiniteError(
            f"{where}; the last checkpoint written before it is intact. Lower --lr, set --grad-clip, or pass "
            "--on-nonfinite skip to skip such steps"
        )


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA, and CPU since torch 2.4), else the default foreach one.

    Fused and foreach compute the same update (tests/test_fast_paths.py); fused is one kernel per step.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # this torch has no fused kernel for the device
        return torch.optim.AdamW(params, **kwargs)
