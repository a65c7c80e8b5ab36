"""Training: the configuration (config), `train()` read top to bottom (loop), the one optimisation step shared
with the benchmark (step), the data order that makes resume exact (loader), checkpoints, random state and the
run folder and its lock (state, rundir), which checkpoints are kept (retention), stopping on a signal and
time-based checkpoints (preemption), the EMA (ema) and the run's logs (runlog)."""

from disploss.training.config import DIGITS, TrainConfig
from disploss.training.loop import train
from disploss.training.preemption import Stopped
from disploss.training.step import NonFiniteError, StepParts, train_step

__all__ = ["DIGITS", "NonFiniteError", "StepParts", "Stopped", "TrainConfig", "train", "train_step"]
