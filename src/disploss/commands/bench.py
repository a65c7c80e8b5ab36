"""`disploss bench`: training-step, dispersive-loss and sampling throughput (see disploss.tools.bench)."""

from __future__ import annotations

import argparse

from disploss.commands.flags import add_config_arguments, config_from_namespace
from disploss.commands.report import guarded
from disploss.tools.bench.config import BenchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BenchConfig)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        from disploss.fileio import atomic_write_json, check_output_file
        from disploss.tools.bench.harness import log
        from disploss.tools.bench.sections import bench

        cfg = config_from_namespace(BenchConfig, args).resolved()
        if cfg.json:
            check_output_file(cfg.json, "--json")  # before minutes of benchmarks
        report = bench(cfg)
        if cfg.json:
            atomic_write_json(cfg.json, report)
            log(f"wrote {cfg.json}")
        return 0

    return guarded("bench", go)
