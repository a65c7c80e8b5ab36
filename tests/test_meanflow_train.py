"""`train --objective meanflow`: a run end to end (config, checkpoint, one-step grid), exact resume in two torchrun
processes (gloo) with the dispersive term and guidance, one-line errors, and the fast paths (bf16 autocast,
torch.compile wrapping) through the shared train_step."""

from __future__ import annotations

import json

import pytest
import torch

from disploss.meanflow import MeanFlowSettings
from trainkit import (
    MEANFLOW_SIT,
    SHIM,
    error_line,
    load,
    max_abs_diff,
    only_run,
    tiny_flags,
    tiny_sit,
    torchrun,
    train_cli,
)

MF = dict(objective="meanflow", meanflow_ratio=0.5)  # half the batch takes the JVP (8 px images, batch 8)


def test_meanflow_run_end_to_end(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=2, sample_every=2, disp=True, **MF)) == 0
    run = only_run(tmp_path)
    assert run.name.endswith("SiT-T-2-Linear-meanflow-None")
    config = json.loads((run / "config.json").read_text())
    assert config["objective"] == "meanflow" and config["model_config"]["meanflow"] is True
    assert config["meanflow"] == {**vars(MeanFlowSettings()), "ratio": 0.5}
    state = load(run / "checkpoints" / "0000002.pt")
    assert any(k.startswith("r_embedder.") for k in state["ema"])
    assert (run / "samples" / "0000002.png").is_file()  # the one-step grid
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < m["loss"] - 0.25 * m["disp"] <= 1 for m in lines)  # ||d||^2 / (||d||^2 + c) lies in (0, 1)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (dict(path_type="VP"), "--objective meanflow does not support --path-type VP"),
        (dict(prediction="noise"), "--objective meanflow does not support --prediction noise"),
        (dict(meanflow_ratio=1.5), "--meanflow-ratio must lie in [0.0, 1.0], got 1.5"),
        (dict(meanflow_kappa=1.0), "--meanflow-kappa must lie in [0.0, 1.0), got 1.0"),
    ],
)
def test_bad_meanflow_flags_are_one_line(images, tmp_path, capsys, flags, expected):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, **{**MF, **flags})) == 2
    assert expected in error_line(capsys)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any folder was made


def test_flow_checkpoint_for_a_meanflow_run_names_the_objective(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path / "flow", steps=1)) == 0
    ckpt = only_run(tmp_path / "flow") / "checkpoints" / "0000001.pt"
    capsys.readouterr()
    assert train_cli(tiny_flags(images, tmp_path / "mf", steps=2, ckpt=ckpt, **MF)) == 2
    assert "the checkpoint is a flow-matching model: pass --objective flow" in error_line(capsys)


@pytest.fixture(scope="module")
def ddp(images, tmp_path_factory):
    """Two 2-process gloo MeanFlow runs with --disp (its term gathered over both processes) and guidance folded
    into the target: 4 steps straight, and 2 steps then `--ckpt` to step 4 through the train.py shim."""
    root = tmp_path_factory.mktemp("mf_ddp")
    common = dict(disp=True, disp_gather=True, ckpt_every=2, log_every=2, meanflow_omega=1.5, meanflow_kappa=0.5, **MF)
    out = {"root": root}
    out["straight"] = torchrun(2, [SHIM, *tiny_flags(images, root / "straight", steps=4, **common)], root)
    out["first"] = torchrun(2, [SHIM, *tiny_flags(images, root / "resumed", steps=2, **common)], root)
    if out["first"].returncode == 0:
        ckpt = only_run(root / "resumed") / "checkpoints" / "0000002.pt"
        out["second"] = torchrun(2, [SHIM, *tiny_flags(images, root / "resumed", steps=4, ckpt=ckpt, **common)], root)
    return out


def test_meanflow_resumes_exactly_in_two_processes(ddp):
    for key in ("straight", "first", "second"):
        assert ddp[key].returncode == 0, ddp[key].stdout[-3000:] + ddp[key].stderr[-3000:]
    assert "resumed from" in ddp["second"].stdout
    straight = load(only_run(ddp["root"] / "straight") / "checkpoints" / "0000004.pt")
    resumed = load(only_run(ddp["root"] / "resumed") / "checkpoints" / "0000004.pt")
    assert straight["step"] == resumed["step"] == 4 and len(resumed["rng"]) == 2
    assert "r_embedder.mlp.0.weight" in resumed["model"]
    assert max_abs_diff(resumed["model"], straight["model"]) <= 1e-6
    assert max_abs_diff(resumed["ema"], straight["ema"]) <= 1e-6
    initial = load(only_run(ddp["root"] / "resumed") / "checkpoints" / "0000002.pt")
    assert max_abs_diff(initial["model"], straight["model"]) > 1e-4  # the last two steps did move the weights


# -- fast paths through train_step ------------------------------------------------------------------------------
def _step_parts(model, precision="fp32", compile_backend=None):
    from disploss.regularizer import DispersiveRegularizer
    from disploss.training.ema import EMA
    from disploss.training.objective import Objective
    from disploss.training.step import StepOptions

    reg = DispersiveRegularizer(model, layers="blocks.1", weight=0.25)  # hooks first, then compile
    net = torch.compile(model, backend=compile_backend) if compile_backend else model
    objective = Objective(None, reg, meanflow=MeanFlowSettings(ratio=0.5, omega=1.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return dict(net=net, objective=objective, opt=opt, ema=EMA(model), options=StepOptions(precision=precision))


def _mf_model():
    return tiny_sit(**MEANFLOW_SIT).train()


def _one_step(parts, seed=0):
    from disploss.training.step import train_step

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(seed)
    out = train_step(parts["net"], parts["objective"], parts["opt"], parts["ema"], x, y, parts["options"])
    return out, {n: p.grad.clone() for n, p in parts["net"].named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_wrapping_gives_the_same_meanflow_step(backend):
    """`--compile` wraps the pass with gradient; the JVP runs on the module under the wrapper, eagerly."""
    torch._dynamo.reset()
    plain, g0 = _one_step(_step_parts(_mf_model()))
    fast, g1 = _one_step(_step_parts(_mf_model(), compile_backend=backend))
    for key in ("loss", "flow", "disp"):
        torch.testing.assert_close(getattr(fast, key), getattr(plain, key), rtol=1e-5, atol=1e-6, msg=key)
    assert {k.removeprefix("_orig_mod.") for k in g1} == set(g0)
    for k, g in g1.items():
        torch.testing.assert_close(g, g0[k.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_autocast_meanflow_step_is_close_to_fp32():
    full, g32 = _one_step(_step_parts(_mf_model()))
    half, g16 = _one_step(_step_parts(_mf_model(), precision="bf16"))
    assert bool(half.finite)
    assert abs(float(half.flow) - float(full.flow)) < 5e-2 * float(full.flow)
    for k in g32:
        assert (g16[k] - g32[k]).norm() <= 1e-1 * g32[k].norm().clamp_min(1e-12), k


def test_bench_times_the_meanflow_step_beside_the_flow_step(tmp_path):
    """`disploss bench --meanflow`: the MeanFlow train_step in the same interleaved rounds, its time ratio to the
    flow step and the activations each keeps for backward."""
    from disploss.commands.main import main

    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--quick",
        "--sections",
        "train",
        "--meanflow",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    train = json.loads(out.read_text())["train"]
    for variant in ("ours_nodisp", "ours_meanflow", "ours_meanflow_disp"):
        assert len(train[variant]["step_ms_all"]) == 2 and train[variant]["peak_mem_gb"] > 0
    mf = train["meanflow"]
    assert mf["time_ratio"] == pytest.approx(train["ours_meanflow"]["step_ms"] / train["ours_nodisp"]["step_ms"])
    saved = mf["saved_for_backward_gb"]
    # JVP without gradient: the MeanFlow step keeps the flow step's activations (+ the r embedder's, + the loss')
    assert 0 < saved["ours_nodisp"] <= saved["ours_meanflow"] < 1.2 * saved["ours_nodisp"]
