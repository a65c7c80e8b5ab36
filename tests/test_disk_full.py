"""A full disk anywhere (issue 20, item 6): every write of a run (log.txt, metrics.jsonl, a sample grid, the .npz,
`sample --out`) that meets ENOSPC is one line naming the file and the space (free, needed) and, in training, the
last good checkpoint; metrics.jsonl and log.txt never keep half a line; the same command continues once there is
space. Also: unreadable images skipped by a loader worker are named in the run's log.txt.

Two ways to fill a disk: the kernel's /dev/full behind a temporary file (every write fails, as on a full disk), and a
write that fails halfway through a line (what a disk that fills during the write leaves)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from disploss import fileio
from disploss.commands.main import main
from disploss.fileio import DiskFullError, LineFile
from trainkit import error_line, make_image_folder, only_run, tiny_flags, train_cli

FULL = "/dev/full"
pytestmark = pytest.mark.skipif(not os.path.exists(FULL), reason="no /dev/full here")


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


def test_full_disk_at_the_sample_grid_names_it_and_the_last_good_checkpoint(images, tmp_path, monkeypatch, capsys):
    temporary_files_are_full(monkeypatch, "0000002.png")
    command = tiny_flags(images, tmp_path, steps=3, ckpt_every=1, sample_every=2, sample_steps=2)
    assert train_cli(command) == 2
    line = error_line(capsys)
    run = only_run(tmp_path)
    grid = run / "samples" / "0000002.png"
    assert f"cannot write {grid}: No space left on device (1024 bytes free in {grid.parent}, at least " in line
    assert f"the last good checkpoint is {run / 'checkpoints' / '0000002.pt'}" in line


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


# -- unreadable images: in the run's log.txt too --------------------------------------------------------------------
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
