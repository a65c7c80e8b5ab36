"""The reference code's model, loss, optimizer and EMA as training steps, timed beside ours (--reference-path)."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch


def reference_training(cfg, model, x, y, device, autocast) -> dict:
    """The reference's model (its models.py) with the reference's loss, optimizer and EMA, as training steps.

    Returns {'status', 'forward_max_abs_diff', 'steps': {'reference_nodisp': fn, 'reference_disp': fn}} or,
    when the reference cannot be loaded, {'status': why}.
    """
    from disploss.dispersive import reference_infonce_l2

    module, why = load_reference_models(cfg.reference_path)
    if module is None:
        return {"status": why}
    if cfg.model not in getattr(module, "SiT_models", {}):
        return {
            "status": f"the reference has no {cfg.model}; its models: {', '.join(getattr(module, 'SiT_models', {}))}"
        }
    ref = module.SiT_models[cfg.model](
        input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes
    )
    ref.load_state_dict(model.state_dict(), strict=True)  # same key names: the same network, so the same work
    ref = ref.to(device)
    # Sanity: the two implementations compute the same function (eval mode: no label dropout).
    model.eval()
    ref.eval()
    with torch.no_grad():
        t = torch.rand(len(x), device=device)
        diff = (model(x, t, y) - ref(x, t, y)).abs().max().item()
    model.train()
    ref.train()
    # The reference's train.py: AdamW(lr=1e-4, weight_decay=0) with torch's default implementation, the EMA
    # as a loop of mul_/add_ over named parameters, t drawn on the CPU, flow loss + 0.25 * disp_loss(act[-1]).
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0)
    ema = copy.deepcopy(ref).requires_grad_(False)
    ema_params, ref_params = dict(ema.named_parameters()), dict(ref.named_parameters())
    net = torch.compile(ref) if cfg.compile else ref
    takes_return_act = "return_act" in inspect.signature(ref.forward).parameters
    captured: list[torch.Tensor] = []
    if not takes_return_act:  # willisma/SiT itself: capture the last block's output with a hook
        ref.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))

    def step_fn(disp: bool) -> Callable[[], None]:
        def step() -> None:
            x0 = torch.randn_like(x)
            t = torch.rand((x.shape[0],)).to(x)
            te = t.view(-1, 1, 1, 1)
            xt, ut = te * x + (1 - te) * x0, x - x0
            captured.clear()
            with autocast:
                if disp and takes_return_act:
                    out, act = net(xt, t, y, return_act=True)
                    z = act[-1]
                else:
                    out = net(xt, t, y)
                    z = captured[-1] if captured else None
                loss = ((out.float() - ut) ** 2).mean(dim=(1, 2, 3))
                if disp:
                    loss = loss + 0.25 * reference_infonce_l2(z)
            loss = loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for name, p in ref_params.items():
                    ema_params[name].mul_(0.9999).add_(p.data, alpha=1 - 0.9999)

        return step

    return {
        "status": "ok",
        "path": str(Path(cfg.reference_path).resolve()),
        "forward_max_abs_diff": diff,
        "steps": {"reference_nodisp": step_fn(False), "reference_disp": step_fn(True)},
    }


def load_reference_models(path: str | os.PathLike):
    """Import DIR/models.py of the reference under a private name. Returns (module, None) or (None, why)."""
    file = Path(path) / "models.py"
    if not file.is_file():
        return None, f"{file} does not exist: --reference-path must be a checkout of the SiT / DispLoss code"
    spec = importlib.util.spec_from_file_location("_disploss_bench_reference_models", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        return None, (
            f"the reference model needs {err.name!r}, which is not installed (its models.py imports timm's "
            "PatchEmbed/Attention/Mlp); install it to time the reference model; the reference loss formula "
            "is timed in the disp section regardless"
        )
    return module, None
