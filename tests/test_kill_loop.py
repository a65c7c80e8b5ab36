"""kill -9, again and again (issue 20, item 7): a 2-process torchrun training run and a 2-process sample-ddp are each
killed three times at points drawn from a fixed seed (so a failure reproduces), every time rerun with the same
command, and end in the uninterrupted result: the same weights (EMA included) and metrics lines, the same .npz
byte for byte in its images.

The points: in training, a forward pass of rank 0 or rank 1, or halfway through rank 0's writing of a checkpoint
(the bytes written so far fsynced, as a crash leaves them); in sampling, right after the process that writes the
k-th image of the folder saved it, or halfway through the writing of the .npz. Each point is drawn among those the
next launch reaches, so that every launch is killed."""

from __future__ import annotations

import json
import random
import textwrap

import numpy as np
import pytest

from disploss.checkpoint import checkpoint_step, load_checkpoint
from disploss.commands.main import main
from disploss.evaluation.npz import load_samples_npz
from trainkit import MODEL, SHIM, load, max_abs_diff, only_run, save_training_checkpoint, tiny_flags, tiny_sit, torchrun

KILLS = 3
TRAIN_SEED, SAMPLE_SEED = 19, 20  # seed 19 draws both kinds of point and both ranks (asserted below)

# `disploss COMMAND ARGS` that SIGKILLs itself at KILL_MODE / KILL_AT on the process of rank KILL_RANK (any rank
# for "image"). Test-only: the package has no kill hook.
KILLER = textwrap.dedent(
    """
    import io, os, signal, sys
    from pathlib import Path

    mode, at = os.environ["KILL_MODE"], int(os.environ["KILL_AT"])
    mine = os.environ.get("KILL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
    count = [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write_half_then_die(real, obj, f):
        buffer = io.BytesIO()
        real(buffer, obj) if real.__name__ == "savez" else real(obj, buffer)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        die()

    if mode == "step" and mine:
        import disploss.transport.transport as transport_module

        real_losses = transport_module.Transport.training_losses

        def losses(self, *args, **kwargs):
            count[0] += 1
            if count[0] == at:
                die()
            return real_losses(self, *args, **kwargs)

        transport_module.Transport.training_losses = losses
    elif mode == "save" and mine:
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] < at:
                return real_save(obj, f, *args, **kwargs)
            write_half_then_die(real_save, obj, f)

        torch.save = save
    elif mode == "image":  # whichever process saves the at-th image of the folder
        from disploss import imageio

        real_png = imageio.save_png

        def save_png(array, path):
            real_png(array, path)
            if len(list(Path(path).parent.glob("*.png"))) >= at:
                die()

        imageio.save_png = save_png
    elif mode == "npz":
        import numpy as np

        real_savez = np.savez

        def savez(f, **arrays):
            write_half_then_die(real_savez, arrays["arr_0"], f.name)

        np.savez = savez
    from disploss.commands.main import leave, run_command

    sys.exit(leave(run_command(os.environ["COMMAND"], sys.argv[1:])))  # as train.py ends
    """
)


def write_killer(tmp_path):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    return killer


# -- training -----------------------------------------------------------------------------------------------------
STEPS, CKPT_EVERY = 8, 2


def checkpoint_steps(run) -> list[int]:
    if run is None or not (run / "checkpoints").is_dir():
        return []
    return sorted(s for s in map(checkpoint_step, (run / "checkpoints").iterdir()) if s is not None)


def next_training_point(rng: random.Random, done: int) -> dict:
    """A point the next launch reaches, which resumes from step `done`: a forward pass of either process among its
    remaining steps, or the write of one of its remaining checkpoints on rank 0."""
    remaining_saves = (STEPS - done) // CKPT_EVERY
    if rng.random() < 0.5 and remaining_saves > 1:
        return {"KILL_MODE": "save", "KILL_RANK": "0", "KILL_AT": str(rng.randint(1, remaining_saves - 1))}
    return {"KILL_MODE": "step", "KILL_RANK": str(rng.randint(0, 1)), "KILL_AT": str(rng.randint(1, STEPS - done - 1))}


@pytest.mark.timeout(900)
def test_a_two_process_run_killed_three_times_ends_as_the_uninterrupted_one(images, tmp_path):
    flags = dict(steps=STEPS, disp=True, ckpt_every=CKPT_EVERY, ckpt="latest")
    straight = torchrun(2, [SHIM, *tiny_flags(images, tmp_path / "straight", **flags)], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = load(only_run(tmp_path / "straight") / "checkpoints" / f"{STEPS:07d}.pt")

    killer, results = write_killer(tmp_path), tmp_path / "results"
    command = tiny_flags(images, results, **flags)
    rng, done, points = random.Random(TRAIN_SEED), 0, []
    for _ in range(KILLS):
        point = next_training_point(rng, done)
        points.append(point)
        proc = torchrun(2, [killer, *command], tmp_path, COMMAND="train", **point)
        assert proc.returncode != 0, (points, proc.stderr[-3000:])
        run = only_run(results)
        steps = checkpoint_steps(run)
        for step in steps:  # every checkpoint under its final name is whole; a killed write left none
            load_checkpoint(run / "checkpoints" / f"{step:07d}.pt")
        assert all(line.endswith("}") for line in (run / "metrics.jsonl").read_text().splitlines())
        done = max(steps, default=0)
    assert len({p["KILL_MODE"] for p in points}) == 2 and len({p["KILL_RANK"] for p in points}) == 2, points

    final = torchrun(2, [SHIM, *command], tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert only_run(results) == run  # the same folder all along
    got = load(run / "checkpoints" / f"{STEPS:07d}.pt")
    assert max_abs_diff(got["model"], want["model"]) <= 1e-5, points
    assert max_abs_diff(got["ema"], want["ema"]) <= 1e-5, points
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )


# -- sample-ddp ---------------------------------------------------------------------------------------------------
N = 40  # two claim blocks (32 + 8): both processes sample
ARGS = ["ODE", "--sampling-method", "euler", "--num-sampling-steps", "2", "--num-fid-samples", str(N),
        "--device", "cpu", "--per-proc-batch-size", "2"]  # fmt: skip


def folder_and_npz(sample_dir):
    folders = [p for p in sample_dir.iterdir() if p.is_dir()] if sample_dir.is_dir() else []
    if not folders:
        return None, None
    (folder,) = folders
    return folder, folder.with_name(folder.name + ".npz")


@pytest.mark.timeout(900)
def test_sample_ddp_killed_three_times_ends_with_the_uninterrupted_npz(tmp_path, capsys):
    ckpt = save_training_checkpoint(tmp_path / "0000100.pt", tiny_sit(0, preset=MODEL))
    assert main(["sample-ddp", *ARGS, "--ckpt", str(ckpt), "--sample-dir", str(tmp_path / "straight")]) == 0
    want = load_samples_npz(folder_and_npz(tmp_path / "straight")[1])  # one process: the .npz does not depend on it

    killer, sample_dir = write_killer(tmp_path), tmp_path / "samples"
    command = [*ARGS, "--ckpt", ckpt, "--sample-dir", sample_dir]
    rng, points = random.Random(SAMPLE_SEED), []
    for i in range(KILLS):
        folder, npz = folder_and_npz(sample_dir)
        have = len(list(folder.glob("*.png"))) if folder is not None else 0
        if i == KILLS - 1 or have >= N - 4:
            point = {"KILL_MODE": "npz", "KILL_AT": "1"}  # the last one: halfway through the .npz
        else:
            point = {"KILL_MODE": "image", "KILL_AT": str(rng.randint(have + 2, min(have + 16, N - 2)))}
        points.append(point)
        proc = torchrun(2, [killer, *command], tmp_path, COMMAND="sample-ddp", **point)
        assert proc.returncode != 0, (points, proc.stderr[-3000:])
        folder, npz = folder_and_npz(sample_dir)
        assert not npz.exists(), points  # a killed .npz write never gets its name
        for png in folder.glob("*.png"):
            assert png.stat().st_size > 0

    final = torchrun(2, [SHIM.with_name("sample_ddp.py"), *command], tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    got = load_samples_npz(npz)
    assert got.shape == want.shape and np.array_equal(got, want), points
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no claim or temporary file left
