"""Summaries and reports of the digits experiment: mean and std over seeds, paired differences against the
baseline, results.md, the FID-vs-steps plot and sample grids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from experiments.digits.config import METRICS

DIAG_STATS = ("rms", "unsaturated", "effective_rank")


def mean_std(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": int(len(arr))}


def summarise(arm_runs: list[dict], steps: list[int]) -> list[dict]:
    """Per step: mean and std over seeds (ddof 1; 0 for one seed) of every metric."""
    out = []
    for step in steps:
        rows = [c for run in arm_runs for c in run["checkpoints"] if c["step"] == step]
        if rows:
            out.append({"step": step, **{m: mean_std([r[m] for r in rows]) for m in METRICS}})
    return out


def paired_differences(base_runs: list[dict], arm_runs: list[dict], steps: list[int]) -> list[dict]:
    """Per step: arm minus baseline for the seeds both have (same seed: same initialisation and data order)."""
    base = {(r["seed"], c["step"]): c for r in base_runs for c in r["checkpoints"]}
    out = []
    for step in steps:
        pairs = [
            (c, base[(r["seed"], step)])
            for r in arm_runs
            for c in r["checkpoints"]
            if c["step"] == step and (r["seed"], step) in base
        ]
        if pairs:
            out.append({"step": step, **{m: mean_std([a[m] - b[m] for a, b in pairs]) for m in METRICS}})
    return out


def summarise_nfe(arm_runs: list[dict]) -> list[dict]:
    """Per sampler of the NFE sweep (--meanflow): mean and std over seeds of every metric, by model calls."""
    keys = sorted({(r["nfe"], r["sampler"]) for run in arm_runs for r in run.get("nfe", [])})
    out = []
    for nfe, sampler in keys:
        rows = [r for run in arm_runs for r in run.get("nfe", []) if (r["nfe"], r["sampler"]) == (nfe, sampler)]
        out.append({"sampler": sampler, "nfe": nfe, **{m: mean_std([r[m] for r in rows]) for m in METRICS}})
    return out


def fmt(stat: dict, digits: int = 2) -> str:
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
        f"{s.get('model', 'SiT-T/2')} at {s['image_size']}x{s['image_size']} px, {s['steps']} steps, batch {s['batch_size']}, "
        f"EMA {s['ema_decay']}, seeds {', '.join(map(str, s['seeds']))}. Samples: {s['num_samples']} per checkpoint "
        f"(class-balanced, fixed noise seed {s['noise_seed']}), Heun ODE with {s['sample_steps']} grid points, "
        f"cfg scale {s['cfg_scale']:g}, EMA weights. Features: penultimate layer of a digit CNN "
        f"(held-out accuracy {results['classifier']['holdout_accuracy']:.4f}); reference: {results['reference']['description']}.",
        "",
        f"Real train-split digits against the same reference (a floor): FID {results['reference']['floor']['fid']:.3f}, "
        f"precision {results['reference']['floor']['precision']:.3f}, recall {results['reference']['floor']['recall']:.3f}.",
        "",
        *(
            [
                "MeanFlow arms (`--objective meanflow`, the same budget of steps): sampled with 1 model call at every "
                "checkpoint, without guidance (its scale is folded into the training target); their final 'flow' "
                "loss is the mean squared error to the MeanFlow target.",
                "",
            ]
            if any(arm.get("objective") == "meanflow" for arm in arms.values())
            else []
        ),
        f"## At step {final} (mean ± std over seeds; std with ddof 1)",
        "",
        "| arm | recipe | feature-FID ↓ | Δ FID vs baseline | precision ↑ | recall ↑ | class accuracy ↑ | "
        "final flow loss | disp | rms | unsaturated | eff. rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        row = next((r for r in arm["summary"] if r["step"] == final), None)
        if row is None:
            continue
        flows = [r["final_flow_loss"] for r in arm["runs"] if r.get("final_flow_loss") is not None]
        flow = fmt(mean_std(flows), 4) if flows else "-"
        delta = next((fmt(r["fid"]) for r in arm.get("paired_vs_baseline", []) if r["step"] == final), "-")
        disp = [r["final_disp_loss"] for r in arm["runs"] if arm["disp"] and r.get("final_disp_loss") is not None]
        diag = {k: [r["final_diag"][k] for r in arm["runs"] if k in r.get("final_diag", {})] for k in DIAG_STATS}
        cells = [fmt(mean_std(v), 3) if v else "-" for v in diag.values()]
        lines.append(
            f"| {name} | {arm['recipe']} | {fmt(row['fid'])} | {delta} | {fmt(row['precision'], 3)} | "
            f"{fmt(row['recall'], 3)} | {fmt(row['class_accuracy'], 3)} | {flow} | "
            f"{fmt(mean_std(disp), 3) if disp else '-'} | {' | '.join(cells)} |"
        )
    lines += [
        "",
        "Δ FID: the arm minus the baseline of the same seed (same initialisation and data order), mean ± std over "
        "seeds; negative is better. disp: the final dispersive value (InfoNCE-L2 lies in [-log B, 0]). rms, "
        "unsaturated, eff. rank: disploss.dispersive.dispersion_stats of the regularised blocks at the last step "
        "(for the baseline, of the last block, which it does not regularise): the representations' scale, the share "
        "of pairs the InfoNCE terms still pull apart, and how many directions the batch spans.",
    ]
    lines += ["", "## feature-FID by step (mean ± std over seeds)", ""]
    names = list(arms)
    lines += ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in s["eval_steps"]:
        cells = []
        for name in names:
            row = next((r for r in arms[name]["summary"] if r["step"] == step), None)
            cells.append(fmt(row["fid"]) if row else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    if any("nfe_summary" in arm for arm in arms.values()):
        lines += [
            "",
            f"## feature-FID against model calls per image, step {final} (mean ± std over seeds)",
            "",
            "Flow arms: Euler with 1, 2, 4, 8 calls and Heun with 20; MeanFlow arms: 1 and 2 equal steps.",
            "",
            "| arm | sampler | model calls | feature-FID ↓ | precision ↑ | recall ↑ | class accuracy ↑ |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, arm in arms.items():
            for row in arm.get("nfe_summary", []):
                lines.append(
                    f"| {name} | {row['sampler']} | {row['nfe']} | {fmt(row['fid'])} | {fmt(row['precision'], 3)} | "
                    f"{fmt(row['recall'], 3)} | {fmt(row['class_accuracy'], 3)} |"
                )
    others = [n for n in names if arms[n]["paired_vs_baseline"]]
    if others:
        lines += [
            "",
            "## Paired differences, arm minus baseline, same seed (mean ± std over seeds)",
            "",
            "Negative FID difference = the arm is better."
            + (
                " The MeanFlow arm with the dispersive term is paired with the MeanFlow arm."
                if any(arms[n].get("paired_with") for n in others)
                else ""
            ),  # fmt: skip
            "",
            "| arm | step | Δ FID | Δ precision | Δ recall | Δ class accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for name in others:
            for row in arms[name]["paired_vs_baseline"]:
                lines.append(
                    f"| {name} | {row['step']} | {fmt(row['fid'])} | {fmt(row['precision'], 3)} | "
                    f"{fmt(row['recall'], 3)} | {fmt(row['class_accuracy'], 3)} |"
                )
    lines += [
        "",
        "## Per seed",
        "",
        "| arm | seed | step | feature-FID | precision | recall | class accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        for run in arm["runs"]:
            for c in run["checkpoints"]:
                lines.append(
                    f"| {name} | {run['seed']} | {c['step']} | {c['fid']:.3f} | {c['precision']:.3f} | "
                    f"{c['recall']:.3f} | {c['class_accuracy']:.3f} |"
                )
    lines += [
        "",
        "## Time",
        "",
        "| arm | seed | train wall s | train CPU s | sampling wall s | sampling CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        for run in arm["runs"]:
            lines.append(
                f"| {name} | {run['seed']} | {run['train_wall_s']:.0f} | {run['train_cpu_s']:.0f} | "
                f"{run['sample_wall_s']:.0f} | {run['sample_cpu_s']:.0f} |"
            )
    t = results["timing"]
    lines += [
        "",
        f"This invocation: {t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU (the process, all threads, "
        f"{t['torch_threads']} torch thread(s)); training and sampling of the runs as recorded when they were "
        f"done: {t['runs_wall_s']:.0f} s wall, {t['runs_cpu_s']:.0f} s CPU. {t['cpu_count']} CPU cores shared "
        f"with other jobs (load average {t['loadavg_start'][0]:.1f} at the start, {t['loadavg_end'][0]:.1f} at "
        "the end): timings are noisy.",
        "",
    ]
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
            ax1.plot(
                [c["step"] for c in run["checkpoints"]],
                [c["fid"] for c in run["checkpoints"]],
                color=color,
                alpha=0.25,
                lw=0.8,
            )
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


def plot_fid_vs_nfe(results: dict, path: str | os.PathLike) -> None:
    """fid_vs_nfe.png: feature-FID of the final checkpoints against model calls per image, one line per arm and
    sampler, mean with a +-1 std band over seeds (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from disploss.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, arm) in enumerate(results["arms"].items()):
        rows = arm.get("nfe_summary", [])
        for k, sampler in enumerate(sorted({r["sampler"] for r in rows})):
            pts = [r for r in rows if r["sampler"] == sampler]
            nfe = np.array([r["nfe"] for r in pts])
            mean, std = (np.array([r["fid"][s] for r in pts]) for s in ("mean", "std"))
            ax.plot(nfe, mean, color=f"C{i % 10}", marker="os^"[k % 3], ls="-" if k == 0 else "--",
                    label=f"{name}, {sampler} (n={pts[0]['fid']['n']})")  # fmt: skip
            ax.fill_between(nfe, np.maximum(mean - std, 1e-3), mean + std, color=f"C{i % 10}", alpha=0.15)
    ax.axhline(results["reference"]["floor"]["fid"], color="grey", ls=":", lw=1, label="real train split")
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    ax.set_xlabel("model calls per image (NFE)"), ax.set_ylabel("feature-FID (log scale)")
    ax.set_title(f"final checkpoints (step {max(results['settings']['eval_steps'])})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 10, zoom: int = 4) -> None:
    """A row per digit, `per_class` samples a row, each pixel drawn as zoom x zoom (8 px digits are tiny)."""
    from disploss.imageio import save_grid

    rows = [images[labels == c] for c in range(10)]
    per_class = min(per_class, *(len(r) for r in rows))
    grid = np.concatenate([r[:per_class] for r in rows])  # (10 * per_class) H W C
    save_grid(grid.repeat(zoom, axis=1).repeat(zoom, axis=2), path, nrow=per_class)
