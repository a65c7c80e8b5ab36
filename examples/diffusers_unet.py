"""Dispersive loss on a diffusers UNet: DDPM on the bundled digits, with and without the regulariser.

    python examples/diffusers_unet.py --layers "down_blocks.*,mid_block" --steps 800 --out results/diffusers_unet

Two copies of one small diffusers UNet2DModel (same initial weights, batches, timesteps and noise) learn epsilon
prediction with diffusers' DDPMScheduler: the arm "baseline" on the MSE alone, the arm "disp" on the MSE plus the
dispersive term of disploss.DispersiveRegularizer on --layers. The arms step in turn, so that their step times
compare on a shared machine. Each then samples the same starting noise with diffusers' DDIMScheduler and writes
OUT/<arm>/samples.png; OUT/summary.json holds the logged losses, the dispersive value of each layer, the
diagnostics (disploss.dispersion_stats) and the step times.

It uses only the public API (`from disploss import DispersiveRegularizer`), the bundled digits and the PNG writer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from disploss import DispersiveRegularizer
from disploss.data import digits_arrays
from disploss.imageio import save_grid, to_uint8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    layers_help = "comma list of module names of the UNet (model.named_modules()); '*' is one name component"
    p.add_argument("--layers", default="down_blocks.*,mid_block", help=layers_help)
    p.add_argument("--weight", type=float, default=0.25, help="lambda of the dispersive term")
    p.add_argument("--tau", type=float, default=1.0, help="temperature")
    p.add_argument("--variant", default="infonce_l2", help="infonce_l2, infonce_cosine, hinge or covariance")
    p.add_argument("--steps", type=int, default=800, help="optimiser steps per arm")
    p.add_argument("--batch", type=int, default=32, help="batch size (at least 2: the term compares samples)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--num-samples", type=int, default=64, help="images in each grid")
    p.add_argument("--log-every", type=int, default=100, help="log (and compute the diagnostics) every N steps")
    p.add_argument("--out", default="results/diffusers_unet", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and noise")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch (1 is steadiest on a shared machine)")
    return p.parse_args(argv)


def make_unet() -> UNet2DModel:
    """A 1.1M-parameter UNet for 16x16 grey images: 16 -> 8 -> 4, attention at 4x4."""
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
    )  # fmt: skip


def train_step(arm: dict, noisy: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, log: bool) -> dict:
    """One AdamW step of an arm on (B, 1, 16, 16) noisy images; returns its terms as floats at log steps."""
    model, opt, reg = arm["model"], arm["opt"], arm["reg"]
    start = time.perf_counter()
    reg.enabled = arm["train"] or log  # the baseline's regulariser only measures, at log steps
    if log:
        reg.request_diagnostics()  # a few B x B matrices more, at log steps only
    mse = F.mse_loss(model(noisy, t).sample, noise)  # the hooks capture --layers during this forward
    loss = mse + reg.loss() if arm["train"] else mse  # + weight * mean over the layers of the dispersive loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    arm["step_s"].append(time.perf_counter() - start)
    arm["mse"].append(mse.item())
    if not log:
        return {}
    if not arm["train"]:
        with torch.no_grad():
            reg.loss()  # the same term on the baseline's layers: measured (after the timing), not trained on
    terms = {"mse": statistics.mean(arm["mse"]), "disp": statistics.mean(v.item() for v in reg.last_values.values())}
    arm["mse"].clear()
    terms.update({f"disp/{k}": v.item() for k, v in reg.last_values.items()})  # unweighted, per layer
    for layer, stats in reg.last_diagnostics.items():
        terms.update({f"diag/{layer}/{k}": v.item() for k, v in stats.items()})
    return terms


@torch.no_grad()
def sample(model: UNet2DModel, ddpm: DDPMScheduler, n: int, steps: int, seed: int) -> torch.Tensor:
    """DDIM (eta 0) from the same Gaussian noise for every arm; returns (n, 1, 16, 16) in [-1, 1]."""
    ddim = DDIMScheduler.from_config(ddpm.config)
    ddim.set_timesteps(steps)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    model.eval()  # eval mode: the regulariser's hooks capture nothing
    for t in ddim.timesteps:
        x = ddim.step(model(x, t).sample, t, x).prev_sample
    model.train()
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    images, _ = digits_arrays(image_size=16, channels=1)  # uint8 (N, 16, 16, 1), white digits on black
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, 16, 16) in [-1, 1]
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")

    torch.manual_seed(args.seed)
    base = make_unet().train()
    arms = {}
    for name in ("baseline", "disp"):
        model = copy.deepcopy(base)  # both arms start from the same weights
        reg = DispersiveRegularizer(model, layers=args.layers.split(","), weight=args.weight, tau=args.tau,
                                    variant=args.variant)  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        arms[name] = {"model": model, "opt": opt, "reg": reg, "train": name == "disp", "step_s": [], "mse": [],
                      "log": []}  # fmt: skip
    layers = arms["disp"]["reg"].layer_names
    print(f"regularising {', '.join(layers)} (diagnostics of {layers[-1]} below); the InfoNCE-L2 floor is -log B = "
          f"{-math.log(args.batch):.3f}")  # fmt: skip

    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):
        x0 = data[torch.randint(len(data), (args.batch,), generator=gen)]  # (B, 1, 16, 16)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(ddpm.config.num_train_timesteps, (args.batch,), generator=gen)
        noisy = ddpm.add_noise(x0, noise, t)
        log = step % args.log_every == 0 or step == args.steps
        order = list(arms) if step % 2 else list(arms)[::-1]  # alternate which arm goes first
        terms = {name: train_step(arms[name], noisy, t, noise, log) for name in order}
        if log:
            line = f"step {step:5d}"
            for name, arm in arms.items():
                arm["log"].append({"step": step, **terms[name]})
                diag = [terms[name][f"diag/{layers[-1]}/{k}"] for k in ("unsaturated", "offdiag_weight", "rms")]
                line += (f" | {name}: mse {terms[name]['mse']:.4f} disp {terms[name]['disp']:.3f} "
                         "(unsaturated {:.2f} offdiag_weight {:.3f} rms {:.2f})".format(*diag))  # fmt: skip
            print(line, flush=True)

    summary = {"args": vars(args), "layers": layers, "arms": {}}
    for name, arm in arms.items():
        x = sample(arm["model"], ddpm, args.num_samples, args.sample_steps, args.seed + 2)
        save_grid(to_uint8(x), out / name / "samples.png", nrow=8, zoom=2)
        step_ms = [1e3 * s for s in arm["step_s"]]
        summary["arms"][name] = {"log": arm["log"], "step_ms_median": statistics.median(step_ms),
                                 "step_ms_min": min(step_ms), "step_ms_all": step_ms}  # fmt: skip
    base_ms = summary["arms"]["baseline"]["step_ms_all"]
    disp_ms = summary["arms"]["disp"]["step_ms_all"]
    summary["step_time_ratio"] = {  # disp / baseline: medians, minima, and the median of the per-step ratios
        "medians": statistics.median(disp_ms) / statistics.median(base_ms),
        "minima": min(disp_ms) / min(base_ms),
        "paired": statistics.median(d / b for d, b in zip(disp_ms, base_ms)),
    }
    for arm in arms.values():
        arm["reg"].remove()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    r = summary["step_time_ratio"]
    print(f"wrote {out}/baseline/samples.png, {out}/disp/samples.png, {out}/summary.json; step time disp/baseline "
          f"{r['medians']:.3f} (medians), {r['minima']:.3f} (minima), {r['paired']:.3f} (paired)")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
