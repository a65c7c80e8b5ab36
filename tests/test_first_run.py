"""What a new user sees first: --help, the demo's threads and progress, the warnings of a training run that
works but is likely a mistake, the log line before a long sample grid, and the loss plot."""

from __future__ import annotations

import json
import re

import pytest
import torch

from disploss.commands.main import COMMANDS, build_parser
from trainkit import make_image_folder, tiny_flags, train_cli

HELPS = [*(c for c in COMMANDS if c not in ("sample", "sample-ddp", "experiment")), "sample ODE", "sample SDE",
         "sample-ddp ODE", "sample-ddp SDE", "experiment digits", "experiment samplers"]  # fmt: skip


@pytest.mark.parametrize("command", HELPS)
def test_help_shows_each_default_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")  # one line per option
    name, *mode = command.split()
    with pytest.raises(SystemExit):
        build_parser(name).parse_args([*mode, "--help"])
    text = capsys.readouterr().out
    options = [line for line in text.splitlines() if line.lstrip().startswith("-")]
    assert options
    for line in options:
        assert line.count("(default") <= 1, line
        assert "(default: None)" not in line, line


def test_two_class_folder_with_the_default_num_classes_and_too_many_workers_warn_once(tmp_path, capsys):
    import os

    data = make_image_folder(tmp_path / "data", classes=2, per_class=8)
    cpus = torch._utils.cpu_count()
    flags = tiny_flags(data, tmp_path / "results", steps=2, num_classes=1000, num_workers=cpus + 1)
    assert train_cli(flags) == 0
    out = capsys.readouterr()
    (run,) = (tmp_path / "results").iterdir()
    log = (run / "log.txt").read_text()
    assert log.count("the data has 2 classes but --num-classes is 1000") == 1
    assert "pass --num-classes 2" in log
    assert log.count(f"--num-workers {cpus + 1} (per process) is more than the {cpus} CPU(s)") == 1
    assert "This DataLoader will create" not in out.err + out.out  # torch's own warning, per epoch: silenced
    assert os.cpu_count()


def test_no_warning_for_a_matching_setup(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    # A warmed-up EMA: a 1-step run with the constant 0.9999 is warned about (its EMA is the initial weights).
    assert train_cli(tiny_flags(data, tmp_path / "results", steps=1, ema_warmup_power=0.75)) == 0
    (run,) = (tmp_path / "results").iterdir()
    assert "WARNING" not in (run / "log.txt").read_text()


def test_log_lines_show_progress_and_eta_and_the_grid_is_announced(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    assert train_cli(tiny_flags(data, tmp_path / "results", steps=4, log_every=2, sample_every=4, sample_steps=3)) == 0
    (run,) = (tmp_path / "results").iterdir()
    lines = (run / "log.txt").read_text().splitlines()
    step2 = next(line for line in lines if "(step=0000002/0000004" in line)
    assert re.search(r"\(step=0000002/0000004 50% ETA \d+:\d\d:\d\d\) loss: ", step2), step2
    assert any("(step=0000004/0000004 100%) loss: " in line for line in lines)  # no ETA at the end
    announce = next(i for i, line in enumerate(lines) if "sampling grid 0000004.png" in line)
    assert "24 images from the EMA weights, Heun ODE with 3 grid points (4 model calls), cfg 4.0" in lines[announce]
    assert re.search(r"wrote sample grid .*0000004\.png in \d+ s", lines[announce + 1])


def test_runlogger_eta(tmp_path):
    from disploss.training.run.log import RunLogger

    with RunLogger(tmp_path, enabled=True, console=False) as log:
        log.log_metrics(100, loss=0.25)  # without a total: the old form
        log.total_steps = 1500
        log.log_metrics(350, loss=0.25, steps_per_sec=2.0)  # 1150 steps left at 2 steps/s: 575 s
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert "(step=0000100) loss: 0.2500" in lines[0]
    assert "(step=0000350/0001500 23% ETA 0:09:35) loss: 0.2500, steps_per_sec: 2.0000" in lines[1]


def _fake_run(tmp_path, disp: bool):
    run = tmp_path / "000-SiT-T-2-Linear-velocity-None"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"disp": disp, "disp_weight": 0.25, "disp_variant": "infonce_cosine"}))
    rows = [{"step": 50 * k, "loss": 1.0 / k - 0.25 * 0.4, "flow": 1.0 / k, "disp": -0.4 - 0.01 * k} for k in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, rows


def test_loss_plot_has_a_panel_per_term_with_labelled_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.training.run.plots import plot_run

    run, rows = _fake_run(tmp_path, disp=True)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    assert plot_run(run).is_file()
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["flow-matching loss", "dispersive loss (infonce_cosine)",
                                              "total = flow + 0.25 x dispersive"]  # fmt: skip
    for ax, key in zip(axes, ("flow", "disp", "loss")):
        assert ax.get_ylabel() and ax.get_xlabel() == "training step"
        (line,) = ax.get_lines()
        assert list(line.get_ydata()) == [r[key] for r in rows]  # each panel draws its own term only


def test_loss_plot_shows_the_diagnostics_under_the_losses(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.training.run.plots import plot_run

    run, rows = _fake_run(tmp_path, disp=True)
    for k, row in enumerate(rows):  # two regularised blocks: the plot draws their mean
        row.update({"diag/blocks.0/rms": 1.0 + k, "diag/blocks.1/rms": 3.0 + k, "diag/blocks.0/unsaturated": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_run(run).is_file()
    titles = {ax.get_title(): ax for ax in figures[0].axes}
    rms = next(ax for title, ax in titles.items() if title.startswith("rms of the representations"))
    assert list(rms.get_lines()[0].get_ydata()) == [2.0, 3.0, 4.0]
    assert any(title.startswith("pairs the InfoNCE terms still pull apart") for title in titles)
    assert not any(title.startswith("effective rank") for title in titles)  # no such key logged: no panel
    assert not any(title.startswith("median pairwise distance") for title in titles)


def test_loss_plot_shows_the_pairwise_distance_against_tau(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.training.run.plots import plot_run

    run, rows = _fake_run(tmp_path, disp=True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "disp_variant": "infonce_l2", "disp_tau": 16.0}))
    for k, row in enumerate(rows):
        row.update({"diag/blocks.0/median_d": 2.0 * 10**k, "diag/blocks.1/median_d": 4.0 * 10**k})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert plot_run(run).is_file()
    (ax,) = [ax for ax in figures[0].axes if ax.get_title().startswith("median pairwise distance")]
    curve, tau = ax.get_lines()
    assert list(curve.get_ydata()) == [3.0, 30.0, 300.0] and list(tau.get_ydata()) == [16.0, 16.0]
    assert ax.get_yscale() == "log" and "tau = 16" in ax.get_legend().get_texts()[0].get_text()


def test_demo_trains_on_one_thread_by_default_and_restores_threads(tmp_path, monkeypatch, capsys):
    import disploss.commands.demo as demo

    run, _ = _fake_run(tmp_path, disp=True)
    seen = []

    def fake_train(tc):
        seen.append((torch.get_num_threads(), tc.max_steps))
        return run

    monkeypatch.setattr(demo, "train", fake_train)
    torch.set_num_threads(2)
    try:
        demo.run_demo(demo.DemoConfig(results_dir=str(tmp_path), steps=7))
        assert seen == [(1, 7)] and torch.get_num_threads() == 2
        demo.run_demo(demo.DemoConfig(results_dir=str(tmp_path), steps=7, threads=2))
    finally:
        torch.set_num_threads(1)  # the session's one thread (conftest.single_thread)
    assert seen[-1] == (2, 7)
    out = capsys.readouterr().out
    assert "1 CPU thread(s)" in out and "--cfg-scale 2.0" in out
