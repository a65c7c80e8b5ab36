"""`disploss sample-ddp MODE` / `torchrun --nproc_per_node=N sample_ddp.py MODE`: many samples as PNGs, then one
.npz in the input format of ADM's TensorFlow evaluator (key arr_0, uint8 (N, H, W, 3), index order).

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2 --num-fid-samples 50000 --ckpt model.pt
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py MeanFlow --ckpt meanflow.pt --num-sampling-steps 1

Runs under torchrun (NCCL on CUDA, gloo on CPU) or as one plain process. See disploss.sampling.ddp for the
folder layout, the per-image random streams and resuming.
"""

from __future__ import annotations

import argparse

from disploss import distributed as dist
from disploss.commands.flags import add_mode_subparsers, config_from_namespace
from disploss.commands.report import guarded
from disploss.sampling.config import MODE_HELP, MODES, mode_defaults
from disploss.sampling.ddp import SampleDDPConfig, sample_to_npz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mode_subparsers(
        parser, SampleDDPConfig, MODES, MODE_HELP, mode_defaults=mode_defaults(SampleDDPConfig), check_at_parse=True
    )


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        cfg = config_from_namespace(SampleDDPConfig, args)
        info = dist.init(cfg.guidance.device)
        try:
            sample_to_npz(cfg, info)
        finally:
            dist.cleanup()
        return 0

    return guarded("sample-ddp", go)
