"""`disploss export CKPT OUT [--weights ema|model] [--metrics EVAL.json]`: a checkpoint as a model folder that loads
with `SiT.from_pretrained(OUT)` and `--ckpt OUT`, with a model card (disploss.checkpoint.export).

    disploss export results/000-SiT-XL-2-Linear-velocity-None/checkpoints/0400000.pt sit-xl-2-disp \\
        --metrics fid50k.json --hub-id me/sit-xl-2-disp
    hf upload me/sit-xl-2-disp sit-xl-2-disp          # or disploss.hub.push_folder("sit-xl-2-disp", "me/...")
"""

from __future__ import annotations

import argparse

from disploss.checkpoint.sit import WEIGHT_CHOICES
from disploss.commands.report import guarded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="a training checkpoint (ours or a released .pt) or a .safetensors")
    parser.add_argument("out", metavar="OUT", help="the model folder to write (new, or empty)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="ema",
                        help="ema (the EMA weights, default) or model (the raw weights); a file holding only the "
                             "other one is refused")  # fmt: skip
    parser.add_argument("--metrics", default=None, metavar="EVAL.json",
                        help="the JSON of `disploss evaluate --out`: its numbers go into the card with their "
                             "sampler settings")  # fmt: skip
    parser.add_argument("--sample-config", default=None, metavar="JSON",
                        help="the sample folder's sample_config.json, when --metrics does not record it")  # fmt: skip
    parser.add_argument("--hub-id", default=None, metavar="OWNER/NAME",
                        help="the hub id the folder will be pushed to, for the card's commands (default: OUT)")  # fmt: skip
    parser.add_argument("--license", default="other", help="the card's license id, e.g. mit, cc-by-nc-4.0")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="model preset (e.g. SiT-XL/2), for a file whose width does not say its heads")  # fmt: skip
    parser.add_argument("--num-heads", type=int, default=None, metavar="N",
                        help="attention heads, for a width that is no preset's (ours record them)")  # fmt: skip
    parser.add_argument("--trust", action="store_true",
                        help="load a pickled CKPT with weights_only=False (RUNS CODE from the file: only for files "
                             "you trust), as convert-checkpoint --trust")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        from disploss.checkpoint.export import export_folder

        out, config = export_folder(
            args.ckpt, args.out, weights=args.weights, trust=args.trust, metrics=args.metrics,
            sample_config=args.sample_config, license=args.license, model_name=args.model,
            num_heads=args.num_heads, hub_id=args.hub_id,
        )  # fmt: skip
        info = config["disploss"]
        name = info["model_name"] or "SiT"
        print(f"wrote {out}: {name}, the {info['weights']} weights of {args.ckpt} (fingerprint {info['fingerprint']}), "
              f"config.json, model.safetensors and README.md" + (" with the metrics" if args.metrics else ""))  # fmt: skip
        print(f"load it with SiT.from_pretrained({str(out)!r}) or --ckpt {out}")
        return 0

    return guarded("export", go)
