"""Print the headline numbers of `disploss bench --json` files as Markdown rows (stdlib only).

python3 benchmarks/summarize.py OUT/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, digits: int = 1, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{digits}f}%" if pct else f"{value:.{digits}f}"


def summarize(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    if "config" not in r and "train_vs_step" in r:  # gpu_check.sh's comparison of train.py with the bench
        t = r["train_vs_step"]
        return [f"### {path.name}: train.py end to end against the bench's step alone", "",
                f"train.py: {_f(t['train_images_per_sec'])} img/s (median of {t['intervals']} log intervals after the "
                f"first, steps {t['first_step']}-{t['last_step']}); bench step: {_f(t['step_images_per_sec'])} img/s; "
                f"ratio {_f(100 * t['ratio'], 1)}% (target: >= 95%)", ""]  # fmt: skip
    c, m = r["config"], r["meta"]
    where = (
        f"{m['device_name']}, torch {m['torch']}, {m['torch_threads']} thread(s), load {m.get('load_average_start')}"
    )
    model = f"{c['model']} {c['input_size']}x{c['input_size']}x{c['in_channels']} " if m.get("parameters") else ""
    setup = f"{model}{c['precision']}{' +compile' if c['compile'] else ''}"
    rows = [f"### {path.name}: {setup} ({where})", ""]
    if "train" in r:
        t = r["train"]
        rows += ["| variant | batch | ms/step (median) | ms/step (min) | img/s | peak mem GB | model TFLOP/s | MFU | MFU vs 790 |",
                 "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in t.items():
            if isinstance(v, dict) and "step_ms" in v:  # a timed variant
                rows.append(
                    f"| {name} | {t['batch']} | {_f(v['step_ms'])} | {_f(v['step_ms_min'])} | {_f(v['images_per_sec'])} "
                    f"| {_f(v['peak_mem_gb'], 2)} | {_f(v['model_tflops'], 3)} | {_f(v.get('mfu'), 1, True)} "
                    f"| {_f(v.get('mfu_vs_measured_790'), 1, True)} |"
                )
        rows.append("")
        if "disp_share_of_step" in t:
            rows.append(
                f"dispersive term: {_f(t['disp_share_of_step'], 1, True)} of the step (medians), "
                f"{_f(t['disp_share_of_step_min'], 1, True)} (minima), {_f(t['disp_term_share_of_step'], 1, True)} "
                f"(the loss alone, {_f(t['disp_term_ms'], 2)} ms); reference: {t['reference'].get('status')}"
            )
        for name, o in t.get("overhead", {}).items():
            rows.append(
                f"{name} / ours_nodisp step time ({o['blocks']} block(s)): {_f(o['ratio_paired'], 3)} per round "
                f"(quartiles {_f(o['ratio_paired_q1'], 3)}-{_f(o['ratio_paired_q3'], 3)}), {_f(o['ratio_medians'], 3)} "
                f"medians, {_f(o['ratio_minima'], 3)} minima; the loss alone {_f(o['loss_alone_share_of_step'], 1, True)}"
            )
        if "speedup_nodisp" in t["reference"]:
            ref = t["reference"]
            rows.append(
                f"reference/ours step time: {_f(ref['speedup_nodisp'], 2)}x without disp, {_f(ref['speedup_disp'], 2)}x "
                f"with (minima {_f(ref['speedup_nodisp_min'], 2)}x, {_f(ref['speedup_disp_min'], 2)}x); forward max "
                f"abs diff {ref['forward_max_abs_diff']:.2e}"
            )
        rows.append("")
    if "dispersive" in r:
        d = r["dispersive"]
        rows.append(
            f"dispersive loss alone, B={d['B']} M={d['M']} fwd+bwd: ours {_f(d['ours_ms'], 2)} ms (min "
            f"{_f(d['ours_ms_min'], 2)}), reference formula {_f(d['reference_ms'], 2)} ms (min {_f(d['reference_ms_min'], 2)}): "
            f"{_f(d['speedup'], 2)}x; |diff| {d['abs_diff']:.1e}"
        )
        rows.append("")
    if "sampling" in r:
        s = r["sampling"]
        rows += [f"sampling, batch {s['batch']} x {s['batches']}, {s['num_steps']} grid points, no guidance:", "",
                 "| sampler | img/s | NFE/image | ms/NFE | model TFLOP/s | MFU |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name in ("dopri5", "dopri5-batch", "euler", "heun2", "ab2", "ab3", "sde-euler"):
            if name in s:
                v = s[name]
                if "images_per_sec" not in v:
                    rows.append(f"| {name} | {v.get('status')} | | | | |")
                    continue
                rows.append(
                    f"| {name} | {_f(v['images_per_sec'], 2)} | {_f(v['nfe_per_image'], 0)} | {_f(v['ms_per_nfe'])} "
                    f"| {_f(v['model_tflops'], 3)} | {_f(v.get('mfu'), 1, True)} |"
                )
        rows.append("")
    if "paths" in r:
        rows += ["sampling code paths, interleaved (ratio to the first, the previous default):", "",
                 "| path | img/s | ratio | NFE/image |", "|---|---|---|---|"]  # fmt: skip
        for v in r["paths"]["variants"]:
            rows.append(f"| {v['name']} | {_f(v['images_per_sec'], 2)} | {_f(v['ratio_to_previous'], 2)}x "
                        f"| {_f(v['nfe_per_image'], 1)} |")  # fmt: skip
        rows.append("")
    if "profile" in r:
        p = r["profile"]
        shares = ", ".join(f"{k} {_f(v, 1, True)}" for k, v in p["shares"].items())
        rows += [f"profile ({p['time_key']}, {p['steps']} steps, {_f(p['ms_per_step_profiled'])} ms/step): {shares}", "",
                 "| op | share | ms/step | calls/step |", "|---|---|---|---|"]  # fmt: skip
        for t in p["top"][:15]:
            rows.append(f"| {t['name'][:80]} | {_f(t['share'], 1, True)} | {_f(t['ms_per_step'], 2)} | "
                        f"{_f(t['calls_per_step'], 0)} |")  # fmt: skip
        rows.append("")
    return rows


def main(argv: list[str]) -> int:
    for name in argv:
        try:
            print("\n".join(summarize(Path(name))))
        except (OSError, KeyError, ValueError) as err:
            print(f"{name}: cannot summarise: {type(err).__name__}: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
