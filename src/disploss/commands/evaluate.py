"""`disploss evaluate REF.npz SAMPLE.npz`: Inception Score, FID, sFID, precision and recall, printed as ADM does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from disploss.commands.report import guarded
from disploss.evaluation.evaluate import Device, evaluate
from disploss.evaluation.inception import WEIGHTS_URL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref_batch", type=Path, help="ADM reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", type=Path, help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--inception-weights", type=Path, default=None, metavar="PATH",
                        help=f"local Inception-v3 weights (offline machines); default: download {WEIGHTS_URL}")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--device", choices=get_args(Device), default="auto", help="where to run Inception")
    parser.add_argument("--out", type=Path, default=None, metavar="JSON",
                        help="also write the numbers to JSON, with the inputs' paths and, for an .npz of "
                             "sample-ddp, its sample folder's settings (sample_config.json)")  # fmt: skip
    parser.add_argument("--ref-cache", type=Path, default=None, metavar="PATH",
                        help="cache the reference statistics and features in this .npz; reused while the reference "
                             "is unchanged (never written over a file that is not such a cache)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _show(value: float | None) -> str:
    return "unavailable" if value is None else repr(value)


def _sample_settings(sample_batch: Path) -> dict | None:
    """The sample_config.json of the sample folder that the .npz was built from (disploss sample-ddp), if any."""
    import json

    from disploss.sampling.folder import CONFIG_FILE, sample_folder_of

    folder = sample_folder_of(sample_batch)
    if folder is None:
        return None
    try:
        settings = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def run(args: argparse.Namespace) -> int:
    def go() -> int:
        from disploss.fileio import atomic_write_json, check_output_file

        if args.out is not None:  # before the Inception features, and never over an input
            inputs = {
                "reference batch": args.ref_batch, "sample batch": args.sample_batch,
                "Inception weights file": args.inception_weights, "--ref-cache file": args.ref_cache,
            }  # fmt: skip
            check_output_file(args.out, "--out", inputs)
        result = evaluate(
            args.ref_batch, args.sample_batch, weights_path=args.inception_weights, batch_size=args.batch_size,
            device=args.device, ref_cache=args.ref_cache, progress=not args.no_progress,
        )  # fmt: skip
        print("Inception Score:", _show(result["inception_score"]))
        print("FID:", _show(result["fid"]))
        print("sFID:", _show(result["sfid"]))
        print("Precision:", _show(result["precision"]))
        print("Recall:", _show(result["recall"]))
        if "precision_recall_unavailable" in result:
            print(f"precision/recall unavailable: {result['precision_recall_unavailable']}")
        if args.out is not None:
            record = {**result, "reference_batch": str(args.ref_batch), "sample_batch": str(args.sample_batch)}
            settings = _sample_settings(args.sample_batch)
            if settings is not None:  # what made the samples: `disploss export --metrics` puts it beside each number
                record["sample_config"] = settings
            atomic_write_json(args.out, record)
            print(f"wrote {args.out}" + (" (with the sample folder's settings)" if settings is not None else ""))
        return 0

    return guarded("evaluate", go)
