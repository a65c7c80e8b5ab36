"""`disploss COMMAND [options]`: dispatch to the command's module, importing only that one (so that
`disploss --help` stays fast). Each command module exposes `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from disploss.commands.flags import HelpFormatter

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("disploss.commands.train", "train a SiT model (torchrun-compatible), with --disp for dispersive loss"),
    "sample": ("disploss.commands.sample", "sample a grid of images from a checkpoint (ODE, SDE, or MeanFlow)"),
    "sample-ddp": ("disploss.commands.sample_ddp", "sample many images to PNGs and an ADM .npz (torchrun-compatible)"),
    "evaluate": ("disploss.commands.evaluate", "FID, sFID, Inception Score, precision, recall of two .npz batches"),
    "extract-latents": ("disploss.commands.extract_latents", "cache VAE posterior moments of a dataset for --latents"),
    "convert-checkpoint": (
        "disploss.commands.convert_checkpoint",
        "convert a trusted pickled checkpoint or export EMA to safetensors",
    ),
    "export": (
        "disploss.commands.export",
        "a checkpoint as a model folder with a model card (SiT.from_pretrained, the hub)",
    ),
    "demo": ("disploss.commands.demo", "train a small SiT with dispersive loss on the bundled digits (CPU, minutes)"),
    "bench": ("disploss.commands.bench", "benchmark training, the dispersive loss and sampling"),
    "experiment": ("disploss.commands.experiment", "baseline vs dispersive loss on the bundled digits, several seeds"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, printed once under torchrun (disploss.commands.report.parser_error); the
    sub-parsers of a MODE are of this class too."""

    def error(self, message: str):
        from disploss.commands.report import parser_error

        parser_error(self.prog, message)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (also used by the root train.py / sample.py / sample_ddp.py shims)."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = ArgumentParser(prog=f"disploss {command}", description=help_text, formatter_class=HelpFormatter)
    module.add_arguments(parser)
    return parser


def run_command(command: str, argv: list[str]) -> int:
    """Parse `argv` for `command` (unknown flags are an error) and run it.

    A process launched by torchrun that fails leaves at once (`leave`): at interpreter shutdown the C++ threads of a
    process group torch still holds can abort the process ("terminate called without an active exception", seen in
    about one failing launch in five) after the one-line error was printed.
    """
    module = importlib.import_module(COMMANDS[command][0])
    args = build_parser(command).parse_args(argv)
    status = int(module.run(args) or 0)
    return leave(status) if status else status


def leave(status: int) -> int:
    """End the process with `status`. Under torchrun (WORLD_SIZE > 1) at once, with os._exit after flushing the
    standard streams and closing the log handlers (the commands close their own files, wandb run and process group),
    so that no C++ thread aborts it at interpreter shutdown: seen on failing launches, and once on a successful
    2-process extract-latents on a loaded machine, after all of its work was written. Otherwise returns `status`
    for sys.exit. The entry points (`python -m disploss`, train.py, sample.py, sample_ddp.py) end with it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: disploss COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<20} {help_text}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"disploss: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(command, rest)


def console() -> None:
    """The `disploss` console script: main(), ended by `leave` (as `python -m disploss` and the root shims end), so
    that under torchrun no process, one that succeeded or one that stopped quietly, can abort at interpreter
    shutdown."""
    sys.exit(leave(main()))


if __name__ == "__main__":
    console()
