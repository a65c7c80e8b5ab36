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
from disploss.errors import ConfigError
from disploss.sampling.config import MODE_HELP, SAMPLERS, mode_defaults
from disploss.sampling.ddp import SampleDDPConfig, sample_to_npz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parsers = add_mode_subparsers(
        parser, SampleDDPConfig, SAMPLERS, MODE_HELP, mode_defaults=mode_defaults(SampleDDPConfig), check_at_parse=True
    )
    for mode_parser in parsers.values():
        # The reference's --tf32 / --no-tf32: another spelling of --precision tf32 / fp32 (the command's business:
        # the library has one precision setting).
        mode_parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                                 help="the reference's flag: --tf32 is --precision tf32, --no-tf32 --precision fp32")  # fmt: skip
        mode_parser.set_defaults(precision=None)  # to tell a --precision given from the default


def _precision(args: argparse.Namespace) -> str:
    """--precision, else the one --tf32 / --no-tf32 names, else tf32; contradicting ones are an error (bf16 runs what
    autocast leaves in float32 with TF32, so --precision bf16 --tf32 agree)."""
    if args.tf32 is None:
        return args.precision or SampleDDPConfig.precision
    named = "tf32" if args.tf32 else "fp32"
    if args.precision is not None and args.precision != named and not (args.tf32 and args.precision == "bf16"):
        raise ConfigError(f"--precision {args.precision} contradicts --{'no-' if not args.tf32 else ''}tf32")
    return args.precision or named


def sample_ddp_config(args: argparse.Namespace) -> SampleDDPConfig:
    """The SampleDDPConfig of parsed flags (its sampler settings those of the MODE)."""
    args.precision = _precision(args)
    sampler = config_from_namespace(SAMPLERS[args.mode], args)
    return config_from_namespace(SampleDDPConfig, args, sampler=sampler)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        # Built on every process before any process group exists: a bad value is printed by rank 0 alone.
        cfg = dist.alike_on_every_rank(sample_ddp_config, args)
        info = dist.init(cfg.guidance.device)
        try:
            sample_to_npz(cfg, info)
        finally:
            dist.cleanup()
        return 0

    return guarded("sample-ddp", go)
