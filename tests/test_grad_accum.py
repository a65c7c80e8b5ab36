"""--grad-accum-steps K and the split of the global batch: 1 process with K = 2 reaches the weights of 2 processes with
K = 1 on the same micro-batches (with and without --disp); a run resumes exactly across a change of process count
that keeps processes x K (2 -> 1 and 1 -> 2), and is refused in one line naming the original split otherwise; DDP
all-reduces once per optimizer step, not per micro-batch."""

from __future__ import annotations

import shutil

import pytest
import torch

from disploss.errors import ConfigError
from disploss.training import TrainConfig
from disploss.training.run.resume import Resume, check_process_split
from trainkit import SHIM, load, max_abs_diff, only_run, run_dirs, tiny_flags, tiny_sit, torchrun, train_cli

# Two processes average their gradients in DDP's all-reduce, one process sums the K micro-batches' gradients scaled
# by 1 / K: the same numbers up to float rounding. Measured on the 2-core CPU (gloo, 2026-12-04): bit-identical
# weights after 4 steps, with and without --disp; the bound leaves room for other reduction orders (NCCL, GPUs).
TOL = 1e-5
COMMON = dict(ckpt_every=2, log_every=2)


def _last(results, step: int = 4) -> dict:
    return load(only_run(results) / "checkpoints" / f"{step:07d}.pt")


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert max_abs_diff(a["model"], b["model"]) <= TOL
    assert max_abs_diff(a["ema"], b["ema"]) <= TOL


@pytest.fixture(scope="module")
def runs(images, tmp_path_factory):
    """With --disp: 2 processes x K 1 and 1 process x K 2, 4 steps each (checkpoints at 2 and 4); each one's step-2
    checkpoint, copied out of its run folder, continued to step 4 by the other split (2 -> 1 and 1 -> 2).
    Without --disp: both splits, 2 steps."""
    root = tmp_path_factory.mktemp("accum")
    out = {"root": root}
    out["two"] = torchrun(2, [SHIM, *tiny_flags(images, root / "two", steps=4, disp=True, **COMMON)], root)
    out["one"] = train_cli(tiny_flags(images, root / "one", steps=4, disp=True, grad_accum_steps=2, **COMMON))
    out["two_flow"] = torchrun(2, [SHIM, *tiny_flags(images, root / "two_flow", steps=2, **COMMON)], root)
    out["one_flow"] = train_cli(tiny_flags(images, root / "one_flow", steps=2, grad_accum_steps=2, **COMMON))
    if out["two"].returncode == 0 and out["one"] == 0:
        for name in ("two", "one"):
            shutil.copy(only_run(root / name) / "checkpoints" / "0000002.pt", root / f"{name}_at_2.pt")
        flags = tiny_flags(images, root / "two_to_one", steps=4, disp=True, grad_accum_steps=2, **COMMON)
        out["two_to_one"] = train_cli([*flags, "--ckpt", str(root / "two_at_2.pt")])
        flags = tiny_flags(images, root / "one_to_two", steps=4, disp=True, ckpt=root / "one_at_2.pt", **COMMON)
        out["one_to_two"] = torchrun(2, [SHIM, *flags], root)
    return out


def test_one_process_with_two_micro_batches_equals_two_processes(runs):
    _ok(runs["two"])
    assert runs["one"] == 0
    root = runs["root"]
    for step in (2, 4):
        _same(_last(root / "one", step), _last(root / "two", step))
    first = _last(root / "one", 2)
    assert max_abs_diff(first["model"], _last(root / "one")["model"]) > 1e-4  # the steps did move the weights
    assert first["args"]["grad_accum_steps"] == 2 and first["args"]["world_size"] == 1


def test_the_same_without_the_dispersive_term(runs):
    _ok(runs["two_flow"])
    assert runs["one_flow"] == 0
    _same(_last(runs["root"] / "one_flow", 2), _last(runs["root"] / "two_flow", 2))


def test_resume_from_two_processes_with_one_exactly(runs):
    assert runs["two_to_one"] == 0
    resumed = _last(runs["root"] / "two_to_one")
    _same(resumed, _last(runs["root"] / "two"))
    assert max_abs_diff(resumed["model"], _last(runs["root"] / "one")["model"]) <= TOL


def test_resume_from_one_process_with_two_exactly(runs):
    _ok(runs["one_to_two"])
    assert "resumed from" in runs["one_to_two"].stdout
    _same(_last(runs["root"] / "one_to_two"), _last(runs["root"] / "one"))


def test_another_split_is_refused_in_one_line_before_anything_is_written(runs, images, tmp_path, capsys):
    _ok(runs["two"])
    results = tmp_path / "results"
    capsys.readouterr()
    assert train_cli(tiny_flags(images, results, steps=4, disp=True, ckpt=runs["root"] / "two_at_2.pt")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("disploss train: error: --ckpt ") and "\n" not in err, err
    assert "was trained by 2 process(es) x --grad-accum-steps 1 (2 micro-batches of 4 per step)" in err
    assert "this run has 1 x 1" in err and "--grad-accum-steps 2 with 1 process(es)" in err
    assert not results.exists() or not run_dirs(results)  # no run folder: refused before it


# -- the split, as functions ----------------------------------------------------------------------------------------
def _resume(world: int, k: int = 1) -> Resume:
    return Resume(path="c.pt", state={"args": {"world_size": world, "grad_accum_steps": k}}, step=2)


def test_check_process_split_allows_the_same_micro_batches_and_refuses_others():
    cfg = lambda **kw: TrainConfig(data_path="d", global_batch_size=8, **kw)  # noqa: E731
    check_process_split(cfg(grad_accum_steps=2), _resume(2), world=1, num_items=24)  # 2 -> 1, K 1 -> 2
    check_process_split(cfg(), _resume(1, 2), world=2, num_items=24)  # 1 -> 2, K 2 -> 1
    check_process_split(cfg(), _resume(2), world=2, num_items=24)  # unchanged
    check_process_split(cfg(), Resume(path="c.pt", state={"model": {}}), world=2, num_items=24)  # weights only
    with pytest.raises(ConfigError, match=r"trained by 1 process\(es\) x --grad-accum-steps 1 .*this run has 2 x 1"):
        check_process_split(cfg(), _resume(1), world=2, num_items=24)  # 1 -> 2 without K
    with pytest.raises(ConfigError, match="with --disp-gather the dispersive term spans the processes"):
        check_process_split(cfg(grad_accum_steps=2, disp_gather=True), _resume(2), world=1, num_items=24)
    # 23 items: 2 processes pad the epoch to 24 and take 3 steps, 1 process takes 2: the epochs would differ
    with pytest.raises(ConfigError, match="do not split into whole steps alike"):
        check_process_split(cfg(grad_accum_steps=2), _resume(2), world=1, num_items=23)


def test_strided_micro_batches_are_the_batches_of_more_processes():
    """Micro-batch k of process r under (P, K) holds the samples that rank P k + r gets under (P K, 1), in order:
    derived from torch's DistributedSampler directly."""
    n, micro, steps = 48, 3, 4
    reference = {}
    for rank in range(4):  # 4 processes, K = 1: rank o's batch of each step
        order = list(torch.utils.data.DistributedSampler(range(n), num_replicas=4, rank=rank, seed=5))
        reference[rank] = [order[s * micro : (s + 1) * micro] for s in range(steps)]
    from disploss.training.loader import ResumableSampler

    for world, k in ((1, 4), (2, 2)):
        for rank in range(world):
            keys = list(ResumableSampler(n, world, rank, seed=5))
            local = torch.tensor([index for _, index in keys])
            for step in range(steps):
                batch = local[step * k * micro : (step + 1) * k * micro]
                for j in range(k):
                    assert batch[j::k].tolist() == reference[world * j + rank][step], (world, k, rank, step, j)


def test_accumulated_gradient_is_the_mean_of_the_micro_batches():
    """train_step with K = 2 leaves the mean of the two micro-batches' gradients, each drawn under its own seed."""
    from disploss.training.ema import EMA
    from disploss.training.objective import Objective
    from disploss.training.step import StepOptions, seed_micro_batch, train_step
    from disploss.transport import create_transport

    model = tiny_sit(0).train()
    objective = Objective(create_transport("Linear", "velocity", None, None, None))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    expected = {}
    for k in range(2):
        model.zero_grad()
        seed_micro_batch(7, 3, k, x.device)
        objective(model, x[k::2], y[k::2])["loss"].mean().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:  # pos_embed is frozen
                expected[name] = expected.get(name, 0) + p.grad / 2
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, objective, opt, EMA(model), x, y, StepOptions("fp32", grad_accum_steps=2, seed=7), step=3)
    assert expected and {n for n, p in model.named_parameters() if p.grad is not None} == set(expected)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_ddp_all_reduces_once_per_step_not_per_micro_batch(tmp_path):
    import torch.distributed as tdist

    from disploss.training.ema import EMA
    from disploss.training.objective import Objective
    from disploss.training.step import StepOptions, train_step
    from disploss.transport import create_transport

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_sit(0).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []

        def counting(state, bucket):
            calls.append(1)
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, counting)
        objective = Objective(create_transport("Linear", "velocity", None, None, None))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        x, y = torch.randn(6, 4, 8, 8), torch.randint(0, 5, (6,))
        counts = []
        for k in (1, 3):
            calls.clear()
            train_step(ddp, objective, opt, EMA(model), x, y, StepOptions("fp32", grad_accum_steps=k, seed=0))
            counts.append(len(calls))
        assert counts[0] >= 1 and counts[1] == counts[0]  # K = 3: the buckets of one backward, not three
    finally:
        tdist.destroy_process_group()
