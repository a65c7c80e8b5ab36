"""`disploss train` / `torchrun train.py`: flags generated from TrainConfig; the library's `train()` does the work.

Exit status: 0 when done; 2 and one line `disploss train: error: ...` for a user error (flags, data, checkpoint,
run folder, disk); 1 for a non-finite loss; 75 when SIGTERM or SIGUSR1 stopped it with a checkpoint (run the same
command with --ckpt latest to continue) and 130 for SIGINT (Ctrl-C), each with one line from rank 0; anything else
keeps its traceback. Under torchrun a mistake every process finds is printed once (see disploss.commands.report).

The flags given are laid over `--preset NAME` (disploss.training.presets), else over TrainConfig's defaults.
"""

from __future__ import annotations

import argparse
import os
import sys

from disploss.commands.flags import add_config_arguments, given_values
from disploss.commands.report import guarded, print_error
from disploss.training import NonFiniteError, TrainConfig, presets, train
from disploss.training.run.preemption import EXIT_INTERRUPTED, Stopped, stop_signals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig, given_only=True)  # to lay the flags given over --preset


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags: --preset's values (if any), then every flag given."""
    given = given_values(TrainConfig, args)
    return presets.build(given.pop("preset", None), **given)


def run(args: argparse.Namespace) -> int:
    from disploss import distributed as dist

    def go() -> int:
        # Handled here too (train() handles them itself), so that a second signal while the line below is printed
        # (torchrun signals the other workers when one exits) cannot kill the process before it says why it stopped.
        with stop_signals():
            try:
                # Built on every process before any process group exists: a bad value is printed by rank 0 alone.
                train(dist.alike_on_every_rank(train_config, args))
            except NonFiniteError as err:
                print_error("train", err)
                return 1
            except Stopped as stop:  # a signal: the checkpoint is written, the run can continue
                _say(str(stop))
                return stop.exit_status
            except KeyboardInterrupt:  # Ctrl-C before the first step
                _say("interrupted (SIGINT) before the first step; nothing to save")
                return EXIT_INTERRUPTED
            finally:
                dist.cleanup()  # a process that exits with its process group alive aborts ("terminate called ...")
        return 0

    return guarded("train", go)


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops: one line is enough
        print(f"disploss train: {message}", file=sys.stderr, flush=True)
