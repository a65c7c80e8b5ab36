"""The digits experiment: its configuration and arms (config), sampling and scoring in a digit classifier's
feature space (scoring, classifier), summaries, tables and plots (report), and the orchestration (run)."""

from disploss.tools.digits.config import (
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
from disploss.tools.digits.report import paired_differences, render_markdown, summarise
from disploss.tools.digits.run import run_digits
from disploss.tools.digits.scoring import sample_checkpoint, sample_plan, score

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
