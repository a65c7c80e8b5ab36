"""`run_digits(cfg)`: train every arm and seed, score every checkpoint, write the results, tables and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from disploss.errors import ConfigError
from experiments.digits.config import NFE_SWEEP, RESULTS_SCHEMA, DigitsConfig, primary_spec, train_config
from experiments.digits.report import (
    paired_differences,
    plot_fid,
    plot_fid_vs_nfe,
    render_markdown,
    summarise,
    summarise_nfe,
    write_grid,
)
from experiments.digits.scoring import cpu_seconds, sample_plan, samples_for, score


def _train_run(tc) -> tuple[Path, float, float]:
    """train(tc), resuming its run; (run folder, wall s, CPU s) spent training it over every invocation.

    The cost is kept in {results_dir}/experiment_timing.json and only grows when this call trained steps.
    """
    from disploss.checkpoint import checkpoint_step, find_latest_run
    from disploss.fileio import atomic_write_json
    from disploss.training import train

    ledger = Path(tc.results_dir) / "experiment_timing.json"
    spent = json.loads(ledger.read_text()) if ledger.is_file() else {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    latest = find_latest_run(tc.results_dir, tc.model)
    finished = latest is not None and checkpoint_step(latest) == tc.max_steps
    t0, c0 = time.time(), cpu_seconds()
    run_dir = Path(train(tc))
    if not finished:
        spent = {
            "train_wall_s": spent["train_wall_s"] + time.time() - t0,
            "train_cpu_s": spent["train_cpu_s"] + cpu_seconds() - c0,
        }
        atomic_write_json(ledger, spent)
    return run_dir, float(spent["train_wall_s"]), float(spent["train_cpu_s"])


def _last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "flow" in r]
    return rows[-1] if rows else {}


def _mean_diagnostics(row: dict) -> dict[str, float]:
    """The dispersion stats of a metrics.jsonl row ('diag/blocks.5/rms', ...), averaged over the blocks."""
    stats: dict[str, list[float]] = {}
    for key, value in row.items():
        if key.startswith("diag/") and isinstance(value, (int, float)):
            stats.setdefault(key.rsplit("/", 1)[1], []).append(float(value))
    return {k: sum(v) / len(v) for k, v in stats.items()}


def run_screen(cfg: DigitsConfig, log=print) -> dict:
    """The screen (experiments/digits/README.md): the first pass (baseline and screen_arms), then InfoNCE-L2 with
    lambda 0.05 and 1 at the tau whose last-block arm scored the lowest final feature-FID; one results.json with
    every arm (the first pass's runs are reused, not trained again)."""
    from experiments.digits.config import Arm, lambda_arms

    screen = dataclasses.replace(cfg, screen=True)
    first = run_digits(screen, log)
    names = {a.spec(): a.name for a in screen.arm_list()}
    final = max(cfg.eval_steps())

    def final_fid(tau: float) -> float:
        arm = first["arms"][names[Arm.from_spec(f"infonce_l2+tau={tau:g}").spec()]]
        return next(r["fid"]["mean"] for r in arm["summary"] if r["step"] == final)

    best = min((0.25, 1.0, 4.0, 16.0), key=final_fid)
    log(f"screen: best tau on the last block {best:g} (final feature-FID {final_fid(best):.2f}); lambda pass next")
    # The first pass's arms by name (the named ones keep theirs), then the lambda pass's
    arms = tuple(a.name for a in screen.arm_list()) + tuple(a.spec() for a in lambda_arms(best))
    return run_digits(dataclasses.replace(screen, arms=arms), log)


def run_shard(cfg: DigitsConfig, log=print) -> None:
    """--shard K/N: train and sample this process's share of the (seed, arm) runs, nothing else; N such processes
    run side by side (one per core), and the same command without --shard then scores and reports, reusing them."""
    k, n = cfg.shard_index()
    pairs = [(seed, arm) for seed in cfg.seeds for arm in cfg.arm_list()][k::n]
    labels, noise = sample_plan(cfg.num_samples, cfg.noise_seed, cfg.image_size)
    for seed, arm in pairs:
        tc = train_config(cfg, arm, seed)
        log(f"== shard {k}/{n}: {arm.name}, seed {seed}: {tc.results_dir}")
        run_dir, _, _ = _train_run(tc)
        for step in cfg.eval_steps():
            samples_for(cfg, run_dir, step, labels, noise, primary_spec(arm))
    log(f"shard {k}/{n} done: {len(pairs)} run(s); run the same command without --shard to score and report them")


def run_digits(cfg: DigitsConfig, log=print) -> dict:
    """Train every arm and seed, score every checkpoint, write results.{json,md}, the plot and sample grids.

    Args:
        cfg: the settings.
        log: receives one line per run and checkpoint.
    Returns:
        The results dict written to {out}/results.json (see RESULTS_SCHEMA; `partial` is False once complete).
    """
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.shard is not None:
            run_shard(cfg, log)
            return {}
        return _run_digits(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run_digits(cfg: DigitsConfig, log=print) -> dict:
    from disploss.evaluation.metrics import compute_statistics, frechet_distance, precision_recall
    from disploss.fileio import atomic_write_bytes, atomic_write_json
    from experiments.digits.classifier import classify, load_or_train, split_arrays

    t_start, cpu_start = time.time(), cpu_seconds()
    load_start = os.getloadavg()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- feature network and reference ------------------------------------------------------------------------
    classifier, cls_info = load_or_train(cfg.classifier, cfg.cache_dir)
    log(
        f"digit classifier: held-out accuracy {cls_info['holdout_accuracy']:.4f} "
        f"({'cached' if cls_info['cached'] else 'trained now'}: {cls_info['path']})"
    )
    ref_images, ref_labels = split_arrays(cfg.classifier, cfg.reference)
    write_grid(ref_images, ref_labels, out / "real_digits.png")  # for comparison with samples_{arm}.png
    ref_features, _ = classify(classifier, ref_images)
    ref_stats = compute_statistics(ref_features)
    floor_images, _ = split_arrays(cfg.classifier, "train")
    floor_features, _ = classify(classifier, floor_images)
    floor_p, floor_r = precision_recall(ref_features, floor_features, k=3)
    floor = {
        "fid": frechet_distance(*compute_statistics(floor_features), *ref_stats),
        "precision": floor_p,
        "recall": floor_r,
        "num_images": int(len(floor_images)),
    }
    description = (
        f"the {len(ref_images)} real held-out digits"
        if cfg.reference == "holdout"
        else f"all {len(ref_images)} real digits"
    )

    labels, noise = sample_plan(cfg.num_samples, cfg.noise_seed, cfg.image_size)
    arms = cfg.arm_list()
    results: dict = {
        "schema": RESULTS_SCHEMA,
        "partial": True,
        "settings": {
            **_settings_dict(cfg),
            "eval_steps": cfg.eval_steps(),
            "arms": [dataclasses.asdict(a) for a in arms],
        },
        "classifier": {
            **{
                k: cls_info[k]
                for k in ("holdout_accuracy", "train_accuracy", "num_train", "num_holdout", "key", "config")
            },
            "file": Path(cls_info["path"]).name,  # in the cache folder (--cache-dir); no machine's absolute path
        },
        "reference": {
            "split": cfg.reference,
            "num_images": int(len(ref_images)),
            "description": description,
            "floor": floor,
        },
        "arms": {
            a.name: {
                **dataclasses.asdict(a),
                "recipe": a.describe(),
                "runs": [],
                "summary": [],
                "paired_vs_baseline": [],
            }
            for a in arms
        },
        "environment": _environment(),
    }

    # -- runs: seed-major, so an interrupted experiment still has paired arms ------------------------------------
    for seed in cfg.seeds:
        for arm in arms:
            tc = train_config(cfg, arm, seed)
            log(f"== {arm.name}, seed {seed}: {tc.results_dir}")
            run_dir, train_wall, train_cpu = _train_run(tc)
            run = {
                "seed": seed,
                "run_dir": os.path.relpath(run_dir, cfg.out),  # relative: no machine's absolute path
                "train_wall_s": train_wall,
                "train_cpu_s": train_cpu,
                "sample_wall_s": 0.0,
                "sample_cpu_s": 0.0,
                "checkpoints": [],
            }
            last = _last_metrics(run_dir)
            run["final_flow_loss"] = last.get("flow")
            run["final_disp_loss"] = last.get("disp")
            run["final_diag"] = _mean_diagnostics(last)
            for step in cfg.eval_steps():
                images, sw, sc = samples_for(cfg, run_dir, step, labels, noise, primary_spec(arm))
                run["sample_wall_s"] += sw
                run["sample_cpu_s"] += sc
                metrics = score(classifier, ref_features, ref_stats, images, labels.numpy())
                run["checkpoints"].append({"step": step, **metrics})
                log(
                    f"   step {step}: feature-FID {metrics['fid']:.3f}, precision {metrics['precision']:.3f}, "
                    f"recall {metrics['recall']:.3f}, class accuracy {metrics['class_accuracy']:.3f} "
                    f"(sampling {sw:.0f} s)"
                )
                if step == cfg.eval_steps()[-1] and seed == cfg.seeds[0]:
                    write_grid(images, labels.numpy(), out / f"samples_{arm.name}.png")
            if cfg.meanflow:  # the final checkpoint against the number of model calls
                run["nfe"] = _nfe_sweep(cfg, run_dir, arm, labels, noise, run, log,
                                        lambda im: score(classifier, ref_features, ref_stats, im, labels.numpy()))  # fmt: skip
            results["arms"][arm.name]["runs"].append(run)
            _refresh(results, cfg, t_start, cpu_start, load_start)
            atomic_write_json(out / "results.json", results)

    results["partial"] = False
    _refresh(results, cfg, t_start, cpu_start, load_start)
    _check_finite(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", render_markdown(results).encode())
    plot_fid(results, out / "fid_vs_steps.png")
    if cfg.meanflow:
        plot_fid_vs_nfe(results, out / "fid_vs_nfe.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'fid_vs_steps.png'}")
    return results


# -- the NFE sweep of --meanflow (issue 12) ----------------------------------------------------------------------
def _nfe_sweep(cfg: DigitsConfig, run_dir: Path, arm, labels, noise, run: dict, log, scorer) -> list[dict]:
    """Scores of the final checkpoint with every sampler of NFE_SWEEP[arm.objective]; adds their cost to `run`."""
    step, rows = cfg.eval_steps()[-1], []
    for spec in NFE_SWEEP[arm.objective]:
        images, sw, sc = samples_for(cfg, run_dir, step, labels, noise, spec)
        run["sample_wall_s"] += sw
        run["sample_cpu_s"] += sc
        rows.append({"sampler": spec.kind, "nfe": spec.nfe, **scorer(images)})
        log(f"   step {step}, {spec.name}: feature-FID {rows[-1]['fid']:.3f}")
    return rows


def _paired_base(name: str, arms: dict) -> str | None:
    # The dispersive MeanFlow arm is paired with the MeanFlow arm (same objective), every other arm with the baseline.
    if name in ("baseline", "meanflow"):
        return None
    return "meanflow" if arms[name].get("objective") == "meanflow" and "meanflow" in arms else "baseline"


def _refresh(results: dict, cfg: DigitsConfig, t_start: float, cpu_start: float, load_start) -> None:
    steps = cfg.eval_steps()
    for name, arm in results["arms"].items():
        arm["summary"] = summarise(arm["runs"], steps)
        base = _paired_base(name, results["arms"])
        arm["paired_vs_baseline"] = [] if base is None else paired_differences(
            results["arms"][base]["runs"], arm["runs"], steps
        )  # fmt: skip
        if base is not None and base != "baseline":
            arm["paired_with"] = base
        if any("nfe" in run for run in arm["runs"]):
            arm["nfe_summary"] = summarise_nfe(arm["runs"])
    runs = [run for arm in results["arms"].values() for run in arm["runs"]]
    results["timing"] = {
        "wall_s": time.time() - t_start, "cpu_s": cpu_seconds() - cpu_start,  # this invocation
        # what the runs cost when they were trained and sampled (a rerun that reuses them keeps these)
        "runs_wall_s": sum(r["train_wall_s"] + r["sample_wall_s"] for r in runs),
        "runs_cpu_s": sum(r["train_cpu_s"] + r["sample_cpu_s"] for r in runs),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
    }  # fmt: skip


def _check_finite(results: dict) -> None:
    # json.dumps would write NaN / Infinity, which strict JSON readers reject: fail loudly instead.
    def walk(obj, where):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ConfigError(f"non-finite number at {where} in the results")
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    walk(results, "results")


def _settings_dict(cfg: DigitsConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["runs_dir"] = str(cfg.resolved_runs_dir())
    for k in ("seeds", "grid_lambdas", "grid_taus", "arms"):
        d[k] = None if d[k] is None else list(d[k])
    return d


def _environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
