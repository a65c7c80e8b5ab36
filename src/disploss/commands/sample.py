"""`disploss sample MODE` / `python sample.py MODE`: a grid of class-conditional samples from one checkpoint.

python sample.py ODE --model SiT-XL/2 --image-size 256 --ckpt /path/to/model.pt
disploss sample SDE --ckpt results/000-SiT-B-2-Linear-velocity-None/checkpoints/0400000.pt --cfg-scale 1.5
python sample.py MeanFlow --ckpt results/000-SiT-B-2-Linear-meanflow-None/checkpoints/0400000.pt   # 1 model call
"""

from __future__ import annotations

import argparse

from disploss.commands.flags import add_mode_subparsers, config_from_namespace
from disploss.commands.report import guarded
from disploss.sampling.config import MODE_HELP, SAMPLERS, mode_defaults
from disploss.sampling.grid import SampleConfig, sample_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mode_subparsers(
        parser, SampleConfig, SAMPLERS, MODE_HELP, mode_defaults=mode_defaults(SampleConfig), check_at_parse=True
    )


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        sampler = config_from_namespace(SAMPLERS[args.mode], args)
        sample_grid(config_from_namespace(SampleConfig, args, sampler=sampler))
        return 0

    return guarded("sample", go)
