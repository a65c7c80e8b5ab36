"""The MeanFlow training step in the benchmark's train section (`disploss bench --meanflow`): the very train_step
of `disploss train --objective meanflow`, timed in the same interleaved rounds as the flow step, on the same batch
and a MeanFlow SiT holding the flow model's weights (plus its r embedder: 2 linear layers)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def meanflow_variants(cfg, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device, opt) -> tuple[dict, dict]:
    """Steps 'ours_meanflow' and 'ours_meanflow_disp' (MeanFlow with the paper's defaults, without and with the
    dispersive term of `--disp`), and what to clean up.

    Args:
        cfg: the resolved BenchConfig; model: the flow model of the section (its weights are copied).
        x, y: the section's batch; opt: optimizer factory params -> optimizer (the section's AdamW choice).
    Returns:
        ({name: step function}, {"model": the MeanFlow SiT, "regularizer": its DispersiveRegularizer}).
    """
    from disploss.meanflow import MeanFlowSettings
    from disploss.models import create_model
    from disploss.training import TrainConfig
    from disploss.training.ema import EMA
    from disploss.training.objective import Objective, build_regularizer
    from disploss.training.step import StepOptions, train_step

    with device:
        mf = create_model(
            cfg.model, input_size=cfg.input_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes,
            meanflow=True,
        )  # fmt: skip
    mf.load_state_dict(model.state_dict(), strict=False)  # the same network; only r_embedder is its own
    mf.grad_checkpointing = cfg.grad_checkpointing
    mf.train()
    run_cfg = TrainConfig(disp=True, disp_weight=cfg.disp_weight, disp_tau=cfg.disp_tau, precision=cfg.precision)
    regularizer = build_regularizer(mf, run_cfg)
    net = torch.compile(mf) if cfg.compile else mf  # the pass with gradient; the JVP runs eagerly on `mf`
    optimizer, ema = opt(mf.parameters()), EMA(mf)
    options = StepOptions(precision=cfg.precision)

    def variant(disp: bool) -> Callable[[], None]:
        objective = Objective(None, regularizer if disp else None, meanflow=MeanFlowSettings())

        def step() -> None:
            regularizer.enabled = disp
            train_step(net, objective, optimizer, ema, x, y, options)

        return step

    return {"ours_meanflow": variant(False), "ours_meanflow_disp": variant(True)}, {
        "model": mf,
        "regularizer": regularizer,
    }


def saved_for_backward_gb(step: Callable[[], None], params) -> float:
    """GiB of the activations one call keeps for backward: the distinct storages autograd saves, parameters left
    out. Counted the same way on any device; the transient memory of passes without gradient is not in it."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values()) / 2**30


def summarise(out: dict, variants: dict, params: dict, log) -> dict:
    """The MeanFlow step against the flow step of the same round: time ratios (medians, minima) and the
    activations kept for backward of one step each.

    Args:
        out: the train section's per-variant results; variants: the step functions; params: {variant: parameters}.
    """
    flow, mf = out["ours_nodisp"], out["ours_meanflow"]
    summary = {
        "settings": "MeanFlowSettings() defaults: ratio 0.25 (JVP on a quarter of the batch), no guidance",
        "time_ratio": mf["step_ms"] / flow["step_ms"],
        "time_ratio_min": mf["step_ms_min"] / flow["step_ms_min"],
        "time_ratio_disp": out["ours_meanflow_disp"]["step_ms"] / out["ours_disp"]["step_ms"],
        "saved_for_backward_gb": {
            name: saved_for_backward_gb(variants[name], params[name]) for name in ("ours_nodisp", "ours_meanflow")
        },
    }
    saved = summary["saved_for_backward_gb"]
    log(f"  MeanFlow / flow step time: {summary['time_ratio']:.2f}x (medians), {summary['time_ratio_min']:.2f}x "
        f"(minima), {summary['time_ratio_disp']:.2f}x with the dispersive term; activations kept for backward "
        f"{saved['ours_meanflow']:.3f} vs {saved['ours_nodisp']:.3f} GiB")  # fmt: skip
    return summary
