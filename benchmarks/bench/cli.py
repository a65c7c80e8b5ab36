"""The benchmark's command line: `python -m benchmarks.bench [flags]` from the repository root, and `disploss bench
[flags]` in a checkout (disploss.commands.bench hands over to add_arguments and run here)."""

from __future__ import annotations

import argparse

from benchmarks.bench.config import BenchConfig
from disploss.commands.flags import HelpFormatter, add_config_arguments, config_from_namespace
from disploss.commands.report import guarded

DESCRIPTION = "benchmark training, the dispersive loss and sampling"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, BenchConfig)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        from benchmarks.bench.harness import log
        from benchmarks.bench.sections import bench
        from disploss.fileio import atomic_write_json, check_output_file

        cfg = config_from_namespace(BenchConfig, args).resolved()
        if cfg.json:
            check_output_file(cfg.json, "--json")  # before minutes of benchmarks
        report = bench(cfg)
        if cfg.json:
            atomic_write_json(cfg.json, report)
            log(f"wrote {cfg.json}")
        return 0

    return guarded("bench", go)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=DESCRIPTION, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
