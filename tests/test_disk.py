"""Disk (issue 13, part 4): --keep-last / --keep-every applied only after a new checkpoint is complete; the start-up
space check with the real checkpoint size; a real full disk (a small tmpfs, and /dev/full behind torch's own
writer) is a one-line error naming the last good checkpoint, with no partial file left."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap

import pytest
import torch

from disploss import fileio
from disploss.checkpoint import load_checkpoint, save_checkpoint
from disploss.models import create_model
from disploss.training.run import folder as run_folder
from disploss.training.run.checkpoints import checkpoints_to_remove
from trainkit import error_line, only_run, tiny_flags, torchrun, train_cli


def names(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# -- retention ----------------------------------------------------------------------------------------------------
def test_keep_last_and_milestones(images, tmp_path):
    assert train_cli(tiny_flags(images, tmp_path, steps=7, keep_last=2, keep_every=3)) == 0
    assert names(only_run(tmp_path)) == ["0000003.pt", "0000006.pt", "0000007.pt"]
    assert checkpoints_to_remove([1, 2, 3, 4], None, None, newest=4) == []  # the default keeps all
    assert checkpoints_to_remove([5, 9, 7], 1, None, newest=7) == [5]  # the one just written is never removed


def test_retention_only_after_the_new_checkpoint_is_complete(images, tmp_path, monkeypatch, capsys):
    fail_on_full_dev(monkeypatch, at=5)
    assert train_cli(tiny_flags(images, tmp_path, steps=6, keep_last=2)) == 2
    run = only_run(tmp_path)
    assert names(run) == ["0000003.pt", "0000004.pt"]  # the failed save of step 5 cost no older checkpoint
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
    assert names(run) == ["0000001.pt", "0000002.pt"]  # no partial or temporary file (nor link) left
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
    assert names(run) == ["0000001.pt", "0000002.pt"]  # the partial temporary file is gone
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
    from disploss.commands.main import run_command

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
    sys.exit(run_command("train", sys.argv[1:]))
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
    assert names(run) == ["0000001.pt"]
    # both processes stop (rank 1 no longer waits for rank 0 in a barrier); the error is printed once, by rank 0
    printed = [line for line in proc.stderr.splitlines() if line.startswith("disploss train: error: ")]
    assert len(printed) == 1, proc.stderr[-3000:]
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000001.pt'}" in printed[0]
    # rank 1 left by itself, with status 0 before rank 0's 2 (one node: torchrun lists no other failure)
    assert "<NO_OTHER_FAILURES>" in proc.stderr and "terminate called" not in proc.stderr
