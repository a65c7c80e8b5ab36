"""Training: the configuration (config), the objective with the dispersive term (objective), the one optimisation
step shared with the benchmark (step) and `train()` read top to bottom (loop); the EMA (ema) and the data order
that makes resume exact (loader). The run's operations, which a reader of the method can skip, are in `run/`."""

from disploss.training.config import DIGITS, TrainConfig
from disploss.training.loop import train
from disploss.training.objective import Objective
from disploss.training.run.preemption import Stopped
from disploss.training.step import NonFiniteError, StepOptions, train_step

__all__ = ["DIGITS", "NonFiniteError", "Objective", "StepOptions", "Stopped", "TrainConfig", "train", "train_step"]
