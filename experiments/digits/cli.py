"""The digits experiment's command line, from the repository root:

    python -m experiments.digits [digits] --threads 1     # baseline vs dispersive, seeds 0,1,2 (experiments.digits.config)
    python -m experiments.digits samplers --threads 1     # feature-FID against model calls (experiments.digits.samplers)

and `disploss experiment digits|samplers` in a checkout (disploss.commands.experiment hands over to add_arguments and
run here).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from disploss.commands.flags import HelpFormatter, add_config_arguments
from disploss.commands.report import guarded
from experiments.digits import config as digits
from experiments.digits import samplers
from experiments.digits.classifier import ClassifierConfig

DESCRIPTION = "baseline vs dispersive loss on the bundled digits, several seeds"
EXPERIMENTS = ("digits", "samplers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    parser_digits = sub.add_parser(
        "digits", help="baseline vs dispersive loss on the bundled digits, several seeds, feature-FID vs steps",
        description=digits.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_config_arguments(parser_digits, digits.DigitsConfig, none_defaults=True)
    parser_digits.add_argument(
        "--classifier-epochs", type=int, default=None,
        help=f"epochs of the digit classifier (default: {ClassifierConfig().epochs}; --quick: "
        f"{digits.QUICK['classifier'].epochs})",
    )  # fmt: skip
    parser_samplers = sub.add_parser(
        "samplers", help="feature-FID against model calls (NFE) of every sampler, on trained digits models",
        description=samplers.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_config_arguments(parser_samplers, samplers.SamplersConfig, none_defaults=True)


def samplers_config(args: argparse.Namespace) -> samplers.SamplersConfig:
    """The SamplersConfig of parsed flags: the defaults, or QUICK's with --quick, then every flag given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(samplers.SamplersConfig)
             if getattr(args, f.name, None) is not None and f.name != "quick"}  # fmt: skip
    return samplers.quick_config(**given) if args.quick else samplers.SamplersConfig(**given)


def digits_config(args: argparse.Namespace) -> digits.DigitsConfig:
    """The DigitsConfig of parsed flags: the defaults, or QUICK's with --quick, then every flag given."""
    values: dict = dict(digits.QUICK) if args.quick else {}
    for field in dataclasses.fields(digits.DigitsConfig):
        if getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    values["quick"] = bool(args.quick)
    image_size = values.get("image_size", digits.DigitsConfig.image_size)
    classifier = dataclasses.replace(values.get("classifier", ClassifierConfig()), image_size=image_size)
    if args.classifier_epochs is not None:
        classifier = dataclasses.replace(classifier, epochs=args.classifier_epochs)
    values["classifier"] = classifier
    return digits.DigitsConfig(**values)


def run(args: argparse.Namespace) -> int:
    if args.experiment == "samplers":
        return guarded("experiment samplers", lambda: _run_samplers(args))

    def go() -> int:
        from experiments.digits.report import fmt
        from experiments.digits.run import run_digits, run_screen

        cfg = digits_config(args)
        results = run_screen(cfg) if cfg.screen else run_digits(cfg)
        if cfg.shard is not None:
            return 0
        final = max(cfg.eval_steps())
        print(f"\nfeature-FID at step {final} (mean ± std over {len(cfg.seeds)} seed(s)):")
        for name, arm in results["arms"].items():
            row = next(r for r in arm["summary"] if r["step"] == final)
            print(f"  {name:<28} {fmt(row['fid'])}")
        timing = results["timing"]
        print(f"classifier held-out accuracy {results['classifier']['holdout_accuracy']:.4f}; "
              f"{timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU")  # fmt: skip
        return 0

    return guarded("experiment digits", go)


def _run_samplers(args: argparse.Namespace) -> int:
    from experiments.digits.samplers import run_samplers

    results = run_samplers(samplers_config(args))
    print(f"\n{'setting':<26} {'NFE':>6} {'feature-FID':>14} {'FID - dopri5':>14}")
    for row in results["summary"]:
        print(f"{row['setting']:<26} {row['nfe']['mean']:6.1f} {row['fid']['mean']:8.2f} ± {row['fid']['std']:4.2f} "
              f"{row['fid_minus_default']['mean']:+8.2f} ± {row['fid_minus_default']['std']:4.2f}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.digits [digits|samplers] [flags]`: the digits experiment unless the first word names
    the other one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv[:1] or argv[0] not in (*EXPERIMENTS, "-h", "--help"):
        argv = ["digits", *argv]
    parser = argparse.ArgumentParser(
        prog="python -m experiments.digits", description=DESCRIPTION, formatter_class=HelpFormatter,
        epilog="without EXPERIMENT: digits (python -m experiments.digits --quick)",
    )  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))
