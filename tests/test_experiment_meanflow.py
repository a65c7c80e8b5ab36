"""`disploss experiment digits --meanflow`: the MeanFlow arms, the samplers of the NFE sweep (exact model calls),
and the quick pipeline end to end with the FID-against-model-calls table and plot."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments import digits as ex
from experiments.digits.scoring import sample_checkpoint
from trainkit import tiny_sit


def test_meanflow_arms_and_their_train_configs(tmp_path):
    cfg = ex.DigitsConfig(out=str(tmp_path), meanflow=True, cfg_scale=1.5)
    assert (
        cfg.arm_list()[-2:] == [ex.MEANFLOW, ex.MEANFLOW_DISPERSIVE]
        and ex.DigitsConfig().arm_list()[-1].objective == "flow"
    )
    base, mf = ex.train_config(cfg, ex.BASELINE, 0), ex.train_config(cfg, ex.MEANFLOW, 0)
    differ = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(mf, f.name)}
    assert differ == {"objective", "meanflow", "results_dir"}
    assert mf.objective == "meanflow" and mf.meanflow.omega == 1.5  # the experiment's guidance, folded in
    assert (
        ex.MEANFLOW_DISPERSIVE.describe() == "MeanFlow, 1 model call + infonce_cosine, lambda=0.25, tau=0.5, last block"
    )
    with pytest.raises(ValueError, match="valid choices: flow, meanflow"):
        ex.Arm("x", disp=False, objective="shortcut")


def _checkpoint(tmp_path, meanflow: bool):
    """A training checkpoint of the digits' model (SiT-T/2, 8 px, 10 classes) with non-zero output."""
    from disploss.checkpoint import save_checkpoint

    model = tiny_sit(preset="SiT-T/2", num_classes=10, meanflow=meanflow)
    args = dict(model="SiT-T/2", image_size=8, num_classes=10, vae="none", path_type="Linear",
                prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)  # fmt: skip
    path = tmp_path / f"{'mf' if meanflow else 'flow'}.pt"
    return save_checkpoint(path, {"ema": model.state_dict(), "model": model.state_dict(), "args": args})


@pytest.mark.parametrize("meanflow", [False, True])
def test_each_sampler_makes_exactly_its_model_calls(tmp_path, sit_forward_calls, meanflow):
    path = _checkpoint(tmp_path, meanflow)
    labels, noise = ex.sample_plan(40, 0, 8)
    calls = sit_forward_calls
    for spec in ex.NFE_SWEEP["meanflow" if meanflow else "flow"]:
        calls.clear()
        images = sample_checkpoint(path, labels, noise, 11, 1.0, batch_size=40, spec=spec)
        assert len(calls) == spec.nfe and images.shape == (40, 8, 8, 3), spec
    calls.clear()
    sample_checkpoint(path, labels, noise, 11, 1.0, batch_size=40)  # the arm's every-checkpoint sampler
    assert len(calls) == (1 if meanflow else 20)
    if not meanflow:
        with pytest.raises(ValueError, match="needs a MeanFlow checkpoint"):
            sample_checkpoint(path, labels, noise, 11, 1.0, spec=ex.SamplerSpec("meanflow", 1))


def test_quick_meanflow_pipeline(tmp_path):
    """--quick --meanflow at a toy budget: every arm, the sweep of each at its final step, the table and plots."""
    from disploss.commands.main import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["experiment", "digits", "--quick", "--meanflow", "--steps", "8", "--evals", "2", "--num-samples", "40",
            "--out", str(out), "--cache-dir", str(cache)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert list(arms) == ["baseline", "dispersive", "dispersive_cosine", "meanflow", "meanflow_dispersive"]
    for arm in arms.values():
        (run,) = arm["runs"]
        assert [c["step"] for c in run["checkpoints"]] == [4, 8]
        sweep = [(r["sampler"], r["nfe"]) for r in run["nfe"]]
        if arm["objective"] == "meanflow":
            assert sweep == [("meanflow", 1), ("meanflow", 2)]
            assert run["nfe"][0]["fid"] == run["checkpoints"][-1]["fid"]  # the same 1-call samples, from the cache
        else:
            assert sweep == [("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("heun", 20)]
        assert [(r["sampler"], r["nfe"]) for r in arm["nfe_summary"]] == sorted(sweep, key=lambda s: (s[1], s[0]))
        assert all(math.isfinite(r["fid"]) for r in run["nfe"])
    assert arms["meanflow_dispersive"]["paired_with"] == "meanflow" and not arms["meanflow"]["paired_vs_baseline"]
    table = (out / "results.md").read_text()
    assert "## feature-FID against model calls per image, step 8" in table and "| meanflow | meanflow | 1 |" in table
    for png in ("fid_vs_nfe.png", "fid_vs_steps.png", "samples_meanflow.png", "samples_meanflow_dispersive.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
