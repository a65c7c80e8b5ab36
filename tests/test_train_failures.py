"""What `disploss train` does when its process dies, its loss goes non-finite or its images are unreadable. Each
test fails without the protection it names:
- kill -9 at any moment, mid-checkpoint-write included: never a partial checkpoint; the same command with
  `--ckpt latest` continues from the last complete one and ends with the weights of an uninterrupted run;
- a non-finite loss or gradient: an error naming the step and the term, the last good checkpoint intact; or,
  with `--on-nonfinite skip`, the step skipped and counted;
- unreadable images skipped with a warning naming each (or an error), in the run's log.txt too, whichever process
  or loader worker met them; empty folders named; never a hang.
Elsewhere: flag errors in test_cli.py and test_preflight.py, checkpoints that carry code or NaN in
test_checkpoint_safety.py, the run folder in test_run_folder.py, a full disk in test_disk_space.py.
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from disploss.checkpoint import load_checkpoint
from disploss.data import BadImageWarning
from disploss.training.objective import Objective
from trainkit import (
    checkpoint_names,
    error_line,
    load,
    make_image_folder,
    max_abs_diff,
    only_run,
    run_python,
    tiny_flags,
    train_cli,
)

# -- 1. kill -9 -----------------------------------------------------------------------------------------------
# Runs `disploss train ARGS` and SIGKILLs itself: KILL_MODE=save halfway through writing checkpoint KILL_AT
# (the bytes written so far are fsynced, as a real crash would leave them), KILL_MODE=step inside the forward
# pass of step KILL_AT. Test-only: the package has no kill hook.
KILLER = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch

    mode, at, count = os.environ["KILL_MODE"], int(os.environ["KILL_AT"]), [0]
    if mode == "save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] < at:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    else:
        import disploss.transport.transport as transport_module

        real_losses = transport_module.Transport.training_losses

        def losses(self, *args, **kwargs):
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_losses(self, *args, **kwargs)

        transport_module.Transport.training_losses = losses
    from disploss.commands.main import leave, run_command

    sys.exit(leave(run_command("train", sys.argv[1:])))  # as train.py ends
    """
)
STEPS = 5


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    results = tmp_path_factory.mktemp("uninterrupted")
    assert train_cli(tiny_flags(images, results, steps=STEPS, disp=True)) == 0
    return load(only_run(results) / "checkpoints" / f"{STEPS:07d}.pt")


@pytest.mark.parametrize("mode, at, last_complete", [("save", 3, 2), ("step", 4, 3)])
def test_kill_9_then_same_command_resumes_exactly(images, tmp_path, capsys, uninterrupted, mode, at, last_complete):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    command = tiny_flags(images, tmp_path / "results", steps=STEPS, disp=True, ckpt="latest")
    proc = run_python([killer, *command], tmp_path, KILL_MODE=mode, KILL_AT=str(at))
    assert proc.returncode == -9, proc.stderr[-3000:]

    run = only_run(tmp_path / "results")
    complete = [f"{s:07d}.pt" for s in range(1, last_complete + 1)]
    names = checkpoint_names(run)
    assert [n for n in names if n.endswith(".pt")] == complete  # the one being written never got its name
    if mode == "save":
        assert any(n.startswith(f".{at:07d}.pt.") and n.endswith(".tmp") for n in names)  # the partial write
    for name in complete:
        load_checkpoint(run / "checkpoints" / name)  # every checkpoint file is whole

    capsys.readouterr()
    assert train_cli(command) == 0  # the same command
    assert f"resumed from {run / 'checkpoints' / complete[-1]} at step {last_complete}" in capsys.readouterr().out
    assert checkpoint_names(run) == [f"{s:07d}.pt" for s in range(1, STEPS + 1)]  # stale temporary file removed
    final = load(run / "checkpoints" / f"{STEPS:07d}.pt")
    assert max_abs_diff(final["model"], uninterrupted["model"]) <= 1e-5
    assert max_abs_diff(final["ema"], uninterrupted["ema"]) <= 1e-5
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


# -- 2. non-finite loss or gradient ---------------------------------------------------------------------------
def inject_nan(monkeypatch, term: str, at: int) -> None:
    """Make training step `at` non-finite: its flow or dispersive term (and so the loss and the gradient), or
    only the gradient (the loss is multiplied by NaN, the logged terms stay finite)."""
    real = Objective.__call__
    count = [0]

    def losses(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == at:
            out = dict(out)
            if term in ("flow", "disp"):
                out[term] = out[term] * math.nan
            out["loss"] = out["loss"] * math.nan
        return out

    monkeypatch.setattr(Objective, "__call__", losses)


@pytest.mark.parametrize(
    "term, at, ckpt_every, message",
    [
        ("flow", 3, 1, "non-finite flow loss at step 3"),
        ("disp", 3, 2, "non-finite dispersive loss at step 3"),  # found at the step-4 checkpoint, not saved
        ("grad", 1, 1, "non-finite gradient at step 1"),
    ],
)
def test_nonfinite_stops_with_the_step_and_term(images, tmp_path, monkeypatch, capsys, term, at, ckpt_every, message):
    inject_nan(monkeypatch, term, at)
    assert train_cli(tiny_flags(images, tmp_path, steps=5, disp=True, ckpt_every=ckpt_every, log_every=5)) == 1
    assert message in error_line(capsys)
    run = only_run(tmp_path)
    good = [s for s in range(1, at) if s % ckpt_every == 0]
    assert checkpoint_names(run) == [f"{s:07d}.pt" for s in good]  # nothing written after the bad step
    for s in good:
        state = load(run / "checkpoints" / f"{s:07d}.pt")
        assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])


@pytest.mark.parametrize("at", [2, 3])  # a middle step, and the last one
def test_nonfinite_skip_counts_and_continues(images, tmp_path, monkeypatch, capsys, at):
    inject_nan(monkeypatch, "flow", at)
    assert train_cli(tiny_flags(images, tmp_path, steps=3, disp=True, on_nonfinite="skip")) == 0
    assert f"step {at}: non-finite flow loss; step skipped" in capsys.readouterr().out
    run = only_run(tmp_path)
    assert checkpoint_names(run) == ["0000001.pt", "0000002.pt", "0000003.pt"]  # no step lost, none extra
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [m["skipped_steps"] for m in lines] == [int(s >= at) for s in (1, 2, 3)]
    assert lines[at - 1]["loss"] == "NaN"  # a log window of skipped steps only has no mean
    before, after = (load(run / "checkpoints" / f"{s:07d}.pt") for s in (at - 1, at))
    assert max_abs_diff(before["model"], after["model"]) == 0  # the skipped step changed nothing
    assert max_abs_diff(before["ema"], after["ema"]) == 0
    assert after["skipped_steps"] == 1
    monkeypatch.undo()
    assert train_cli(tiny_flags(images, tmp_path, steps=4, disp=True, ckpt="latest")) == 0  # the count is kept
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["skipped_steps"] == 1


# -- 3. data --------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_images(tmp_path):
    """2 classes x 3 good PNGs, plus a truncated PNG and a text file named .png: 8 files, one batch."""
    root = make_image_folder(tmp_path / "bad_images", classes=2, per_class=3)
    good = (root / "class_0" / "0.png").read_bytes()
    (root / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "notes.png").write_text("not an image\n")
    return root


@pytest.mark.timeout(120)
def test_bad_images_skipped_with_a_warning_naming_each(bad_images, tmp_path):
    with pytest.warns(BadImageWarning) as caught:
        assert train_cli(tiny_flags(bad_images, tmp_path / "results", steps=1)) == 0
    text = "\n".join(str(w.message) for w in caught)
    assert "truncated.png" in text and "notes.png" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])  # with a worker the error crosses a process: still one line
def test_bad_image_error_policy(bad_images, tmp_path, capsys, workers):
    flags = tiny_flags(bad_images, tmp_path / "results", steps=1, on_bad_image="error", num_workers=workers)
    assert train_cli(flags) == 2
    line = error_line(capsys)
    assert "cannot read image file" in line and ("truncated.png" in line or "notes.png" in line)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::disploss.data.BadImageWarning")
def test_no_readable_image_is_an_error_not_a_hang(tmp_path, capsys):
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.png").write_text("nope")
    assert train_cli(tiny_flags(root, tmp_path / "results", steps=1, global_batch_size=2)) == 2
    assert f"no readable image file under {root}" in error_line(capsys)


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_class", "loose_files"])
def test_dataset_folder_errors_name_the_folder(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "empty_class":
        make_image_folder(root, classes=1, per_class=2)
        (root / "class_9").mkdir()
    if layout == "loose_files":
        make_image_folder(tmp_path / "x", classes=1, per_class=2)
        (tmp_path / "x" / "class_0").rename(root / "flat")
        for f in (root / "flat").iterdir():
            f.rename(root / f.name)
        (root / "flat").rmdir()
    assert train_cli(tiny_flags(root, tmp_path / "results", steps=1)) == 2
    line = error_line(capsys)
    assert str(root) in line
    if layout == "empty_class":
        assert "class_9" in line


def test_skip_warnings_of_a_loader_worker_reach_the_run_log(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    (data / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert train_cli(tiny_flags(data, tmp_path / "results", steps=3, num_workers=1, ckpt_every=3)) == 0
    log = (only_run(tmp_path / "results") / "log.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipping unreadable image file" in line]
    assert skipped and all(str(data / "class_1" / "broken.png") in line for line in skipped), log
    assert skipped[0].startswith("[") and "] WARNING: skipping" in skipped[0]


def test_skip_lines_name_the_process_under_torchrun(tmp_path, monkeypatch):
    from disploss.data import BadImageWarning, ImageFolderDataset

    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    (data / "class_0" / "0.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(data, 8)
    ds.log_skips_to(tmp_path / "log.txt")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.warns(BadImageWarning):
        ds[0]
    (line,) = (tmp_path / "log.txt").read_text().splitlines()
    assert "] WARNING (process 1): skipping unreadable image file" in line and str(data / "class_0" / "0.png") in line
