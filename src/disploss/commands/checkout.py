"""`disploss bench` and `disploss experiment`: thin dispatchers to the studies of a source checkout.

The benchmark harness (benchmarks/bench) and the digits experiment (experiments/digits) are not part of the installed
library: each lives beside its results in the repository. But `make bench`, the GPU scripts (benchmarks/gpu_check.sh,
gpu_evidence.sh) and the docs call `disploss bench` and `disploss experiment`, so these two commands stay, as
dispatchers: they find the checkout this package runs from (an editable install, or src/ on PYTHONPATH) through
disploss.__file__, never the working directory, put its root on sys.path and hand the parser and the parsed flags to
the study's own command line (its cli module: add_arguments, run). Outside a checkout they print one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

import disploss


def checkout_root(study: str) -> Path | None:
    """The repository root this package runs from (src/disploss/__init__.py -> parents[2]) if it holds `study`
    (e.g. 'benchmarks/bench'), else None."""
    root = Path(disploss.__file__).resolve().parents[2]
    return root if (root / study / "cli.py").is_file() else None


def study_cli(study: str) -> ModuleType | None:
    """The cli module of `study` in the checkout (importing it from the checkout's root), or None outside one."""
    root = checkout_root(study)
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(study.replace("/", ".") + ".cli")


def add_arguments(parser: argparse.ArgumentParser, study: str) -> None:
    """The study's flags; outside a checkout, one line and exit status 2 (whatever the flags)."""
    cli = study_cli(study)
    if cli is None:
        parser.exit(2, f"{parser.prog}: error: runs from a source checkout only ({study}/ is not part of the installed "
                       "package): git clone the disploss repository; make demo\n")  # fmt: skip
    cli.add_arguments(parser)


def run(args: argparse.Namespace, study: str) -> int:
    return study_cli(study).run(args)
