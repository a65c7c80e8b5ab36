"""loss_curve.png in the run folder: the losses and, below them, what the dispersive term sees (the diagnostics of
disploss.dispersive.dispersion_stats, averaged over the regularised or watched blocks), from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

_DIAGNOSTICS = (
    ("rms", "rms of the representations", "sqrt(mean z^2)"),
    ("unsaturated", "pairs the InfoNCE terms still pull apart", "share of pairs, exp(-d/tau) >= 0.01"),
    ("offdiag_weight", "off-diagonal share of exp(-d/tau)", "0 at the floor -log B"),
    ("effective_rank", "effective rank of the batch", "directions spanned"),
)
# Beside the losses: the distance InfoNCE-L2 divides by tau; with d / tau above ~4.6 for every pair, exp(-d/tau)
# vanishes and the term sits at its floor.
_DISTANCE = ("median_d", "median pairwise distance d = |z_i - z_j|^2 / M", "d (log scale)")


def _mean_over_blocks(row: dict, stat: str) -> float | None:
    values = [v for k, v in row.items() if k.startswith("diag/") and k.endswith("/" + stat) and isinstance(v, float)]
    return sum(values) / len(values) if values else None


def plot_run(run_dir: str | Path) -> Path | None:
    """Write {run_dir}/loss_curve.png from its metrics.jsonl; None when matplotlib is not installed or no step was
    logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from disploss.fileio import atomic_write

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "flow" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    lam = config.get("disp_weight", 0.0) if config.get("disp") else 0.0
    variant = config.get("disp_variant", "dispersive")
    diagnostics = [d for d in _DIAGNOSTICS if any(_mean_over_blocks(r, d[0]) is not None for r in rows)]
    distance = any(_mean_over_blocks(r, _DISTANCE[0]) is not None for r in rows)
    grid = diagnostics or distance
    fig, axes = plt.subplots(2 if grid else 1, 4 if grid else 3, figsize=(15, 6.4 if grid else 3.4),
                             squeeze=False)  # fmt: skip
    panels = [
        ("flow", "flow-matching loss", "mean squared error of the velocity", "C0"),
        ("disp", f"dispersive loss ({variant})", "loss value" if lam else "(off: no --disp)", "C2"),
        ("loss", f"total = flow + {lam:g} x dispersive", "loss value", "C1"),
    ]
    if config.get("objective") == "meanflow":  # the total is adaptively weighted: it does not add up from 'flow'
        panels[0] = ("flow", "MeanFlow error (unweighted)", "mean squared error to the target", "C0")
        weighted = "adaptively weighted MeanFlow loss"
        panels[2] = ("loss", f"total = {weighted} + {lam:g} x dispersive" if lam else f"total = {weighted}",
                     "||delta||^2 / (||delta||^2 + c)^p, mean", "C1")  # fmt: skip
    for ax, (key, title, ylabel, color) in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in rows], color=color)
        ax.set_xlabel("training step"), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    watched = "regularised" if config.get("disp") else "watched (not regularised)"
    if grid:
        for ax, spec in zip(axes[1], diagnostics):
            _plot_stat(ax, steps, rows, spec, watched)
        for ax in axes[1][len(diagnostics) :]:
            ax.axis("off")
        if distance:
            tau = config.get("disp_tau") if config.get("disp") and variant == "infonce_l2" else None
            _plot_distance(axes[0][3], steps, rows, watched, tau)
        else:
            axes[0][3].axis("off")
    fig.suptitle(f"{run_dir.name}: each point is one logging interval (losses) or its last step (diagnostics)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def _plot_stat(ax, steps: list[int], rows: list[dict], spec: tuple[str, str, str], watched: str) -> list[float]:
    """One diagnostic (its mean over the blocks) against the step, where it was logged; returns the values drawn."""
    stat, title, ylabel = spec
    points = [(s, v) for s, r in zip(steps, rows) if (v := _mean_over_blocks(r, stat)) is not None]
    values = [v for _, v in points]
    ax.plot([s for s, _ in points], values, color="C3")
    ax.set_xlabel("training step"), ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(f"{title}\n({watched} blocks, mean)", fontsize=9)
    ax.grid(alpha=0.3)
    return values


def _plot_distance(ax, steps: list[int], rows: list[dict], watched: str, tau: float | None) -> None:
    """The median pairwise distance against the step, on a log scale when positive; InfoNCE-L2's tau dashed."""
    values = _plot_stat(ax, steps, rows, _DISTANCE, watched)
    if tau is not None:
        ax.axhline(tau, color="gray", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
        ax.legend(fontsize=8)
    if all(v > 0 for v in values):
        ax.set_yscale("log")
