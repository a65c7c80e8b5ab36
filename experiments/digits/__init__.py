"""The digits experiment: its configuration and arms (config), sampling and scoring in a digit classifier's
feature space (scoring, classifier), summaries, tables and plots (report), the orchestration (run), the samplers'
feature-FID against model calls (samplers) and the command line (cli: `python -m experiments.digits`, and
`disploss experiment` in a checkout). Its results live beside it, in this folder. Built on the public API of the
disploss library; not part of the installed package."""

from experiments.digits.config import (
    BASELINE,
    DISPERSIVE,
    DISPERSIVE_COSINE,
    MEANFLOW,
    MEANFLOW_DISPERSIVE,
    METRICS,
    NFE_SWEEP,
    QUICK,
    RESULTS_SCHEMA,
    Arm,
    DigitsConfig,
    SamplerSpec,
    grid_arms,
    train_config,
)
from experiments.digits.report import paired_differences, render_markdown, summarise
from experiments.digits.run import run_digits
from experiments.digits.scoring import sample_checkpoint, sample_plan, score

__all__ = [
    "BASELINE",
    "DISPERSIVE",
    "DISPERSIVE_COSINE",
    "MEANFLOW",
    "MEANFLOW_DISPERSIVE",
    "METRICS",
    "NFE_SWEEP",
    "QUICK",
    "RESULTS_SCHEMA",
    "Arm",
    "DigitsConfig",
    "SamplerSpec",
    "grid_arms",
    "paired_differences",
    "render_markdown",
    "run_digits",
    "sample_checkpoint",
    "sample_plan",
    "score",
    "summarise",
    "train_config",
]
