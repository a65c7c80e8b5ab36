"""`disploss extract-latents`: cache the VAE posterior of a dataset for `train.py --latents` (torchrun-able,
resumable; see disploss.data.extract). Exit status 0 when the cache is complete, 1 when shards are missing."""

from __future__ import annotations

import argparse

from disploss import distributed
from disploss.commands.flags import add_config_arguments, config_from_namespace
from disploss.commands.report import guarded
from disploss.data.extract import ExtractConfig, extract_latents


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExtractConfig)
    for action in parser._actions:  # the three paths have no default: required flags
        if action.dest in ("data_path", "vae", "out"):
            action.required = True


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        cfg = distributed.alike_on_every_rank(config_from_namespace, ExtractConfig, args)  # printed by rank 0 alone
        info = distributed.init(cfg.device)
        try:
            return 0 if extract_latents(cfg, info) else 1
        finally:
            distributed.cleanup()

    return guarded("extract-latents", go)
