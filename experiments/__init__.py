"""Experiments built on the disploss library, each beside its results (not part of the installed package): the
digits experiment (digits: `python -m experiments.digits`, from the repository root)."""
