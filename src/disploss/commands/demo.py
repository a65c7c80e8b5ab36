"""`disploss demo` (behind `make demo`): a small SiT with dispersive loss on the bundled digits, on the CPU."""

from __future__ import annotations

import argparse

from disploss.commands.flags import add_config_arguments, config_from_namespace
from disploss.commands.report import guarded
from disploss.tools.demo import DemoConfig, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        run_demo(config_from_namespace(DemoConfig, args))
        return 0

    return guarded("demo", go)
