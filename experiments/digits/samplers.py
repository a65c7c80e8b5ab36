"""Feature-FID against model calls for every sampler, on trained digits models (`disploss experiment samplers`, or
`python -m experiments.digits samplers` from the repository root).

    disploss experiment samplers --threads 1     # 3 baseline digits models, 22 settings: ~30 min on an idle CPU thread
    disploss experiment samplers --quick         # the same pipeline in about a minute

The models are the baseline arm of the digits experiment (experiments.digits.config: SiT-T/2, 8x8 px, pixel
space, 800 steps, EMA 0.99), one per seed, trained by disploss.training.train (or reused from --runs-dir). From the
final EMA weights of each, the same 1000 class-balanced labels and initial noise (the digits experiment's) are
sampled with every setting in --samplers, without guidance, and scored in the digit classifier's feature space
against the real held-out digits (feature-FID, precision, recall, class accuracy, experiments.digits.scoring).

Per setting and seed it records NFE, the model evaluations per image (counted by a wrapper as rows evaluated /
images, so a per-image adaptive solver's shrinking batch counts exactly), and the solver error: the RMS distance of
the samples (in [-1, 1], before the uint8 conversion) to a tight-tolerance solution of the same ODE (dopri5,
atol = rtol = 1e-5), which separates integration error from the model's own error that FID mostly measures.
Each setting's feature-FID is compared with the default sampler (adaptive dopri5) on the same model and noise
(paired differences over seeds); the seed noise is the std of dopri5's FID over the seeds.

A setting (--samplers, comma-separated) is MODE:METHOD[:GRID_POINTS][:MODIFIER...] with MODE ode or sde, e.g.
ode:dopri5, ode:ab2:11, sde:Euler:50; modifiers: batch (adaptive step control over the batch, torchdiffeq's), powerR
(--time-schedule power --time-rho R), tolT (atol = rtol = T), bf16 (the model under bfloat16 autocast).

Written into --out: results.json (every number), results.md (the table), fid_vs_nfe.png. Sampled images are cached
per model and setting in the runs folder, so a rerun only samples the new settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disploss.errors import ConfigError
from disploss.options import at_least, check_options, option
from disploss.runtime import DEVICES
from experiments.digits.config import int_list

REFERENCE_SETTING = "ode:dopri5:tol1e-5"  # the accurate solution that the solver error is measured against
DEFAULT_SETTING = "ode:dopri5"  # the commands' default sampler: the comparison for FID
# What the README recommends for FID at a fifth of dopri5's model calls (measured: BENCHMARKS.md); bold in results.md.
RECOMMENDED_SETTING = "ode:ab2:11:power1.5"
DEFAULT_SAMPLERS = (
    "ode:dopri5", "ode:dopri5:batch",
    "ode:euler:6", "ode:euler:11", "ode:euler:21",
    "ode:heun2:3", "ode:heun2:6", "ode:heun2:11",
    "ode:ab2:4", "ode:ab2:6", "ode:ab2:8", "ode:ab2:11", "ode:ab2:11:bf16",
    "ode:ab3:4", "ode:ab3:6", "ode:ab3:8", "ode:ab3:11",
    "ode:euler:11:power1.5", "ode:heun2:6:power1.5", "ode:ab2:11:power1.5",
    "sde:Euler:25", "sde:Euler:50",
)  # fmt: skip
QUICK = dict(seeds=(0,), steps=40, num_samples=100, samplers=("ode:dopri5", "ode:heun2:3", "ode:ab2:4", "sde:Euler:5"))
SCHEMA = "disploss-experiment-samplers-v1"


def parse_setting(text: str) -> dict:
    """'ode:ab2:11:power1.5' -> {"sampler": the mode and its config's fields (disploss.sampling.config.SAMPLERS),
    "bf16": bool}. Raises ConfigError naming the valid forms."""
    parts = text.strip().split(":")
    if len(parts) < 2 or parts[0] not in ("ode", "sde"):
        raise ConfigError(f"sampler setting {text!r}: expected MODE:METHOD[:GRID_POINTS][:MODIFIER...], MODE ode|sde")
    mode, method, rest = parts[0].upper(), parts[1], parts[2:]
    fields: dict = {"mode": mode, "sampling_method": method}
    bf16 = False
    for i, part in enumerate(rest):
        if i == 0 and part.isdigit():
            fields["num_sampling_steps"] = int(part)
        elif part == "batch":
            fields["step_control"] = "batch"
        elif part == "bf16":
            bf16 = True
        elif part.startswith("power"):
            fields.update(time_schedule="power", time_rho=float(part[5:]))
        elif part.startswith("tol"):
            fields.update(atol=float(part[3:]), rtol=float(part[3:]))
        else:
            raise ConfigError(f"sampler setting {text!r}: unknown part {part!r}; modifiers: batch, powerR, tolT, bf16")
    return {"sampler": fields, "bf16": bf16}


def _settings_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for item in items:
        parse_setting(item)
    return items


@dataclass(frozen=True)
class SamplersConfig:
    """Every setting of `disploss experiment samplers`."""

    out: str = option("benchmarks/samplers", "output folder of results.json / results.md / fid_vs_nfe.png")
    runs_dir: str | None = option(None, "folder of the training runs and sample caches (default: OUT/runs)")
    cache_dir: str | None = option(
        None, "cache of the digit classifier (default: $DISPLOSS_CACHE or ~/.cache/disploss)"
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds of the models, comma-separated", parse=int_list)
    steps: int = option(800, "training steps of each model (the digits experiment's)", check=at_least(1))
    num_samples: int = option(1000, "images per model and setting, class-balanced", check=at_least(10))
    samplers: tuple[str, ...] = option(DEFAULT_SAMPLERS, "settings, comma-separated (see the module docstring)",
                                       parse=_settings_list)  # fmt: skip
    batch_size: int = option(500, "images per sampling batch", check=at_least(1))
    device: str = option("cpu", "cpu or cuda", choices=DEVICES)
    threads: int | None = option(None, "torch CPU threads (1 is fastest on a machine shared with other jobs)",
                                 check=at_least(1))  # fmt: skip
    quick: bool = option(False, f"a smoke run in about a minute: {QUICK}")

    def __post_init__(self):
        check_options(self)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct and non-empty, got {self.seeds}")

    def digits(self):
        """The DigitsConfig whose baseline runs are the models."""
        from experiments.digits.classifier import ClassifierConfig
        from experiments.digits.config import DigitsConfig

        runs = self.runs_dir if self.runs_dir is not None else str(Path(self.out) / "runs")
        # evals=4 as the digits experiment: the run folders (named by a hash of the training settings) are shared
        return DigitsConfig(out=self.out, runs_dir=runs, cache_dir=self.cache_dir, seeds=self.seeds, steps=self.steps,
                            evals=4, num_samples=max(self.num_samples, 40), device=self.device,
                            classifier=ClassifierConfig(image_size=8, epochs=3) if self.quick else ClassifierConfig())  # fmt: skip


def quick_config(**overrides) -> SamplersConfig:
    """--quick's settings, explicit values winning."""
    return SamplersConfig(**{**QUICK, "quick": True, **overrides})


# ---------------------------------------------------------------------------------------------------------
def sample_setting(model, transport, setting: str, labels, noise, batch_size: int) -> tuple[np.ndarray, float]:
    """Samples of one setting from a pixel-space model, no guidance.

    Returns:
        (float32 samples (N, C, S, S) in [-1, 1] before the uint8 conversion, NFE per image).
    """
    from disploss.sampling.config import SAMPLERS
    from disploss.sampling.guidance import guided_model_fn

    spec = parse_setting(setting)
    model_fn, _ = guided_model_fn(model, 1.0, guide_channels=3, bf16=spec["bf16"])
    rows = [0]

    def counted(x, t, y):
        rows[0] += x.shape[0]
        return model_fn(x, t, y)

    fields = dict(spec["sampler"])
    sampler = SAMPLERS[fields.pop("mode")](**fields)
    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            z, y = noise[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
            out.append(sampler(transport, counted, z, y).float().cpu())  # n C S S
    return torch.cat(out).numpy(), rows[0] / len(labels)


def _cached(cache: Path, make):
    # (samples, nfe, wall s, cpu s) from the cache, or made and cached
    from disploss.fileio import atomic_write, atomic_write_json
    from experiments.digits.scoring import cpu_seconds

    meta = cache.with_suffix(".json")
    if cache.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        return np.load(cache), info["nfe"], info["wall_s"], info["cpu_s"]
    t0, c0 = time.time(), cpu_seconds()
    samples, nfe = make()
    wall, cpu = time.time() - t0, cpu_seconds() - c0

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, samples)

    atomic_write(cache, write)
    atomic_write_json(meta, {"nfe": nfe, "wall_s": wall, "cpu_s": cpu})
    return samples, nfe, wall, cpu


def run_samplers(cfg: SamplersConfig, log=print) -> dict:
    """Train (or reuse) the models, sample and score every setting; write results.{json,md} and fid_vs_nfe.png."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: SamplersConfig, log) -> dict:
    from disploss.checkpoint import build_sit_from_checkpoint, load_checkpoint
    from disploss.evaluation.metrics import compute_statistics
    from disploss.fileio import atomic_write_bytes, atomic_write_json
    from disploss.imageio import to_uint8
    from disploss.transport import create_transport
    from experiments.digits.classifier import classify, load_or_train, split_arrays
    from experiments.digits.config import BASELINE, train_config
    from experiments.digits.run import _environment, _train_run
    from experiments.digits.scoring import sample_plan, score

    dcfg = cfg.digits()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier, cls_info = load_or_train(dcfg.classifier, dcfg.cache_dir)
    ref_images, _ = split_arrays(dcfg.classifier, dcfg.reference)
    ref_features, _ = classify(classifier, ref_images)
    ref_stats = compute_statistics(ref_features)
    labels, noise = sample_plan(cfg.num_samples, dcfg.noise_seed, dcfg.image_size)
    settings = list(dict.fromkeys([REFERENCE_SETTING, DEFAULT_SETTING, *cfg.samplers]))
    results: dict = {
        "schema": SCHEMA,
        "settings": {
            **dataclasses.asdict(cfg),
            "samplers": settings,
            "noise_seed": dcfg.noise_seed,
            "image_size": dcfg.image_size,
            "reference_setting": REFERENCE_SETTING,
            "default_setting": DEFAULT_SETTING,
        },  # fmt: skip
        "classifier_holdout_accuracy": cls_info["holdout_accuracy"],
        "runs": [],
        "environment": {**_environment(), "torch_threads": torch.get_num_threads()},
    }
    t_start = time.time()
    for seed in cfg.seeds:
        tc = train_config(dcfg, BASELINE, seed)
        log(f"== model: baseline, seed {seed}: {tc.results_dir}")
        run_dir, _, _ = _train_run(tc)
        from disploss.checkpoint import checkpoint_path

        state = load_checkpoint(checkpoint_path(run_dir / "checkpoints", cfg.steps))
        args = state["args"]
        model, _ = build_sit_from_checkpoint(state, model_name=args["model"], image_size=args["image_size"],
                                             num_classes=args["num_classes"], vae_factor=1, prefer="ema")  # fmt: skip
        model = model.to(cfg.device).eval().requires_grad_(False)
        transport = create_transport(args["path_type"], args["prediction"], args["loss_weight"], args["train_eps"],
                                     args["sample_eps"])  # fmt: skip
        key = hashlib.sha256(json.dumps([cfg.num_samples, dcfg.noise_seed, cfg.batch_size]).encode()).hexdigest()[:8]
        cache_dir = run_dir / "sampler_samples" / key
        reference = None
        rows = []
        for setting in settings:
            name = setting.replace(":", "_")
            samples, nfe, wall, cpu = _cached(
                cache_dir / f"{name}.npy",
                lambda s=setting, m=model, tr=transport: sample_setting(m, tr, s, labels, noise, cfg.batch_size),
            )
            if setting == REFERENCE_SETTING:
                reference = samples
            images = to_uint8(torch.from_numpy(samples), mode="round")
            metrics = score(classifier, ref_features, ref_stats, images, labels.numpy())
            # the SDE samples another distribution path: its distance to the ODE solution is no solver error
            ode = setting.startswith("ode:")
            error = float(np.sqrt(np.mean((samples.astype(np.float64) - reference) ** 2))) if ode else None
            rows.append({"setting": setting, "nfe": nfe, "solver_rms_error": error, **metrics,
                         "sample_wall_s": wall, "sample_cpu_s": cpu})  # fmt: skip
            shown = "-" if error is None else f"{error:.4f}"
            log(f"   {setting:<24} NFE {nfe:6.1f}  feature-FID {metrics['fid']:7.2f}  solver error {shown}  "
                f"class acc {metrics['class_accuracy']:.3f}  ({wall:.0f} s)")  # fmt: skip
        results["runs"].append({"seed": seed, "run_dir": os.path.relpath(run_dir, cfg.out), "settings": rows})
    results["summary"] = summarise(results)
    results["timing"] = {"wall_s": time.time() - t_start}
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", render_markdown(results).encode())
    plot_fid_vs_nfe(results, out / "fid_vs_nfe.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'fid_vs_nfe.png'}")
    return results


# ---------------------------------------------------------------------------------------------------------
def _stat(values) -> dict | None:
    if any(v is None for v in values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def summarise(results: dict) -> list[dict]:
    """Per setting: mean and std over seeds of NFE, FID, solver error and class accuracy, and the FID minus the
    default sampler's on the same model (paired); `within_seed_noise`: |paired mean| <= std of the default's FID."""
    by_seed = {run["seed"]: {r["setting"]: r for r in run["settings"]} for run in results["runs"]}
    noise = _stat([rows[DEFAULT_SETTING]["fid"] for rows in by_seed.values()])["std"]
    default_nfe = _stat([rows[DEFAULT_SETTING]["nfe"] for rows in by_seed.values()])["mean"]
    out = []
    for setting in results["settings"]["samplers"]:
        rows = [seed_rows[setting] for seed_rows in by_seed.values() if setting in seed_rows]
        pairs = [seed_rows[setting]["fid"] - seed_rows[DEFAULT_SETTING]["fid"] for seed_rows in by_seed.values()]
        delta = _stat(pairs)
        out.append({
            "setting": setting, "nfe": _stat([r["nfe"] for r in rows]), "fid": _stat([r["fid"] for r in rows]),
            "fid_minus_default": delta, "solver_rms_error": _stat([r["solver_rms_error"] for r in rows]),
            "class_accuracy": _stat([r["class_accuracy"] for r in rows]),
            "precision": _stat([r["precision"] for r in rows]), "recall": _stat([r["recall"] for r in rows]),
            "nfe_share_of_default": _stat([r["nfe"] for r in rows])["mean"] / default_nfe,
            "within_seed_noise": abs(delta["mean"]) <= noise,
        })  # fmt: skip
    return out


def _f(stat: dict | None, digits: int = 2) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def render_markdown(results: dict) -> str:
    """results.md: one row per setting."""
    s = results["settings"]
    lines = [
        "# Feature-FID against model calls (NFE), digits baseline models",
        "",
        f"Models: the digits baseline (SiT-T/2, {s['image_size']} px, {s['steps']} steps), seeds "
        f"{', '.join(map(str, s['seeds']))}; {s['num_samples']} samples per model and setting (the same noise and "
        f"labels for all), no guidance. Mean ± std over seeds. `FID - default`: paired difference with "
        f"`{DEFAULT_SETTING}` on the same model. Solver error: RMS distance (in [-1, 1]) to `{REFERENCE_SETTING}`.",
        "",
        "| setting | NFE per image | share of dopri5's NFE | feature-FID | FID - default | solver RMS error | class accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        mark = " *" if r["within_seed_noise"] and r["setting"] != DEFAULT_SETTING else ""
        name = f"**`{r['setting']}`** (recommended)" if r["setting"] == RECOMMENDED_SETTING else f"`{r['setting']}`"
        lines.append(
            f"| {name} | {_f(r['nfe'], 1)} | {r['nfe_share_of_default']:.2f} | {_f(r['fid'])} | "
            f"{_f(r['fid_minus_default'])}{mark} | {_f(r['solver_rms_error'], 4)} | {_f(r['class_accuracy'], 3)} |"
        )
    default = next(r for r in results["summary"] if r["setting"] == DEFAULT_SETTING)
    lines += ["", f"\\* within the seed noise: |FID - default| <= {default['fid']['std']:.2f}, the std of the default "
              f"sampler's FID over the seeds.", ""]  # fmt: skip
    return "\n".join(lines)


def plot_fid_vs_nfe(results: dict, path) -> None:
    """fid_vs_nfe.png: feature-FID (left) and solver error (right) against NFE per image, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.fileio import atomic_write

    families: dict[str, list[dict]] = {}
    for r in results["summary"]:
        parts = r["setting"].split(":")
        family = ":".join([parts[0], parts[1], *(p for p in parts[2:] if not p.isdigit())])
        families.setdefault(family, []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    default = next(r for r in results["summary"] if r["setting"] == DEFAULT_SETTING)
    m, sd = default["fid"]["mean"], default["fid"]["std"]
    ax1.axhspan(m - sd, m + sd, color="grey", alpha=0.2, label=f"{DEFAULT_SETTING} ± seed std")
    for i, (family, rows) in enumerate(sorted(families.items())):
        rows = sorted(rows, key=lambda r: r["nfe"]["mean"])
        x = [r["nfe"]["mean"] for r in rows]
        style = dict(marker="o" if len(rows) > 1 else "s", color=f"C{i % 10}", ls="-" if len(rows) > 1 else "none")
        ax1.errorbar(x, [r["fid"]["mean"] for r in rows], yerr=[r["fid"]["std"] for r in rows], label=family,
                     capsize=2, **style)  # fmt: skip
        if rows[0]["solver_rms_error"] is not None:
            ax2.plot(x, [max(r["solver_rms_error"]["mean"], 1e-5) for r in rows], label=family, **style)
    ax1.set_xscale("log"), ax2.set_xscale("log"), ax2.set_yscale("log")
    ax1.set_xlabel("model evaluations per image (NFE)"), ax2.set_xlabel("model evaluations per image (NFE)")
    ax1.set_ylabel("feature-FID (mean ± std over seeds)"), ax2.set_ylabel(f"RMS distance to {REFERENCE_SETTING}")
    ax1.set_title("feature-FID vs NFE (digits baseline models)"), ax2.set_title("solver error vs NFE")
    ax1.legend(fontsize=6, ncol=2), ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
