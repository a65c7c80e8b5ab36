"""One logger for a training run: console, log.txt, metrics.jsonl, and optionally wandb and tensorboard.

Only the main process (rank 0) writes; on the other ranks every method is a no-op, so the training loop calls
them unconditionally.

Files in the run folder:
- `log.txt`: the console lines, each with a timestamp.
- `metrics.jsonl`: one JSON object per log step, `{"step": 100, "loss": ..., ...}`. Every line is appended whole
  in one write (disploss.fileio.LineFile), so a killed process leaves only complete lines, and a line a full disk
  cut short is removed again before the error (a DiskFullError naming the file); a resumed run appends after
  calling `truncate_after(resume_step)`, which keeps the steps monotone (and drops any broken line).
- `log.txt` is written the same way; a full disk there stops the run with the same one-line error, instead of
  logging's traceback on stderr while the run goes on unlogged.
- `tensorboard/` (with `tensorboard=True`) and `wandb/` (with `wandb=True` unless WANDB_DIR is set).

wandb (`--wandb`) reads its environment variables only when enabled (the reference read them always):
WANDB_KEY (or wandb's own WANDB_API_KEY) and PROJECT are required online, ENTITY is optional; with
WANDB_MODE=offline none is required.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from disploss.errors import MissingDependencyError, UsageError
from disploss.fileio import LineFile, atomic_write_bytes

__all__ = ["RunLogger", "WandbConfigError", "check_logging_setup"]

_OFFLINE_MODES = ("offline", "disabled", "dryrun")


class WandbConfigError(UsageError, RuntimeError):
    """--wandb was given but a required environment variable is missing."""


def _scalar(value: Any) -> Any:
    # Tensors, numpy scalars -> Python numbers; non-finite floats -> strings that float() reads back, because
    # NaN / Infinity are not valid JSON.
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}"
    return str(value)


def _image_array(path_or_array: Any):
    # -> (H, W, C) uint8 numpy array.
    import numpy as np

    if isinstance(path_or_array, (str, os.PathLike)):
        from PIL import Image

        with Image.open(path_or_array) as img:
            return np.asarray(img.convert("RGB"))
    arr = path_or_array
    if hasattr(arr, "detach"):  # torch tensor, (C, H, W) or (H, W, C)
        arr = arr.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return arr


def check_logging_setup(wandb: bool, tensorboard: bool) -> None:
    """Raise now what `RunLogger(wandb=..., tensorboard=...)` would raise once the run folder exists: wandb's
    missing environment variables, a missing wandb or tensorboard package (nothing is imported or contacted).

    Raises:
        WandbConfigError: naming the missing variables.
        MissingDependencyError: with the pip command.
    """
    import importlib.util

    if wandb:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in _OFFLINE_MODES:
            missing = []
            if not os.environ.get("WANDB_KEY") and not os.environ.get("WANDB_API_KEY"):
                missing.append("WANDB_KEY (your wandb API key)")
            if not os.environ.get("PROJECT"):
                missing.append("PROJECT (the wandb project)")
            if missing:
                raise WandbConfigError(
                    f"--wandb needs the environment variable(s) {', '.join(missing)}; ENTITY (team or user) is "
                    "optional. Set them, or set WANDB_MODE=offline to log locally without an account."
                )
        if importlib.util.find_spec("wandb") is None:
            raise MissingDependencyError("--wandb needs the wandb package: pip install 'disploss[wandb]'")
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise MissingDependencyError("--tensorboard needs the tensorboard package: pip install 'disploss[tensorboard]'")


class _LineHandler(logging.Handler):
    """A logging handler that appends each record to a LineFile; a failed write raises (a full disk stops the run
    with one line) instead of logging's "--- Logging error ---" traceback."""

    def __init__(self, path: Path):
        super().__init__()
        self.file = LineFile(path)

    def emit(self, record: logging.LogRecord) -> None:
        self.file.write(self.format(record) + "\n")

    def close(self) -> None:
        self.file.close()
        super().close()


class RunLogger:
    """Console + log.txt + metrics.jsonl (+ wandb, + tensorboard) for one run; no-op off the main process.

    Args:
        run_dir: the experiment folder (created if missing, main process only).
        enabled: write anything at all; None means `disploss.distributed.is_main()`.
        resume_step: when resuming, drop metrics.jsonl lines with a step above it (see `truncate_after`).
        wandb: log to Weights & Biases (lazy import; environment variables read only then).
        wandb_config: run configuration shown in wandb.
        run_name: wandb run name (default: the folder name).
        tensorboard: write tensorboard event files into `{run_dir}/tensorboard`.
        console: also print lines to stdout.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool | None = None,
        resume_step: int | None = None,
        wandb: bool = False,
        wandb_config: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        tensorboard: bool = False,
        console: bool = True,
    ):
        if enabled is None:
            from disploss.distributed import is_main

            enabled = is_main()
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "log.txt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._metrics_file = None
        self._wandb = None
        self._wandb_run = None
        self._tb = None
        self.total_steps: int | None = None  # set by the training loop: the log lines then show progress and an ETA
        self.console_labels: dict[str, str] = {}  # metric -> its name on the console line (MeanFlow's losses)
        self.logger = logging.Logger(f"disploss.run.{id(self)}", level=logging.INFO)  # not in the global registry
        self.logger.propagate = False
        if not self.enabled:
            self.logger.addHandler(logging.NullHandler())
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        # The console first: a line the full disk refuses still reaches it.
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if console else []
        handlers.append(_LineHandler(self.log_path))
        for handler in handlers:
            handler.setFormatter(formatter)
            self.logger.addHandler(handler)
        if resume_step is not None:
            self.truncate_after(resume_step)
        else:
            self._drop_partial_tail()
        self._open_metrics()
        try:
            if wandb:
                self._init_wandb(dict(wandb_config or {}), run_name or self.run_dir.name)
            if tensorboard:
                self._init_tensorboard()
        except BaseException:
            self.close()
            raise

    # -- text ------------------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Print `message` with a timestamp to the console and log.txt."""
        if self.enabled:
            self.logger.info(message)

    def warning(self, message: str) -> None:
        """Like `info`, prefixed with WARNING."""
        if self.enabled:
            self.logger.warning(f"WARNING: {message}")

    # -- metrics ---------------------------------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: Mapping[str, Any] | None = None, echo: bool = True, **scalars) -> None:
        """Record scalars of one step: a metrics.jsonl line, a console / log.txt line, wandb, tensorboard.

        Args:
            step: training step.
            metrics, **scalars: scalar values (floats, ints, 0-d tensors, numpy scalars), e.g. loss, flow, disp,
                steps_per_sec, images_per_sec, lr, grad_norm, peak_mem_gb.
            echo: also write the human-readable line (of the names without a '/').
        """
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in {**dict(metrics or {}), **scalars}.items()}
        record = {"step": int(step), **values}
        line = json.dumps(record, allow_nan=False) + "\n"
        self._metrics_file.write(line)  # whole or not at all: a kill or a full disk leaves complete lines
        if echo:  # per-layer values and diagnostics ('disp/blocks.5', 'diag/...') go to the files only
            labels = self.console_labels
            text = ", ".join(f"{labels.get(k, k)}: {_format_value(v)}" for k, v in values.items() if "/" not in k)
            self.logger.info(f"({self._progress(int(step), values.get('steps_per_sec'))}) {text}")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb_run is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def _progress(self, step: int, steps_per_sec) -> str:
        # "step=0000350" or, with total_steps, "step=0000350/0001500 23% ETA 0:04:10" (from the last rate)
        if not self.total_steps:
            return f"step={step:07d}"
        text = f"step={step:07d}/{self.total_steps:07d} {100 * step / self.total_steps:.0f}%"
        if isinstance(steps_per_sec, (int, float)) and steps_per_sec > 0 and step < self.total_steps:
            seconds = round((self.total_steps - step) / steps_per_sec)
            text += f" ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        return text

    def log_image(self, name: str, path_or_array: Any, step: int) -> None:
        """Send an image (e.g. the sample grid) to wandb / tensorboard when they are on.

        Args:
            name: tag, e.g. "samples".
            path_or_array: an image file, or an array / tensor (H, W, C) or (C, H, W), uint8 or floats in [0, 1].
            step: training step.
        """
        if not self.enabled or (self._wandb_run is None and self._tb is None):
            return
        arr = _image_array(path_or_array)
        if self._wandb_run is not None:
            self._wandb.log({name: self._wandb.Image(arr)}, step=int(step))
        if self._tb is not None:
            self._tb.add_image(name, arr, int(step), dataformats="HWC")
            self._tb.flush()

    def truncate_after(self, step: int) -> int:
        """Drop metrics.jsonl lines whose step is above `step` (and broken lines), keeping the file monotone.

        Called when resuming from the checkpoint of `step`: the lines the killed run logged after that
        checkpoint are logged again by the resumed run.

        Args:
            step: last step to keep.
        Returns:
            Number of lines dropped.
        """
        if not self.enabled or not self.metrics_path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        reopen = self._metrics_file is not None
        if reopen:
            self._metrics_file.close()
        atomic_write_bytes(self.metrics_path, "".join(kept).encode())
        if reopen:
            self._open_metrics()
        if dropped:
            self.logger.info(f"metrics.jsonl: dropped {dropped} line(s) after step {step} (resumed run)")
        return dropped

    # -- lifecycle -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush and close every output (safe to call twice)."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------
    def _open_metrics(self) -> None:
        self._metrics_file = LineFile(self.metrics_path)

    def _drop_partial_tail(self) -> None:
        # A line cut by a crash of an older writer (or a full disk) would glue onto the next record.
        if not self.metrics_path.exists() or self.metrics_path.stat().st_size == 0:
            return
        data = self.metrics_path.read_bytes()
        if not data.endswith(b"\n"):
            atomic_write_bytes(self.metrics_path, data[: data.rfind(b"\n") + 1])

    def _init_wandb(self, config: dict, name: str) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        offline = mode in _OFFLINE_MODES
        key = os.environ.get("WANDB_KEY") or None
        check_logging_setup(wandb=True, tensorboard=False)
        try:
            import wandb
        except ImportError as err:
            raise MissingDependencyError("--wandb needs the wandb package: pip install 'disploss[wandb]'") from err
        if key is not None and not offline:
            wandb.login(key=key)
        run_dir = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # The run id lives in the run folder so that a resumed run continues the same wandb run.
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        if not id_file.exists():
            atomic_write_bytes(id_file, (run_id + "\n").encode())
        self._wandb = wandb
        self._wandb_run = wandb.init(
            entity=os.environ.get("ENTITY") or None,
            project=os.environ.get("PROJECT") or "disploss",
            name=name,
            id=run_id,
            resume="allow",
            config=config,
            dir=str(run_dir),
            mode="offline" if mode in ("offline", "dryrun") else ("disabled" if mode == "disabled" else None),
        )
        self.info(f"wandb run {run_id} ({'offline' if offline else 'online'})")

    def _init_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MissingDependencyError(
                "--tensorboard needs the tensorboard package: pip install 'disploss[tensorboard]'"
            ) from err
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
