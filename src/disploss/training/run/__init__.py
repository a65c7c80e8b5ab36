"""The operations of a training run, which a reader of the method can skip: the cheap checks made before anything
costs time (preflight), the run folder and its lock (folder, lock), where a run resumes from and its random state
(resume), checkpoints and which are kept (checkpoints), stopping on a signal and time-based checkpoints
(preemption), the logs and metrics (log, metrics) and the loss curves (plots)."""
