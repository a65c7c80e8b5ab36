"""Training: the configuration (config), `train()` read top to bottom (loop), the one optimisation step shared
with the benchmark (step), the data order that makes resume exact (loader), checkpoints, random state and the
run folder (state, rundir), the EMA (ema) and the run's logs (runlog)."""

from disploss.training.config import DIGITS, TrainConfig
from disploss.training.loop import train
from disploss.training.step import NonFiniteError, StepParts, train_step

__all__ = ["DIGITS", "NonFiniteError", "StepParts", "TrainConfig", "train", "train_step"]
