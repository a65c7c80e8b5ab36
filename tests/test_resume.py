"""Exact resume (the reference's bug 3): a run stopped at step 2 and resumed to step 4 ends with the weights of
an uninterrupted 4-step run, in one process with loader workers and in two torchrun processes (gloo); the
README's torchrun command; `--ckpt latest`; and --disp-gather across two processes."""

from __future__ import annotations

import json
import textwrap

import pytest

from trainkit import SHIM, load, max_abs_diff, only_run, tiny_flags, torchrun, train_cli

TOL = 1e-5  # the bound; the runs are in fact bit-identical


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert max_abs_diff(a["model"], b["model"]) <= TOL
    assert max_abs_diff(a["ema"], b["ema"]) <= TOL


# -- one process ----------------------------------------------------------------------------------------------
def test_exact_resume_with_loader_workers_and_ckpt_latest(images, tmp_path, capsys):
    """--num-workers 2; the interrupted run uses the same command twice: `--ckpt latest` starts fresh when the
    results folder has no checkpoint and resumes (same folder, same data order) when it has one."""
    common = dict(num_workers=2, ckpt_every=2, disp=True)
    assert train_cli(tiny_flags(images, tmp_path / "straight", steps=4, **common)) == 0
    straight = load(only_run(tmp_path / "straight") / "checkpoints" / "0000004.pt")

    resumed_dir = tmp_path / "resumed"
    capsys.readouterr()
    assert train_cli(tiny_flags(images, resumed_dir, steps=2, ckpt="latest", **common)) == 0
    first = capsys.readouterr().out
    assert "resumed from" not in first  # nothing to resume: a fresh start in a new folder
    run = only_run(resumed_dir)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000002.pt"]

    assert train_cli(tiny_flags(images, resumed_dir, steps=4, ckpt="latest", **common)) == 0
    second = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / '0000002.pt'} at step 2" in second
    assert only_run(resumed_dir) == run  # continued in its own folder, no new one
    assert_same_weights(load(run / "checkpoints" / "0000004.pt"), straight)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# -- two processes --------------------------------------------------------------------------------------------
# Runs `disploss train` with dispersive_loss wrapped: each call also computes the loss of the concatenation of
# every process's representations (all_gather) and of the local batch alone, and records them per rank. The
# wrapper only adds a collective: values, random streams and weights are those of a plain run.
GATHER_CHECK = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import disploss.regularizer as regularizer_module
    from disploss.commands.main import leave, run_command

    original = regularizer_module.dispersive_loss
    records = []

    def checked(z, variant="infonce_l2", tau=1.0, margin=1.0, gather=False):
        value = original(z, variant, tau=tau, margin=margin, gather=gather)
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.detach().contiguous())
        records.append({
            "gather": gather, "shape": list(z.shape), "value": value.item(),
            "concat": original(torch.cat(parts), variant, tau=tau, margin=margin).item(),
            "local": original(z.detach(), variant, tau=tau, margin=margin).item(),
        })
        return value

    regularizer_module.dispersive_loss = checked
    status = run_command("train", sys.argv[1:])
    with open(os.path.join(os.environ["RECORDS"], "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump(records, f)
    sys.exit(leave(status))  # as train.py ends
    """
)


@pytest.fixture(scope="module")
def ddp(images, tmp_path_factory):
    """Three 2-process gloo runs with --disp --disp-gather: 4 steps straight (through the gather check),
    2 steps through the README's `torchrun ... train.py --model ... --data-path ... --disp`, then the same
    command with `--ckpt PATH` to step 4."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "gather_check.py"
    script.write_text(GATHER_CHECK)
    (root / "records").mkdir()
    common = dict(disp=True, disp_gather=True, ckpt_every=2, log_every=2)
    out = {"root": root}
    out["straight"] = torchrun(
        2, [script, *tiny_flags(images, root / "straight", steps=4, **common)], root, RECORDS=str(root / "records")
    )
    out["first"] = torchrun(2, [SHIM, *tiny_flags(images, root / "resumed", steps=2, **common)], root)
    if out["first"].returncode == 0:
        ckpt = only_run(root / "resumed") / "checkpoints" / "0000002.pt"
        out["second"] = torchrun(2, [SHIM, *tiny_flags(images, root / "resumed", steps=4, ckpt=ckpt, **common)], root)
    return out


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_readme_command_two_processes(ddp):
    _ok(ddp["first"])
    run = only_run(ddp["root"] / "resumed")
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["disp"] and config["model"] == "SiT-T/2"
    state = load(run / "checkpoints" / "0000002.pt")
    assert len(state["rng"]) == 2  # one random state per process


def test_exact_resume_two_processes(ddp):
    _ok(ddp["straight"])
    _ok(ddp["first"])
    _ok(ddp["second"])
    assert "resumed from" in ddp["second"].stdout
    straight = load(only_run(ddp["root"] / "straight") / "checkpoints" / "0000004.pt")
    resumed = load(only_run(ddp["root"] / "resumed") / "checkpoints" / "0000004.pt")
    assert_same_weights(resumed, straight)


def test_disp_gather_equals_the_loss_of_the_concatenation(ddp):
    _ok(ddp["straight"])
    ranks = [json.loads((ddp["root"] / "records" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]  # one call per step on each process
    for step in range(4):
        for r in ranks:
            rec = r[step]
            assert rec["gather"] and rec["shape"][0] == 4  # the local batch: 8 over 2 processes
            assert rec["value"] == pytest.approx(rec["concat"], abs=1e-6)
            # not the local loss: 10x the tolerance of the equality above (the draws are seeded per micro-batch)
            assert abs(rec["value"] - rec["local"]) > 1e-5
        assert ranks[0][step]["value"] == pytest.approx(ranks[1][step]["value"], abs=1e-6)
    # the logged dispersive term is that global value (mean over the 2 steps of a log line)
    metrics = [json.loads(x) for x in (only_run(ddp["root"] / "straight") / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    for m, pair in zip(metrics, [(0, 1), (2, 3)]):
        assert m["disp"] == pytest.approx(sum(ranks[0][i]["value"] for i in pair) / 2, abs=1e-5)
