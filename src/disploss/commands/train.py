"""`disploss train` / `torchrun train.py`: flags generated from TrainConfig; the library's `train()` does the work.

Exit status: 0 when done; 2 and one line `disploss train: error: ...` for a user error (flags, data, checkpoint,
run folder, disk); 1 for a non-finite loss; anything else keeps its traceback. Under torchrun a mistake every
process finds is printed once (see disploss.commands.report).
"""

from __future__ import annotations

import argparse

from disploss.commands.flags import add_config_arguments, config_from_namespace
from disploss.commands.report import guarded, print_error
from disploss.training import NonFiniteError, TrainConfig, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from disploss import distributed as dist

    def go() -> int:
        try:
            train(config_from_namespace(TrainConfig, args))
        except NonFiniteError as err:
            print_error("train", err)
            return 1
        finally:
            dist.cleanup()  # a process that exits with its process group alive aborts ("terminate called ...")
        return 0

    return guarded("train", go)
