"""`disploss convert-checkpoint IN OUT [--trust] [--to-safetensors]`."""

from __future__ import annotations

import argparse
import json

from disploss.checkpoint.convert import convert_checkpoint
from disploss.checkpoint.sit import WEIGHT_CHOICES
from disploss.commands.report import guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint to convert")
    parser.add_argument("output", metavar="OUT", help="plain .pt checkpoint or .safetensors file to write")
    parser.add_argument("--trust", action="store_true",
                        help="load IN with weights_only=False (RUNS CODE from the file: only for files you trust)")  # fmt: skip
    parser.add_argument("--to-safetensors", action="store_true",
                        help="export the EMA (or --weights) weights to safetensors with the model config "
                             "(implied when OUT ends in .safetensors)")  # fmt: skip
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="ema",
                        help="weights to export with --to-safetensors when both are stored (default: ema)")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="model name (e.g. SiT-XL/2) recorded with --to-safetensors when the file does not say")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        notes, config = convert_checkpoint(
            args.input, args.output, trust=args.trust, to_safetensors=args.to_safetensors or None,
            weights=args.weights, model_name=args.model,
        )  # fmt: skip
        for line in notes:
            print(f"converted {line}")
        if config is not None:
            print(
                f"wrote {args.output} (weights: {args.weights} if present; config: {json.dumps(config, sort_keys=True)})"
            )
        else:
            print(f"wrote {args.output}: a plain checkpoint that loads with weights_only=True")
        return 0

    return guarded("convert-checkpoint", go)
