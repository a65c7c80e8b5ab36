"""Disk space: --keep-last / --keep-every applied only after a new checkpoint is complete; the start-up space check
with the real checkpoint size; a full disk anywhere (a small tmpfs, /dev/full behind torch's own writer, ENOSPC at
every write of a run: log.txt, metrics.jsonl, a sample grid, the .npz, `sample --out`) is one line naming the file
and the space (free, needed) and, in training, the last good checkpoint, with no partial file left and never half
a line in metrics.jsonl or log.txt; the same command continues once there is space.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from disploss import fileio
from disploss.checkpoint import load_checkpoint, save_checkpoint
from disploss.commands.main import main
from disploss.fileio import DiskFullError, LineFile
from disploss.models import create_model
from disploss.training.run import folder as run_folder
from disploss.training.run.checkpoints import checkpoints_to_remove
from trainkit import (
    checkpoint_names,
    error_line,
    only_run,
    run_dirs,
    tiny_flags,
    torchrun,
    train_cli,
)


# -- retention ----------------------------------------------------------------------------------------------------
def test_keep_last_and_milestones(images, tmp_path):
    assert train_cli(tiny_flags(images, tmp_path, steps=7, keep_last=2, keep_every=3)) == 0
    assert checkpoint_names(only_run(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]
    assert checkpoints_to_remove([1, 2, 3, 4], None, None, newest=4) == []  # the default keeps all
    assert checkpoints_to_remove([5, 9, 7], 1, None, newest=7) == [5]  # the one just written is never removed


def test_retention_only_after_the_new_checkpoint_is_complete(images, tmp_path, monkeypatch, capsys):
    fail_on_full_dev(monkeypatch, at=5)
    assert train_cli(tiny_flags(images, tmp_path, steps=6, keep_last=2)) == 2
    run = only_run(tmp_path)
    assert checkpoint_names(run) == ["0000003.pt", "0000004.pt"]  # the failed save of step 5 cost no older checkpoint
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000004.pt'}" in error_line(capsys)


# -- the start-up space check -------------------------------------------------------------------------------------
def test_space_check_uses_the_real_checkpoint_size(images, tmp_path, monkeypatch, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=1)) == 0
    ckpt = only_run(tmp_path) / "checkpoints" / "0000001.pt"
    size = ckpt.stat().st_size
    model = create_model("SiT-T/2", input_size=8, in_channels=3, num_classes=3)
    estimate = run_folder.checkpoint_size_bytes(model)
    assert size <= estimate <= 1.02 * size + (64 << 10)  # a fresh run's estimate: the model and the AdamW state

    real = shutil.disk_usage
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * size - 1))
    assert train_cli(tiny_flags(images, tmp_path, steps=2, ckpt="latest")) == 2  # resuming: that file's size
    assert f"{2 * size} bytes needed" in error_line(capsys)
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: real(p)._replace(free=2 * size))
    assert train_cli(tiny_flags(images, tmp_path, steps=2, ckpt="latest")) == 0


# -- a full disk --------------------------------------------------------------------------------------------------
def fail_on_full_dev(monkeypatch, at: int) -> None:
    """From the `at`-th checkpoint on, the temporary file torch.save writes is /dev/full (every write fails with
    ENOSPC inside torch's own writer) and the disk reports 1 KiB free: a full disk, as torch meets it."""
    real_mkstemp, count = tempfile.mkstemp, [0]

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if ".pt." not in os.path.basename(name):  # a checkpoint's temporary file: .{step:07d}.pt.XXXX.tmp
            return fd, name
        count[0] += 1
        if count[0] < at:
            return fd, name
        os.unlink(name)
        os.symlink("/dev/full", name)  # torch.save(state, name) opens it by name: the kernel says ENOSPC
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
        return fd, name  # the descriptor of the removed regular file: fchmod never touches /dev/full

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


def test_full_disk_inside_torch_writer_is_one_line(images, tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(RuntimeError):  # what torch itself raises: not an OSError
        torch.save({"w": torch.ones(1000)}, "/dev/full")
    fail_on_full_dev(monkeypatch, at=3)
    assert train_cli(tiny_flags(images, tmp_path, steps=4)) == 2
    line = error_line(capsys)
    run = only_run(tmp_path)
    assert f"cannot write checkpoint {run / 'checkpoints' / '0000003.pt'}: No space left on device" in line
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000002.pt'}" in line
    assert checkpoint_names(run) == ["0000001.pt", "0000002.pt"]  # no partial or temporary file (nor link) left
    load_checkpoint(run / "checkpoints" / "0000002.pt")


@pytest.fixture
def small_filesystem(tmp_path):
    """An 80 MiB tmpfs (needs root): skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_on_a_real_small_filesystem(images, small_filesystem, capsys):
    """A checkpoint of this model is ~30 MB: the start-up check (two of them) passes on 80 MiB and two are
    written; torch's writer meets the real ENOSPC in the third."""
    assert train_cli(tiny_flags(images, small_filesystem, steps=4)) == 2
    line = error_line(capsys)
    run = only_run(small_filesystem)
    assert "No space left on device" in line
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000002.pt'}" in line
    assert checkpoint_names(run) == ["0000001.pt", "0000002.pt"]  # the partial temporary file is gone
    load_checkpoint(run / "checkpoints" / "0000002.pt")


def test_save_checkpoint_converts_torch_write_failure(tmp_path, monkeypatch):
    fail_on_full_dev(monkeypatch, at=1)
    from disploss.checkpoint import CheckpointWriteError

    with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
        save_checkpoint(tmp_path / "0000001.pt", {"w": torch.ones(4096)})
    assert isinstance(err.value, OSError) and err.value.errno == 28
    assert list(tmp_path.iterdir()) == []


# Rank 0 of a torchrun job writes its second checkpoint into /dev/full (as fail_on_full_dev does in process).
FULL_ON_RANK_0 = textwrap.dedent(
    """
    import os, shutil, sys, tempfile
    from disploss import fileio
    from disploss.commands.main import leave, run_command

    real_mkstemp, count = tempfile.mkstemp, [0]

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if ".pt." in os.path.basename(name):
            count[0] += 1
            if count[0] >= 2:
                os.unlink(name)
                os.symlink("/dev/full", name)
        return fd, name

    if os.environ["RANK"] == "0":
        fileio.tempfile.mkstemp = mkstemp
    sys.exit(leave(run_command("train", sys.argv[1:])))  # as train.py ends
    """
)


def test_full_disk_under_torchrun_stops_every_process(images, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    script = tmp_path / "full.py"
    script.write_text(FULL_ON_RANK_0)
    proc = torchrun(2, [script, *tiny_flags(images, tmp_path / "results", steps=4)], tmp_path, timeout=180)
    assert proc.returncode != 0
    run = only_run(tmp_path / "results")
    assert checkpoint_names(run) == ["0000001.pt"]
    # both processes stop (rank 1 no longer waits for rank 0 in a barrier); the error is printed once, by rank 0
    printed = [line for line in proc.stderr.splitlines() if line.startswith("disploss train: error: ")]
    assert len(printed) == 1, proc.stderr[-3000:]
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000001.pt'}" in printed[0]
    # rank 1 left by itself, with status 0 before rank 0's 2 (one node: torchrun lists no other failure)
    assert "<NO_OTHER_FAILURES>" in proc.stderr and "terminate called" not in proc.stderr


FULL = "/dev/full"
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full here")


def full_disk(monkeypatch, free: int = 1024) -> None:
    """The disk reports `free` bytes free (what the messages show)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def temporary_files_are_full(monkeypatch, marker: str) -> None:
    """Every temporary file of an atomic write whose name holds `marker` is /dev/full."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if marker in os.path.basename(name):
            os.unlink(name)
            os.symlink(FULL, name)
            full_disk(monkeypatch)
        return fd, name

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


def appends_fail(monkeypatch, name: str, marker: bytes = b"") -> None:
    """Appends to a file called `name` fail with ENOSPC from the first one holding `marker` on; that one first writes
    half of its bytes, as a disk that fills during the write does."""
    real_write, failing = os.write, [False]

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}").endswith(os.sep + name)
        except OSError:
            target = False
        if not target or (not failing[0] and marker not in bytes(data)):
            return real_write(fd, data)
        if not failing[0]:
            failing[0] = True
            if len(data) > 1:
                return real_write(fd, bytes(data[: len(data) // 2]))  # a short write: the next call meets the full disk
        full_disk(monkeypatch)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "write", write)


# -- the writer of whole lines ------------------------------------------------------------------------------------
@needs_dev_full
def test_a_line_cut_by_a_full_disk_is_removed_and_named(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = LineFile(path)
    log.write('{"step": 1}\n')
    appends_fail(monkeypatch, "metrics.jsonl")
    line = '{"step": 2, "loss": 0.5}\n'
    with pytest.raises(DiskFullError) as err:
        log.write(line)
    assert str(err.value) == (
        f"cannot write {path}: No space left on device (1024 bytes free in {tmp_path}, at least {len(line)} bytes "
        "needed)"
    )
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert path.read_text() == '{"step": 1}\n'  # the half line was written, then cut off again
    monkeypatch.undo()
    log.write('{"step": 2}\n')
    log.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


@needs_dev_full
@pytest.mark.parametrize("writer", ["save_grid", "save_samples_npz"])
def test_grids_and_npz_on_a_full_disk_name_the_file(tmp_path, monkeypatch, writer):
    from disploss.evaluation import save_samples_npz
    from disploss.imageio import save_grid

    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    out = tmp_path / ("grid.png" if writer == "save_grid" else "samples.npz")
    temporary_files_are_full(monkeypatch, out.name)
    with pytest.raises(DiskFullError) as err:
        save_grid(images, out) if writer == "save_grid" else save_samples_npz(out, images)
    message = str(err.value)
    assert message.startswith(f"cannot write {out}: No space left on device (1024 bytes free in {tmp_path}, at least ")
    if writer == "save_samples_npz":
        assert f"at least {images.nbytes} bytes needed" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial or temporary file (nor link) left


# -- training -----------------------------------------------------------------------------------------------------
@needs_dev_full
@pytest.mark.parametrize("name, marker", [("metrics.jsonl", b'{"step": 3'), ("log.txt", b"(step=0000003")])
def test_full_disk_while_logging_names_the_file_and_the_last_good_checkpoint(images, tmp_path, monkeypatch, capsys,
                                                                            name, marker):  # fmt: skip
    """Checkpoints every 2 steps, a log line every step: the disk fills between two checkpoints, in the middle of a
    line of metrics.jsonl (or of log.txt); then space is freed and the same command continues to the end."""
    command = tiny_flags(images, tmp_path, steps=5, ckpt_every=2, ckpt="latest")
    appends_fail(monkeypatch, name, marker)
    assert train_cli(command) == 2
    line = error_line(capsys)
    run = only_run(tmp_path)
    assert f"cannot write {run / name}: No space left on device (1024 bytes free in {run}, at least " in line
    assert f"; the last good checkpoint is {run / 'checkpoints' / '0000002.pt'}: free some space" in line
    assert line.endswith("then run the same command with --ckpt latest")
    for path in (run / "metrics.jsonl", run / "log.txt"):
        assert path.read_text().endswith("\n")  # whole lines only
    [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    monkeypatch.undo()  # space was freed
    assert train_cli(command) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


@needs_dev_full
def test_full_disk_at_the_sample_grid_names_it_and_the_last_good_checkpoint(images, tmp_path, monkeypatch, capsys):
    temporary_files_are_full(monkeypatch, "0000002.png")
    command = tiny_flags(images, tmp_path, steps=3, ckpt_every=1, sample_every=2, sample_steps=2)
    assert train_cli(command) == 2
    line = error_line(capsys)
    run = only_run(tmp_path)
    grid = run / "samples" / "0000002.png"
    assert f"cannot write {grid}: No space left on device (1024 bytes free in {grid.parent}, at least " in line
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000002.pt'}" in line


@needs_dev_full
def test_sample_out_on_a_full_disk_is_one_line(images, tmp_path, monkeypatch, capsys):
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1)) == 0
    ckpt = only_run(tmp_path / "results") / "checkpoints" / "0000001.pt"
    out = tmp_path / "grid.png"
    temporary_files_are_full(monkeypatch, "grid.png")
    capsys.readouterr()
    status = main(["sample", "ODE", "--ckpt", str(ckpt), "--out", str(out), "--num-sampling-steps", "2",
                   "--sampling-method", "euler", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err, err
    assert err.startswith(f"disploss sample: error: cannot write {out}: No space left on device (1024 bytes free in ")
    assert not out.exists()


# -- training: before the first step and while saving -----------------------------------------------------------


def test_full_disk_detected_before_training(images, tmp_path, monkeypatch, capsys):
    import shutil

    from disploss.training.run import folder as run_folder

    real = shutil.disk_usage
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1)) == 2
    assert "not enough free disk space" in error_line(capsys)
    assert not (tmp_path / "results").exists() or not run_dirs(tmp_path / "results")  # no folder, no step


def test_disk_full_while_saving_keeps_the_last_checkpoint(images, tmp_path, monkeypatch, capsys):
    real_save, count = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] == 2:
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert train_cli(tiny_flags(images, tmp_path, steps=3)) == 2
    assert "No space left on device" in error_line(capsys)
    run = only_run(tmp_path)
    assert checkpoint_names(run) == ["0000001.pt"]  # no partial or temporary file left
    load_checkpoint(run / "checkpoints" / "0000001.pt")
