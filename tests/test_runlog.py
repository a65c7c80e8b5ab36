"""The run logger: log.txt, metrics.jsonl (complete lines, truncate on resume), wandb offline, tensorboard."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from disploss.training.run.log import RunLogger, WandbConfigError


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_text_and_metrics(tmp_path, capsys):
    with RunLogger(tmp_path / "run", enabled=True) as log:
        log.info("hello")
        log.log_metrics(
            100,
            loss=torch.tensor(0.25),
            flow=0.2,
            disp=np.float32(-3.0),
            steps_per_sec=2.5,
            images_per_sec=640,
            lr=1e-4,
            grad_norm=float("nan"),
            peak_mem_gb=1.5,
        )
        log.log_metrics(200, {"loss": 0.125}, echo=False)
        log.log_image("samples", np.zeros((4, 4, 3), np.uint8), 200)  # nothing enabled: no-op
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] hello", lines[0])
    assert "(step=0000100) loss: 0.2500" in lines[1] and len(lines) == 2
    assert "hello" in capsys.readouterr().out
    records = read_metrics(tmp_path / "run")
    assert records[0] == {
        "step": 100,
        "loss": 0.25,
        "flow": 0.2,
        "disp": -3.0,
        "steps_per_sec": 2.5,
        "images_per_sec": 640,
        "lr": 1e-4,
        "grad_norm": "NaN",
        "peak_mem_gb": 1.5,
    }
    assert records[1] == {"step": 200, "loss": 0.125}


def test_lines_complete_while_running(tmp_path):
    # Every record is on disk (whole line) as soon as log_metrics returns: what a kill would leave.
    log = RunLogger(tmp_path, enabled=True, console=False)
    for step in range(1, 4):
        log.log_metrics(step, loss=1.0 / step)
        text = (tmp_path / "metrics.jsonl").read_text()
        assert text.endswith("\n") and len(text.splitlines()) == step
    log.close()
    log.close()  # twice is fine


def test_resume_truncates_and_appends(tmp_path):
    with RunLogger(tmp_path, enabled=True, console=False) as log:
        for step in (100, 200, 300, 400):
            log.log_metrics(step, loss=0.1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 500, "lo')  # cut by a kill in an older writer
    with RunLogger(tmp_path, enabled=True, console=False, resume_step=200) as log:
        log.log_metrics(300, loss=0.2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [100, 200, 300]
    assert "dropped 3 line(s) after step 200" in (tmp_path / "log.txt").read_text()
    with RunLogger(tmp_path, enabled=True, console=False) as log:
        assert log.truncate_after(100) == 2
        log.log_metrics(200, loss=0.3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [100, 200]


def test_partial_tail_dropped_on_append(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x"')
    with RunLogger(tmp_path, enabled=True, console=False) as log:
        log.log_metrics(2, loss=1.0)
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2, "loss": 1.0}]


def test_disabled_is_noop(tmp_path):
    log = RunLogger(tmp_path / "rank1", enabled=False, wandb=True, tensorboard=True)
    log.info("x")
    log.log_metrics(1, loss=1.0)
    log.log_image("s", np.zeros((2, 2, 3), np.uint8), 1)
    assert log.truncate_after(0) == 0
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_enabled_defaults_to_rank0(tmp_path):
    with RunLogger(tmp_path, console=False) as log:  # single process: rank 0
        assert log.enabled


class GuardedEnv(dict):
    """An os.environ stand-in that fails the test when a wandb variable is looked at."""

    WATCHED = {"WANDB_KEY", "WANDB_API_KEY", "ENTITY", "PROJECT", "WANDB_MODE", "WANDB_DIR"}

    def _check(self, key):
        assert key not in self.WATCHED, f"{key} was read although --wandb is off"

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._check(key)
        return super().__contains__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)


def test_wandb_env_not_read_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", GuardedEnv(os.environ))
    with RunLogger(tmp_path, enabled=True, console=False, tensorboard=False) as log:
        log.log_metrics(1, loss=1.0)
        log.info("no wandb")
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


@pytest.mark.parametrize("present, missing", [((), "WANDB_KEY"), (("WANDB_KEY",), "PROJECT")])
def test_wandb_online_missing_variable(tmp_path, monkeypatch, present, missing):
    for var in ("WANDB_KEY", "WANDB_API_KEY", "ENTITY", "PROJECT", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for var in present:
        monkeypatch.setenv(var, "x")
    with pytest.raises(WandbConfigError, match=missing):
        RunLogger(tmp_path, enabled=True, console=False, wandb=True)


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_KEY", "WANDB_API_KEY", "ENTITY", "PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, enabled=True, console=False, wandb=True, wandb_config={"model": "SiT-XL/2"}) as log:
        log.log_metrics(1, loss=0.5)
        log.log_image("samples", np.full((8, 8, 3), 0.5), 1)
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert len(runs) == 1 and runs[0].name.endswith(run_id)


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path, enabled=True, console=False, tensorboard=True) as log:
        log.log_metrics(10, loss=0.5, lr=1e-4)
        log.log_image("samples", torch.rand(3, 8, 8), 10)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_image_from_file(tmp_path):
    from PIL import Image

    from disploss.training.run.log import _image_array

    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(tmp_path / "grid.png")
    arr = _image_array(tmp_path / "grid.png")
    assert arr.shape == (4, 6, 3) and arr.dtype == np.uint8 and arr.max() == 7
    assert _image_array(torch.ones(3, 5, 5)).shape == (5, 5, 3)
    assert _image_array(np.ones((5, 5))).max() == 255
