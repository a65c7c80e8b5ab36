"""`disploss experiment digits`: the quick mode end to end, the digit classifier's features, the FID sanity checks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from disploss.commands.main import build_parser
from disploss.dispersive import VARIANTS
from disploss.errors import ConfigError
from disploss.evaluation.metrics import compute_statistics, frechet_distance
from experiments import digits as ex
from experiments.digits import classifier as dc
from experiments.digits.cli import digits_config

QUICK_CLASSIFIER = ex.QUICK["classifier"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("disploss-cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """The quick mode's classifier, trained once into the module's cache folder."""
    return dc.load_or_train(QUICK_CLASSIFIER, cache_dir)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, cache_dir, classifier):
    """`disploss experiment digits --quick` through the command line; (exit code, output folder)."""
    from disploss.commands.main import main

    out = tmp_path_factory.mktemp("digits-quick")
    code = main(["experiment", "digits", "--quick", "--out", str(out), "--cache-dir", str(cache_dir)])
    return code, out


# ---------------------------------------------------------------------------------------------------------
# End to end


def _walk_numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_numbers(v)


def test_quick_writes_results_table_and_plot(quick_run):
    code, out = quick_run
    assert code == 0
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert results["schema"] == ex.RESULTS_SCHEMA and results["partial"] is False
    assert set(results) >= {"settings", "classifier", "reference", "arms", "timing", "environment"}
    assert results["settings"]["quick"] is True
    steps = results["settings"]["eval_steps"]
    assert steps == [20, 40]
    assert list(results["arms"]) == ["baseline", "dispersive", "dispersive_cosine"]
    for name, arm in results["arms"].items():
        assert arm["disp"] == (name != "baseline")
        assert [r["seed"] for r in arm["runs"]] == [0]
        for run in arm["runs"]:
            assert [c["step"] for c in run["checkpoints"]] == steps
            for c in run["checkpoints"]:
                assert set(c) == {"step", *ex.METRICS}
                assert c["fid"] >= 0 and 0 <= c["precision"] <= 1 and 0 <= c["recall"] <= 1
                assert 0 <= c["class_accuracy"] <= 1
            assert run["train_wall_s"] > 0
        assert [s["step"] for s in arm["summary"]] == steps
        assert all(s[m]["n"] == 1 for s in arm["summary"] for m in ex.METRICS)
    assert [d["step"] for d in results["arms"]["dispersive"]["paired_vs_baseline"]] == steps
    assert results["reference"]["split"] == "holdout" and results["reference"]["num_images"] > 300
    assert all(math.isfinite(x) for x in _walk_numbers(results))
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| dispersive |" in table and "feature-FID" in table
    for png in ("fid_vs_steps.png", "samples_baseline.png", "samples_dispersive.png", "real_digits.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_rerun_reuses_runs_and_samples(quick_run, cache_dir):
    # The same command again: training resumes at its last step (nothing to do), the samples come from the
    # runs' caches, so every number is identical.
    code, out = quick_run
    first = json.loads((out / "results.json").read_text())
    args = build_parser("experiment").parse_args(
        ["digits", "--quick", "--out", str(out), "--cache-dir", str(cache_dir)]
    )
    again = ex.run_digits(digits_config(args), log=lambda *_: None)
    for name in first["arms"]:
        run, run0 = again["arms"][name]["runs"][0], first["arms"][name]["runs"][0]
        assert run["checkpoints"] == run0["checkpoints"]
        # the recorded cost of training and sampling is reported again, not the near-zero cost of reusing
        for key in ("train_wall_s", "train_cpu_s", "sample_wall_s", "sample_cpu_s"):
            assert run[key] == pytest.approx(run0[key]), key
    assert again["timing"]["runs_wall_s"] == pytest.approx(first["timing"]["runs_wall_s"])
    assert again["timing"]["wall_s"] < first["timing"]["wall_s"]


# ---------------------------------------------------------------------------------------------------------
# The digit classifier


def test_classifier_is_cached_and_above_chance(classifier, cache_dir):
    model, info = classifier
    assert info["holdout_accuracy"] > 0.5  # chance is 0.1; 3 epochs reach about 0.95
    assert info["num_train"] + info["num_holdout"] == 1797
    again, info2 = dc.load_or_train(QUICK_CLASSIFIER, cache_dir)
    assert info2["cached"] is True and info2["holdout_accuracy"] == info["holdout_accuracy"]
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_cache_key_covers_every_setting(cache_dir):
    base = dc.ClassifierConfig()
    keys = {
        dataclasses.replace(base, **{f.name: getattr(base, f.name) + 1}).key()
        for f in dataclasses.fields(base)
        if f.name != "holdout_fraction"
    }
    keys.add(dataclasses.replace(base, holdout_fraction=0.3).key())
    assert base.key() not in keys and len(keys) == len(dataclasses.fields(base))
    assert dc.cache_path(base, cache_dir).parent == cache_dir


def test_unreadable_cache_is_retrained(tmp_path):
    config = dataclasses.replace(QUICK_CLASSIFIER, epochs=1)
    dc.cache_path(config, tmp_path).write_bytes(b"not a checkpoint")
    _, info = dc.load_or_train(config, tmp_path)
    assert info["cached"] is False
    assert dc.load_or_train(config, tmp_path)[1]["cached"] is True


def test_features_shape_and_channel_handling(classifier):
    model, _ = classifier
    grey, _ = dc.split_arrays(QUICK_CLASSIFIER, "holdout", channels=1)
    rgb, _ = dc.split_arrays(QUICK_CLASSIFIER, "holdout", channels=3)
    feats = dc.extract_features(model, rgb[:17])
    assert feats.shape == (17, QUICK_CLASSIFIER.feature_dim) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, dc.extract_features(model, grey[:17]), rtol=1e-6, atol=1e-6)
    # batched and unbatched agree
    np.testing.assert_allclose(dc.extract_features(model, rgb[:17], batch_size=5), feats, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="16x16"):
        dc.extract_features(model, np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        dc.extract_features(model, rgb[:2].astype(np.float32))


def test_split_arrays_are_disjoint_and_cover_the_digits():
    train_x, train_y = dc.split_arrays(QUICK_CLASSIFIER, "train")
    hold_x, hold_y = dc.split_arrays(QUICK_CLASSIFIER, "holdout")
    all_x, _ = dc.split_arrays(QUICK_CLASSIFIER, "all")
    assert len(train_x) + len(hold_x) == len(all_x) == 1797
    assert train_x.shape[1:] == (8, 8, 3) and set(hold_y.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="train, holdout, all"):
        dc.split_arrays(QUICK_CLASSIFIER, "test")


# ---------------------------------------------------------------------------------------------------------
# FID sanity in the classifier's feature space


def test_fid_of_real_holdout_against_itself_is_zero_and_noise_is_far(classifier):
    model, _ = classifier
    hold, _ = dc.split_arrays(QUICK_CLASSIFIER, "holdout")
    train, _ = dc.split_arrays(QUICK_CLASSIFIER, "train")
    ref = compute_statistics(dc.extract_features(model, hold))
    self_fid = frechet_distance(*ref, *ref)
    real_fid = frechet_distance(*compute_statistics(dc.extract_features(model, train)), *ref)
    noise = np.random.default_rng(0).integers(0, 256, size=(len(hold), 8, 8, 3), dtype=np.uint8)
    noise_fid = frechet_distance(*compute_statistics(dc.extract_features(model, noise)), *ref)
    assert abs(self_fid) < 1e-6 * np.trace(ref[1])
    assert noise_fid > 20 * real_fid and noise_fid > 50


# ---------------------------------------------------------------------------------------------------------
# Configuration and the sampling plan


def test_sample_plan_is_class_balanced_and_fixed():
    labels, noise = ex.sample_plan(1000, noise_seed=3, image_size=8)
    assert noise.shape == (1000, 3, 8, 8)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [100] * 10
    labels2, noise2 = ex.sample_plan(1000, noise_seed=3, image_size=8)
    assert torch.equal(noise, noise2) and torch.equal(labels, labels2)
    torch.manual_seed(123)  # the global RNG does not enter
    assert torch.equal(ex.sample_plan(1000, noise_seed=3, image_size=8)[1], noise)


def test_train_configs_share_everything_but_the_arm(tmp_path):
    cfg = ex.DigitsConfig(out=str(tmp_path))
    base, disp = ex.train_config(cfg, ex.BASELINE, 0), ex.train_config(cfg, ex.DISPERSIVE, 0)
    differ = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(disp, f.name)}
    assert differ == {"disp", "results_dir"}
    assert base.max_steps == cfg.steps and base.ckpt_every * cfg.evals == cfg.steps
    assert base.ckpt == "latest" and base.sample_every == 0 and base.ema_decay == cfg.ema_decay
    assert base.model == "SiT-T/2" and base.vae == "none" and base.image_size == 8
    assert ex.train_config(cfg, ex.BASELINE, 1).results_dir != base.results_dir
    longer = dataclasses.replace(cfg, steps=2 * cfg.steps)
    assert ex.train_config(longer, ex.BASELINE, 0).results_dir != base.results_dir  # never resumes another budget
    assert cfg.eval_steps() == [200, 400, 600, 800]


def test_grid_arms_are_unique_and_cover_the_variants():
    arms = ex.DigitsConfig(grid=True).arm_list()
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 3 + 3 + 8
    assert {a.variant for a in arms if a.disp} == set(VARIANTS)
    assert sum(1 for a in arms if a.disp and (a.weight, a.tau) == (0.25, 1.0) and a.variant == "infonce_l2") == 1
    assert ex.DigitsConfig().arm_list() == [ex.BASELINE, ex.DISPERSIVE, ex.DISPERSIVE_COSINE]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(reference="train"), "holdout, all"),
        (dict(steps=1001), "multiple of --evals"),
        (dict(seeds=()), "--seeds"),
        (dict(seeds=(1, 1)), "--seeds"),
        (dict(num_samples=20), "--num-samples"),
        (dict(cfg_scale=0.5), "--cfg-scale"),
        (dict(image_size=16), "classifier reads 8 px"),
        (dict(threads=0), "--threads"),
    ],
)
def test_config_errors_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        ex.DigitsConfig(**overrides)


def test_arm_rejects_unknown_variant():
    with pytest.raises(ValueError, match="infonce_l2, infonce_cosine, hinge, covariance"):
        ex.Arm("x", disp=True, variant="infonce")


def test_flags_resolve_over_quick_and_defaults():
    from disploss.commands.main import build_parser

    parser = build_parser("experiment")
    cfg = digits_config(parser.parse_args(["digits", "--quick", "--seeds", "3,4", "--image-size", "16"]))
    assert cfg.quick and cfg.seeds == (3, 4) and cfg.steps == ex.QUICK["steps"]
    assert cfg.image_size == cfg.classifier.image_size == 16 and cfg.classifier.epochs == QUICK_CLASSIFIER.epochs
    full = digits_config(parser.parse_args(["digits", "--classifier-epochs", "5", "--grid"]))
    assert full == dataclasses.replace(
        ex.DigitsConfig(), grid=True, classifier=dataclasses.replace(ex.DigitsConfig().classifier, epochs=5)
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["imagenet"])
    with pytest.raises(SystemExit):
        parser.parse_args(["digits", "--seeds", "a,b"])


def test_summaries_and_paired_differences():
    base = [
        {"seed": s, "checkpoints": [{"step": 10, "fid": f, "precision": 0.5, "recall": 0.5, "class_accuracy": 1.0}]}
        for s, f in ((0, 10.0), (1, 12.0), (2, 14.0))
    ]
    arm = [
        {"seed": s, "checkpoints": [{"step": 10, "fid": f, "precision": 0.6, "recall": 0.4, "class_accuracy": 1.0}]}
        for s, f in ((0, 9.0), (1, 10.0))
    ]
    summary = ex.summarise(base, [10])[0]
    assert summary["fid"] == {"mean": 12.0, "std": 2.0, "n": 3}
    diff = ex.paired_differences(base, arm, [10])[0]
    assert diff["fid"]["n"] == 2 and diff["fid"]["mean"] == pytest.approx(-1.5)
    assert diff["precision"]["mean"] == pytest.approx(0.1) and diff["recall"]["mean"] == pytest.approx(-0.1)
    assert ex.summarise(base[:1], [10])[0]["fid"]["std"] == 0.0  # one seed: no spread, not NaN


@pytest.mark.slow
def test_grid_runs_every_variant(tmp_path, cache_dir):
    # Every dispersive variant through train() and the scoring, at a toy budget (about 20 s on 2 CPU cores).
    cfg = dataclasses.replace(
        ex.DigitsConfig(**ex.QUICK), out=str(tmp_path), cache_dir=str(cache_dir), steps=4, evals=1, num_samples=40,
        sample_steps=2, grid=True, grid_lambdas=(0.5,), grid_taus=(1.0,),
    )  # fmt: skip
    results = ex.run_digits(cfg, log=lambda *_: None)
    arms = results["arms"]
    assert list(arms) == [
        "baseline",
        "dispersive",
        "dispersive_cosine",
        "disp-infonce_cosine",
        "disp-hinge",
        "disp-covariance",
        "disp-l2-lam0.5-tau1",
    ]
    assert {a["variant"] for a in arms.values() if a["disp"]} == set(VARIANTS)
    for arm in arms.values():
        (run,) = arm["runs"]
        assert [c["step"] for c in run["checkpoints"]] == [4] and math.isfinite(run["checkpoints"][0]["fid"])
        assert math.isfinite(run["final_flow_loss"])
    assert "disp-hinge" in (tmp_path / "results.md").read_text()


def test_arm_specs_parse_and_name_their_recipe():
    arm = ex.Arm.from_spec("infonce_l2+tau=4+blocks=0/2+lam=0.5")
    assert (arm.variant, arm.tau, arm.blocks, arm.weight, arm.disp) == ("infonce_l2", 4.0, "0,2", 0.5, True)
    assert arm.name == arm.spec() == "infonce_l2+lam=0.5+tau=4+blocks=0/2"  # normalised order
    assert ex.Arm.from_spec(arm.spec()) == arm
    assert ex.Arm.from_spec("baseline") is ex.BASELINE and ex.Arm.from_spec("dispersive") is ex.DISPERSIVE
    assert ex.DISPERSIVE.spec() == ex.Arm.from_spec("infonce_l2").spec() == "infonce_l2"
    with pytest.raises(ValueError, match="'beta=2' is not one of lam=..., tau=..., blocks=..., margin=..."):
        ex.Arm.from_spec("infonce_l2+beta=2")
    with pytest.raises(ConfigError, match="arm 'infonce_l2\\+lam=abc': lam='abc' is not a number"):
        ex.Arm.from_spec("infonce_l2+lam=abc")  # a user mistake (one line), not float()'s bare ValueError
    with pytest.raises(ValueError, match="valid choices"):
        ex.Arm.from_spec("infonce_l3")


def test_arm_list_runs_each_recipe_once_baseline_first():
    cfg = ex.DigitsConfig(arms=("infonce_l2", "dispersive", "hinge", "baseline"))
    assert [a.spec() for a in cfg.arm_list()] == ["baseline", "infonce_l2", "hinge"]
    screen = [a.spec() for a in ex.DigitsConfig(screen=True).arm_list()]
    assert screen[0] == "baseline" and len(screen) == len(set(screen)) == 12
    # SiT-T/2 has 6 blocks: the JAX setting's block at depth // 4 is block 1 (index 0), the middle one index 2
    assert "infonce_l2+lam=0.5+tau=0.5+blocks=0" in screen and "infonce_l2+blocks=2" in screen
    assert {"infonce_l2+blocks=all", "infonce_l2_ln", "covariance", "hinge", "infonce_cosine+tau=0.5"} <= set(screen)


def test_screen_picks_the_best_tau_for_the_lambda_pass(monkeypatch):
    from experiments.digits import run as run_module

    fids = {"infonce_l2+tau=0.25": 90.0, "dispersive": 80.0, "infonce_l2+tau=4": 70.0, "infonce_l2+tau=16": 75.0}
    calls = []

    def fake_run_digits(cfg, log=print):
        calls.append(cfg)
        final = max(cfg.eval_steps())
        return {"arms": {a.name: {"summary": [{"step": final, "fid": {"mean": fids.get(a.name, 99.0)}}]}
                         for a in cfg.arm_list()}}  # fmt: skip

    monkeypatch.setattr(run_module, "run_digits", fake_run_digits)
    run_module.run_screen(ex.DigitsConfig(seeds=(0,)), log=lambda *_: None)
    first, second = calls
    assert first.screen and second.screen
    added = {a.spec() for a in second.arm_list()} - {a.spec() for a in first.arm_list()}
    assert added == {"infonce_l2+lam=0.05+tau=4", "infonce_l2+lam=1+tau=4"}


def test_shards_split_the_runs_and_cover_them_once(monkeypatch, tmp_path):
    from experiments.digits import run as run_module

    trained, sampled = [], []
    monkeypatch.setattr(run_module, "_train_run", lambda tc: (trained.append(tc.results_dir) or tmp_path, 0.0, 0.0))
    monkeypatch.setattr(run_module, "samples_for", lambda cfg, run_dir, step, *a: sampled.append(step))
    base = ex.DigitsConfig(seeds=(0, 1), arms=("hinge", "covariance"), steps=40, evals=2, out=str(tmp_path))
    for k in range(2):
        assert run_module.run_digits(dataclasses.replace(base, shard=f"{k}/2"), log=lambda *_: None) == {}
    expected = [ex.train_config(base, a, s).results_dir for s in (0, 1) for a in base.arm_list()]
    assert sorted(trained) == sorted(expected) and len(set(trained)) == 6  # every run once, over the two shards
    assert sampled == [20, 40] * 6
    with pytest.raises(ValueError, match="--shard '2/2': expected K/N"):
        ex.DigitsConfig(shard="2/2")
