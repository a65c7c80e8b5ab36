"""`disploss experiment EXPERIMENT`: small, complete experiments that weigh dispersive loss against its baseline.

    disploss experiment digits --threads 1          # baseline vs dispersive, seeds 0,1,2: ~20 min on 2 CPU cores
    disploss experiment digits --quick              # the same pipeline in under a minute (1 seed, tiny budget)
    disploss experiment digits --grid               # + every dispersive variant and a lambda x tau grid (hours)

`digits`: the demo's SiT (disploss.demo.DEMO: SiT-T/2, pixel space, the bundled scikit-learn digits) is trained by
`disploss.train.train` for a fixed budget of steps in each arm and seed; checkpoints are written every
steps / evals steps. From the EMA weights of every checkpoint the same class-balanced set of images is drawn with
the same sampler (Heun ODE, fixed steps, fixed guidance scale, fixed noise: one generator seed shared by every
arm, seed and checkpoint), and scored in the feature space of a small digit classifier (disploss.digit_classifier,
trained once on the "train" split, cached) against the real "holdout" digits:
    feature-FID   = Frechet distance of the feature Gaussians  (disploss.evaluation.metrics.frechet_distance)
    precision, recall = k-NN manifold precision / recall, k = 3 (disploss.evaluation.metrics.precision_recall)
    class accuracy = share of samples the classifier assigns to the class they were conditioned on.
Written into --out: results.json (every number and setting), results.md (mean +- std over seeds per arm, the
paired per-seed differences, the per-seed numbers), fid_vs_steps.png (mean with a +-1 std band per arm) and
samples_{arm}.png (the final samples of the first seed, a row per digit; real_digits.png the same for the
reference). Training runs live in --runs-dir (default {out}/runs, git-ignored); the same command run again resumes
unfinished runs and reuses the samples of finished checkpoints (and reports what they cost when they were made).

Choices, and why:
- Reference = the held-out split (about 360 real digits): the classifier never trained on them, just as it never
  saw the samples; the train split's features are fitted more tightly by the classifier and would bias the
  distance. (The generator trains on all 1797 digits, as the demo does: the reference is held out from the
  feature network, not from the generator.) --reference all uses every real digit instead. The score of the real
  train-split digits against the same reference is reported as a floor: a generator that reproduced its
  training data would score about that.
- 8 x 8 pixels by default (--image-size): the digits' own resolution. The demo's 16 x 16 is a bilinear upsample of
  the same 8 x 8 images and costs about 4x more per training step and per sample on a CPU.
- EMA decay 0.99 by default (--ema-decay), as the demo: with 0.999 the EMA of a 1500-step run still holds
  0.999**1500 = 22% of the random initialisation (69% at the first quarter), so early checkpoints would measure
  the EMA's lag, not the model.
- No guidance by default (--cfg-scale 1): the paper's no-cfg setting, and half the model calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from disploss.digit_classifier import ClassifierConfig

EXPERIMENTS = ("digits",)
REFERENCES = ("holdout", "all")
VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
RESULTS_SCHEMA = "disploss-experiment-digits-v1"
METRICS = ("fid", "precision", "recall", "class_accuracy")


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Arm:
    """One training recipe: the baseline (disp=False) or a dispersive variant with its lambda and tau."""

    name: str
    disp: bool
    variant: str = "infonce_l2"
    weight: float = 0.25
    tau: float = 1.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown dispersive variant {self.variant!r}; valid choices: {', '.join(VARIANTS)}")
        if self.disp and not (self.weight > 0 and self.tau > 0):
            raise ValueError(f"arm {self.name}: lambda and tau must be positive, got {self.weight}, {self.tau}")

    def describe(self) -> str:
        """A one-line description for tables."""
        if not self.disp:
            return "flow matching only"
        if self.variant == "covariance":
            return f"covariance, lambda={self.weight:g}"
        if self.variant == "hinge":
            return f"hinge, lambda={self.weight:g}"
        return f"{self.variant}, lambda={self.weight:g}, tau={self.tau:g}"


BASELINE = Arm("baseline", disp=False)
DISPERSIVE = Arm("dispersive", disp=True)  # the release's default: InfoNCE-L2, lambda 0.25, tau 1
# The demo's recipe (disploss.demo.DEMO): InfoNCE with cosine distance, lambda 0.25, tau 0.5.
DISPERSIVE_COSINE = Arm("dispersive_cosine", disp=True, variant="infonce_cosine", weight=0.25, tau=0.5)


def grid_arms(lambdas: tuple[float, ...], taus: tuple[float, ...]) -> list[Arm]:
    """The arms --grid adds: the other three variants at the default lambda / tau, then InfoNCE-L2 over
    lambdas x taus (the default pair, which is the `dispersive` arm, left out)."""
    arms = [Arm(f"disp-{v}", disp=True, variant=v) for v in VARIANTS if v != DISPERSIVE.variant]
    for lam in lambdas:
        for tau in taus:
            if (lam, tau) != (DISPERSIVE.weight, DISPERSIVE.tau):
                arms.append(Arm(f"disp-l2-lam{lam:g}-tau{tau:g}", disp=True, weight=lam, tau=tau))
    return arms


@dataclass(frozen=True)
class DigitsConfig:
    """Every setting of `disploss experiment digits` (the flags, resolved)."""

    out: str = "experiments/digits"
    runs_dir: str | None = None  # default: {out}/runs
    cache_dir: str | None = None  # default: disploss.digit_classifier.default_cache_dir()
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 800
    evals: int = 4  # checkpoints scored: every steps / evals steps
    image_size: int = 8
    batch_size: int = 64
    ema_decay: float = 0.99
    num_samples: int = 1000
    sample_steps: int = 11  # points of the Heun grid: 2 * (sample_steps - 1) model calls per image
    cfg_scale: float = 1.0
    noise_seed: int = 20250609
    reference: str = "holdout"
    grid: bool = False
    grid_lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    grid_taus: tuple[float, ...] = (0.5, 1.0, 2.0)
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    quick: bool = False
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; valid choices: {', '.join(REFERENCES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        for name in ("steps", "evals", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps % self.evals:
            raise ValueError(f"--steps {self.steps} must be a multiple of --evals {self.evals} (checkpoint spacing)")
        if self.num_samples < 10 * 4:
            raise ValueError(f"--num-samples must be at least 40 (4 per class, for precision/recall), got {self.num_samples}")
        if self.sample_steps < 2:
            raise ValueError(f"--sample-steps must be at least 2, got {self.sample_steps}")
        if self.cfg_scale < 1:
            raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), got {self.cfg_scale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.image_size % 2:
            raise ValueError(f"--image-size must be even (the demo model's patch size is 2), got {self.image_size}")
        if self.classifier.image_size != self.image_size:
            raise ValueError(
                f"the classifier reads {self.classifier.image_size} px images but the samples are {self.image_size} px"
            )

    def arms(self) -> list[Arm]:
        """Baseline and dispersive, then the grid's arms with --grid."""
        return [BASELINE, DISPERSIVE, DISPERSIVE_COSINE] + (grid_arms(self.grid_lambdas, self.grid_taus) if self.grid else [])

    def eval_steps(self) -> list[int]:
        """The steps whose checkpoints are scored."""
        every = self.steps // self.evals
        return [every * k for k in range(1, self.evals + 1)]

    def resolved_runs_dir(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir is not None else Path(self.out) / "runs"


# --quick: the whole pipeline in about a minute on 2 CPU cores.
QUICK = dict(
    seeds=(0,), steps=40, evals=2, num_samples=100, sample_steps=5, threads=1,
    classifier=ClassifierConfig(image_size=8, epochs=3),
)  # fmt: skip


def train_config(cfg: DigitsConfig, arm: Arm, seed: int):
    """The TrainConfig of one run: the demo's, with the experiment's budget, EMA, checkpoint spacing and arm.

    Its results_dir holds a hash of the settings, so a changed setting never resumes another run's checkpoints.
    """
    from disploss.demo import demo_config

    base = demo_config("", cfg.steps, disp=arm.disp, seed=seed, device=cfg.device)
    tc = dataclasses.replace(
        base, image_size=cfg.image_size, global_batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
        ckpt_every=cfg.steps // cfg.evals, sample_every=0, log_every=max(1, min(100, cfg.steps // 10)),
        disp_variant=arm.variant, disp_weight=arm.weight, disp_tau=arm.tau,
    )  # fmt: skip
    settings = {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("results_dir", "ckpt", "device")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    results_dir = cfg.resolved_runs_dir() / arm.name / f"seed{seed}-{key}"
    return dataclasses.replace(tc, results_dir=str(results_dir), ckpt="latest")


# ---------------------------------------------------------------------------------------------------------
# Sampling and scoring


def sample_plan(num_samples: int, noise_seed: int, image_size: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """The class labels and initial noise every run and checkpoint samples from.

    Labels cycle 0..9 (class-balanced; exactly so when num_samples is a multiple of 10); the noise is drawn from
    a CPU generator seeded with noise_seed alone, so it does not depend on the arm, the seed or the step.

    Returns:
        (labels int64 (N,), noise float32 (N, C, S, S)).
    """
    labels = torch.arange(num_samples) % 10
    gen = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn((num_samples, channels, image_size, image_size), generator=gen)  # N C S S
    return labels, noise


@torch.no_grad()
def sample_checkpoint(
    path: str | os.PathLike,
    labels: torch.Tensor,
    noise: torch.Tensor,
    sample_steps: int,
    cfg_scale: float,
    device: str = "cpu",
    batch_size: int = 500,
) -> np.ndarray:
    """Images from the EMA weights of a pixel-space training checkpoint, Heun ODE with fixed steps.

    Args:
        path: a checkpoint written by disploss.train (its stored 'args' give the model and transport).
        labels: (N,) classes; noise: (N, C, S, S) initial states.
        sample_steps: points of the time grid (2 * (sample_steps - 1) model calls).
        cfg_scale: classifier-free guidance scale (1: none), guidance on the first 3 channels as the reference.
    Returns:
        uint8 (N, S, S, 3).
    """
    from disploss.checkpoint import build_sit_from_checkpoint, load_checkpoint
    from disploss.imageio import to_uint8
    from disploss.sample import cfg_batch, guided_model_fn
    from disploss.transport import Sampler, create_transport

    state = load_checkpoint(path)
    args = state["args"]
    if args.get("vae") != "none":
        raise ValueError(f"{path}: the digits experiment samples pixel-space models (vae none), not vae {args.get('vae')}")
    model, _ = build_sit_from_checkpoint(
        state, model_name=args["model"], image_size=args["image_size"], num_classes=args["num_classes"],
        vae_factor=1, prefer="ema",
    )  # fmt: skip
    model = model.to(device)
    transport = create_transport(args["path_type"], args["prediction"], args["loss_weight"], args["train_eps"], args["sample_eps"])
    solve = Sampler(transport).sample_ode(sampling_method="heun2", num_steps=sample_steps, keep_trajectory=False)
    model_fn, doubled = guided_model_fn(model, cfg_scale, guide_channels=3)
    out = []
    for i in range(0, len(labels), batch_size):
        z, y = noise[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        zz, yy = cfg_batch(z, y, args["num_classes"], doubled)
        x = solve(zz, model_fn, y=yy)[-1][: len(y)]  # n C S S
        out.append(to_uint8(x, mode="round"))
    return np.concatenate(out)


def score(classifier, ref_features: np.ndarray, ref_stats, images: np.ndarray, labels: np.ndarray) -> dict:
    """feature-FID, precision, recall and class accuracy of uint8 images against the reference features."""
    from disploss.digit_classifier import classify
    from disploss.evaluation.metrics import compute_statistics, frechet_distance, precision_recall

    feats, preds = classify(classifier, images)
    mu, sigma = compute_statistics(feats)
    fid = frechet_distance(mu, sigma, *ref_stats)
    precision, recall = precision_recall(ref_features, feats, k=3)
    return {"fid": fid, "precision": precision, "recall": recall,
            "class_accuracy": float((preds == np.asarray(labels)).mean())}


def _sample_cache_key(cfg: DigitsConfig) -> str:
    settings = {"num_samples": cfg.num_samples, "noise_seed": cfg.noise_seed, "sample_steps": cfg.sample_steps,
                "cfg_scale": cfg.cfg_scale, "sampler": "heun2", "weights": "ema", "pixels": "round"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _samples_for(cfg: DigitsConfig, run_dir: Path, step: int, labels, noise) -> tuple[np.ndarray, float, float]:
    """Samples of one checkpoint, from the run's sample cache when it has them.

    Returns:
        (uint8 images, wall s, CPU s): the time of drawing them, recorded beside the cache, so a rerun that
        reuses them still reports what they cost.
    """
    from disploss.fileio import atomic_write, atomic_write_json

    cache = run_dir / "experiment_samples" / _sample_cache_key(cfg) / f"{step:07d}.npy"
    cost_file = cache.with_suffix(".json")
    if cache.is_file():
        cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {"wall_s": 0.0, "cpu_s": 0.0}
        return np.load(cache), float(cost["wall_s"]), float(cost["cpu_s"])
    from disploss.checkpoint import checkpoint_path

    t0, c0 = time.time(), _cpu_seconds()
    images = sample_checkpoint(checkpoint_path(run_dir / "checkpoints", step), labels, noise, cfg.sample_steps,
                               cfg.cfg_scale, cfg.device)
    wall, cpu = time.time() - t0, _cpu_seconds() - c0

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
            np.save(f, images)

    atomic_write(cache, write)
    atomic_write_json(cost_file, {"wall_s": wall, "cpu_s": cpu})
    return images, wall, cpu


def _train_run(tc) -> tuple[Path, float, float]:
    """train(tc), resuming its run; (run folder, wall s, CPU s) spent training it over every invocation.

    The cost is kept in {results_dir}/experiment_timing.json and only grows when this call trained steps.
    """
    from disploss.checkpoint import checkpoint_step, find_latest_run
    from disploss.fileio import atomic_write_json
    from disploss.train import train

    ledger = Path(tc.results_dir) / "experiment_timing.json"
    spent = json.loads(ledger.read_text()) if ledger.is_file() else {"train_wall_s": 0.0, "train_cpu_s": 0.0}
    latest = find_latest_run(tc.results_dir, tc.model)
    finished = latest is not None and checkpoint_step(latest) == tc.max_steps
    t0, c0 = time.time(), _cpu_seconds()
    run_dir = Path(train(tc))
    if not finished:
        spent = {"train_wall_s": spent["train_wall_s"] + time.time() - t0,
                 "train_cpu_s": spent["train_cpu_s"] + _cpu_seconds() - c0}
        atomic_write_json(ledger, spent)
    return run_dir, float(spent["train_wall_s"]), float(spent["train_cpu_s"])


def _last_metrics(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "flow" in r]
    return rows[-1] if rows else {}


# ---------------------------------------------------------------------------------------------------------
# Summaries


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def summarise(arm_runs: list[dict], steps: list[int]) -> list[dict]:
    """Per step: mean and std over seeds (ddof 1; 0 for one seed) of every metric."""
    out = []
    for step in steps:
        rows = [c for run in arm_runs for c in run["checkpoints"] if c["step"] == step]
        if rows:
            out.append({"step": step, **{m: _mean_std([r[m] for r in rows]) for m in METRICS}})
    return out


def paired_differences(base_runs: list[dict], arm_runs: list[dict], steps: list[int]) -> list[dict]:
    """Per step: arm minus baseline for the seeds both have (same seed: same initialisation and data order)."""
    base = {(r["seed"], c["step"]): c for r in base_runs for c in r["checkpoints"]}
    out = []
    for step in steps:
        pairs = [(c, base[(r["seed"], step)]) for r in arm_runs for c in r["checkpoints"]
                 if c["step"] == step and (r["seed"], step) in base]
        if pairs:
            out.append({"step": step, **{m: _mean_std([a[m] - b[m] for a, b in pairs]) for m in METRICS}})
    return out


def _fmt(stat: dict, digits: int = 2) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def render_markdown(results: dict) -> str:
    """results.md: the final-step table, FID by step, paired differences, per-seed numbers."""
    s = results["settings"]
    arms = results["arms"]
    final = max(s["eval_steps"])
    lines = [
        "# Dispersive loss vs baseline on the bundled digits",
        "",
        f"SiT-T/2 (the demo model) at {s['image_size']}x{s['image_size']} px, {s['steps']} steps, batch {s['batch_size']}, "
        f"EMA {s['ema_decay']}, seeds {', '.join(map(str, s['seeds']))}. Samples: {s['num_samples']} per checkpoint "
        f"(class-balanced, fixed noise seed {s['noise_seed']}), Heun ODE with {s['sample_steps']} grid points, "
        f"cfg scale {s['cfg_scale']:g}, EMA weights. Features: penultimate layer of a digit CNN "
        f"(held-out accuracy {results['classifier']['holdout_accuracy']:.4f}); reference: {results['reference']['description']}.",
        "",
        f"Real train-split digits against the same reference (a floor): FID {results['reference']['floor']['fid']:.3f}, "
        f"precision {results['reference']['floor']['precision']:.3f}, recall {results['reference']['floor']['recall']:.3f}.",
        "",
        f"## At step {final} (mean ± std over seeds; std with ddof 1)",
        "",
        "| arm | recipe | feature-FID ↓ | precision ↑ | recall ↑ | class accuracy ↑ | final flow loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        row = next((r for r in arm["summary"] if r["step"] == final), None)
        if row is None:
            continue
        flows = [r["final_flow_loss"] for r in arm["runs"] if r.get("final_flow_loss") is not None]
        flow = _fmt(_mean_std(flows), 4) if flows else "-"
        lines.append(f"| {name} | {arm['recipe']} | {_fmt(row['fid'])} | {_fmt(row['precision'], 3)} | "
                     f"{_fmt(row['recall'], 3)} | {_fmt(row['class_accuracy'], 3)} | {flow} |")
    lines += ["", "## feature-FID by step (mean ± std over seeds)", ""]
    names = list(arms)
    lines += ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in s["eval_steps"]:
        cells = []
        for name in names:
            row = next((r for r in arms[name]["summary"] if r["step"] == step), None)
            cells.append(_fmt(row["fid"]) if row else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    others = [n for n in names if n != "baseline"]
    if others:
        lines += ["", "## Paired differences, arm minus baseline, same seed (mean ± std over seeds)", "",
                  "Negative FID difference = the arm is better.", "",
                  "| arm | step | Δ FID | Δ precision | Δ recall | Δ class accuracy |", "|---|---|---|---|---|---|"]
        for name in others:
            for row in arms[name]["paired_vs_baseline"]:
                lines.append(f"| {name} | {row['step']} | {_fmt(row['fid'])} | {_fmt(row['precision'], 3)} | "
                             f"{_fmt(row['recall'], 3)} | {_fmt(row['class_accuracy'], 3)} |")
    lines += ["", "## Per seed", "",
              "| arm | seed | step | feature-FID | precision | recall | class accuracy |", "|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        for run in arm["runs"]:
            for c in run["checkpoints"]:
                lines.append(f"| {name} | {run['seed']} | {c['step']} | {c['fid']:.3f} | {c['precision']:.3f} | "
                             f"{c['recall']:.3f} | {c['class_accuracy']:.3f} |")
    lines += ["", "## Time", "", "| arm | seed | train wall s | train CPU s | sampling wall s | sampling CPU s |",
              "|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        for run in arm["runs"]:
            lines.append(f"| {name} | {run['seed']} | {run['train_wall_s']:.0f} | {run['train_cpu_s']:.0f} | "
                         f"{run['sample_wall_s']:.0f} | {run['sample_cpu_s']:.0f} |")
    t = results["timing"]
    lines += ["", f"This invocation: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU (the process, all threads, "
                  f"{t['torch_threads']} torch thread(s)); training and sampling of the runs as recorded when they were "
                  f"done: {t['runs_wall_s']:.0f} s wall, {t['runs_cpu_s']:.0f} s CPU. {t['cpu_count']} CPU cores shared "
                  f"with other jobs (load average {t['loadavg_start'][0]:.1f} at the start, {t['loadavg_end'][0]:.1f} at "
                  "the end): timings are noisy.", ""]
    return "\n".join(lines)


def plot_fid(results: dict, path: str | os.PathLike) -> None:
    """fid_vs_steps.png: feature-FID (left) and recall / precision (right) against steps, mean with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.fileio import atomic_write

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, arm) in enumerate(results["arms"].items()):
        color = f"C{i % 10}"
        steps = np.array([r["step"] for r in arm["summary"]])
        if not len(steps):
            continue
        for run in arm["runs"]:  # each seed, faint
            ax1.plot([c["step"] for c in run["checkpoints"]], [c["fid"] for c in run["checkpoints"]],
                     color=color, alpha=0.25, lw=0.8)
        mean = np.array([r["fid"]["mean"] for r in arm["summary"]])
        std = np.array([r["fid"]["std"] for r in arm["summary"]])
        n = arm["summary"][0]["fid"]["n"]
        ax1.plot(steps, mean, color=color, marker="o", label=f"{name} (n={n})")
        ax1.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        for metric, style in (("recall", "-"), ("precision", "--")):
            m = np.array([r[metric]["mean"] for r in arm["summary"]])
            sd = np.array([r[metric]["std"] for r in arm["summary"]])
            ax2.plot(steps, m, color=color, ls=style, marker=".", label=f"{name} {metric}")
            ax2.fill_between(steps, m - sd, m + sd, color=color, alpha=0.12)
    floor = results["reference"]["floor"]["fid"]
    ax1.axhline(floor, color="grey", ls=":", lw=1, label="real train split")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step"), ax1.set_ylabel("feature-FID (log scale)")
    ax1.set_title("feature-FID vs steps (mean ± 1 std over seeds)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("training step"), ax2.set_ylim(0, 1.02)
    ax2.set_title("recall (solid), precision (dashed)")
    ax2.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _write_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 10, zoom: int = 4) -> None:
    """A row per digit, `per_class` samples a row, each pixel drawn as zoom x zoom (8 px digits are tiny)."""
    from disploss.imageio import save_grid

    rows = [images[labels == c] for c in range(10)]
    per_class = min(per_class, *(len(r) for r in rows))
    grid = np.concatenate([r[:per_class] for r in rows])  # (10 * per_class) H W C
    save_grid(grid.repeat(zoom, axis=1).repeat(zoom, axis=2), path, nrow=per_class)


# ---------------------------------------------------------------------------------------------------------
# The experiment


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
        return _run_digits(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run_digits(cfg: DigitsConfig, log=print) -> dict:
    from disploss.digit_classifier import classify, load_or_train, split_arrays
    from disploss.evaluation.metrics import compute_statistics, frechet_distance, precision_recall
    from disploss.fileio import atomic_write_bytes, atomic_write_json

    t_start, cpu_start = time.time(), _cpu_seconds()
    load_start = os.getloadavg()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # -- feature network and reference ------------------------------------------------------------------------
    classifier, cls_info = load_or_train(cfg.classifier, cfg.cache_dir)
    log(f"digit classifier: held-out accuracy {cls_info['holdout_accuracy']:.4f} "
        f"({'cached' if cls_info['cached'] else 'trained now'}: {cls_info['path']})")
    ref_images, ref_labels = split_arrays(cfg.classifier, cfg.reference)
    _write_grid(ref_images, ref_labels, out / "real_digits.png")  # for comparison with samples_{arm}.png
    ref_features, _ = classify(classifier, ref_images)
    ref_stats = compute_statistics(ref_features)
    floor_images, _ = split_arrays(cfg.classifier, "train")
    floor_features, _ = classify(classifier, floor_images)
    floor_p, floor_r = precision_recall(ref_features, floor_features, k=3)
    floor = {"fid": frechet_distance(*compute_statistics(floor_features), *ref_stats), "precision": floor_p,
             "recall": floor_r, "num_images": int(len(floor_images))}
    description = (f"the {len(ref_images)} real held-out digits" if cfg.reference == "holdout"
                   else f"all {len(ref_images)} real digits")

    labels, noise = sample_plan(cfg.num_samples, cfg.noise_seed, cfg.image_size)
    arms = cfg.arms()
    results: dict = {
        "schema": RESULTS_SCHEMA,
        "partial": True,
        "settings": {**_settings_dict(cfg), "eval_steps": cfg.eval_steps(), "arms": [dataclasses.asdict(a) for a in arms]},
        "classifier": {k: cls_info[k] for k in ("holdout_accuracy", "train_accuracy", "num_train", "num_holdout",
                                                 "path", "key", "config")},
        "reference": {"split": cfg.reference, "num_images": int(len(ref_images)), "description": description,
                      "floor": floor},
        "arms": {a.name: {**dataclasses.asdict(a), "recipe": a.describe(), "runs": [], "summary": [],
                          "paired_vs_baseline": []} for a in arms},
        "environment": _environment(),
    }

    # -- runs: seed-major, so an interrupted experiment still has paired arms ------------------------------------
    for seed in cfg.seeds:
        for arm in arms:
            tc = train_config(cfg, arm, seed)
            log(f"== {arm.name}, seed {seed}: {tc.results_dir}")
            run_dir, train_wall, train_cpu = _train_run(tc)
            run = {"seed": seed, "run_dir": str(run_dir), "train_wall_s": train_wall, "train_cpu_s": train_cpu,
                   "sample_wall_s": 0.0, "sample_cpu_s": 0.0, "checkpoints": []}
            last = _last_metrics(run_dir)
            run["final_flow_loss"] = last.get("flow")
            run["final_disp_loss"] = last.get("disp")
            for step in cfg.eval_steps():
                images, sw, sc = _samples_for(cfg, run_dir, step, labels, noise)
                run["sample_wall_s"] += sw
                run["sample_cpu_s"] += sc
                metrics = score(classifier, ref_features, ref_stats, images, labels.numpy())
                run["checkpoints"].append({"step": step, **metrics})
                log(f"   step {step}: feature-FID {metrics['fid']:.3f}, precision {metrics['precision']:.3f}, "
                    f"recall {metrics['recall']:.3f}, class accuracy {metrics['class_accuracy']:.3f} "
                    f"(sampling {sw:.0f} s)")
                if step == cfg.eval_steps()[-1] and seed == cfg.seeds[0]:
                    _write_grid(images, labels.numpy(), out / f"samples_{arm.name}.png")
            results["arms"][arm.name]["runs"].append(run)
            _refresh(results, cfg, t_start, cpu_start, load_start)
            atomic_write_json(out / "results.json", results)

    results["partial"] = False
    _refresh(results, cfg, t_start, cpu_start, load_start)
    _check_finite(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", render_markdown(results).encode())
    plot_fid(results, out / "fid_vs_steps.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'fid_vs_steps.png'}")
    return results


def _refresh(results: dict, cfg: DigitsConfig, t_start: float, cpu_start: float, load_start) -> None:
    steps = cfg.eval_steps()
    base_runs = results["arms"]["baseline"]["runs"]
    for name, arm in results["arms"].items():
        arm["summary"] = summarise(arm["runs"], steps)
        arm["paired_vs_baseline"] = [] if name == "baseline" else paired_differences(base_runs, arm["runs"], steps)
    runs = [run for arm in results["arms"].values() for run in arm["runs"]]
    results["timing"] = {
        "wall_s": time.time() - t_start, "cpu_s": _cpu_seconds() - cpu_start,  # this invocation
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
            raise ValueError(f"non-finite number at {where} in the results")
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    walk(results, "results")


def _cpu_seconds() -> float:
    # User + system time of this process, all threads (torch's intra-op pool included).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _settings_dict(cfg: DigitsConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["runs_dir"] = str(cfg.resolved_runs_dir())
    for k in ("seeds", "grid_lambdas", "grid_taus"):
        d[k] = list(d[k])
    return d


def _environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# flag -> (DigitsConfig field, type, help); every default is DigitsConfig's (or QUICK's with --quick)
_DIGITS_FLAGS = {
    "--out": ("out", str, "output folder of results.json / results.md / the plots"),
    "--runs-dir": ("runs_dir", str, "folder of the training runs (default: OUT/runs, git-ignored)"),
    "--cache-dir": ("cache_dir", str, "cache of the digit classifier (default: $DISPLOSS_CACHE or ~/.cache/disploss)"),
    "--seeds": ("seeds", _int_list, "training seeds, comma-separated; each arm runs every seed"),
    "--steps": ("steps", int, "training steps per run"),
    "--evals": ("evals", int, "checkpoints scored per run, evenly spaced (steps must be a multiple)"),
    "--image-size": ("image_size", int, "image side in pixels (8: the digits' own resolution)"),
    "--batch-size": ("batch_size", int, "training batch"),
    "--ema-decay": ("ema_decay", float, "EMA decay per step (the samples come from the EMA weights)"),
    "--num-samples": ("num_samples", int, "images per checkpoint, class-balanced"),
    "--sample-steps": ("sample_steps", int, "points of the Heun ODE grid (2 * (n - 1) model calls)"),
    "--cfg-scale": ("cfg_scale", float, "classifier-free guidance scale of the samples (1: none)"),
    "--noise-seed": ("noise_seed", int, "seed of the initial noise, shared by every arm, seed and checkpoint"),
    "--reference": ("reference", str, "real images of the reference statistics: holdout or all"),
    "--grid-lambdas": ("grid_lambdas", _float_list, "lambdas of the --grid (InfoNCE-L2)"),
    "--grid-taus": ("grid_taus", _float_list, "taus of the --grid (InfoNCE-L2)"),
    "--device": ("device", str, "cpu or cuda"),
    "--threads": ("threads", int, "torch CPU threads (default: torch's choice); 1 is much faster than 2 on a machine "
                               "shared with other jobs (threads of an oversubscribed pool wait for each other)"),
}


def _add_digits_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DigitsConfig()
    for flag, (name, kind, help_text) in _DIGITS_FLAGS.items():
        extra = {"choices": REFERENCES} if name == "reference" else {}
        shown = getattr(defaults, name)
        shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
        suffix = "" if shown is None else f" (default: {shown})"  # None: the help text says what happens
        parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text + suffix, **extra)
    parser.add_argument("--classifier-epochs", type=int, default=None,
                        help=f"epochs of the digit classifier (default: {ClassifierConfig().epochs}; "
                             f"--quick: {QUICK['classifier'].epochs})")
    parser.add_argument("--grid", action="store_true", default=None,
                        help="also run the other dispersive variants and an InfoNCE-L2 lambda x tau grid")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run in about a minute: {QUICK['steps']} steps, seed 0 only, "
                             f"{QUICK['num_samples']} samples, {QUICK['classifier'].epochs}-epoch classifier")


def digits_config(args: argparse.Namespace) -> DigitsConfig:
    """The DigitsConfig of parsed flags: the defaults, or QUICK's with --quick, then every flag given."""
    values: dict = dict(QUICK) if args.quick else {}
    values["quick"] = bool(args.quick)
    for _, (name, _, _) in _DIGITS_FLAGS.items():
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.grid:
        values["grid"] = True
    image_size = values.get("image_size", DigitsConfig.image_size)
    classifier = values.get("classifier", ClassifierConfig())
    classifier = dataclasses.replace(classifier, image_size=image_size)
    if args.classifier_epochs is not None:
        classifier = dataclasses.replace(classifier, epochs=args.classifier_epochs)
    values["classifier"] = classifier
    return DigitsConfig(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    digits = sub.add_parser(
        "digits", help="baseline vs dispersive loss on the bundled digits, several seeds, feature-FID vs steps",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_digits_arguments(digits)


def run(args: argparse.Namespace) -> int:
    if args.experiment != "digits":  # argparse's choices already refuse others; kept for direct callers
        print(f"disploss experiment: unknown experiment {args.experiment!r}; valid choices: {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    try:
        cfg = digits_config(args)
    except ValueError as err:
        print(f"disploss experiment digits: error: {err}", file=sys.stderr)
        return 2
    results = run_digits(cfg)
    final = max(cfg.eval_steps())
    print(f"\nfeature-FID at step {final} (mean ± std over {len(cfg.seeds)} seed(s)):")
    for name, arm in results["arms"].items():
        row = next(r for r in arm["summary"] if r["step"] == final)
        print(f"  {name:<28} {_fmt(row['fid'])}")
    print(f"classifier held-out accuracy {results['classifier']['holdout_accuracy']:.4f}; "
          f"{results['timing']['wall_s']:.0f} s wall, {results['timing']['cpu_s']:.0f} s CPU")
    return 0
