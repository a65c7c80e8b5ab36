"""The training objective of a run: the transport's flow-matching (or score / noise) loss, or MeanFlow's
(disploss.meanflow), plus the dispersive term of a DispersiveRegularizer hooked on the chosen SiT blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from disploss.regularizer import DispersiveRegularizer, compile_checkpointed_captures
from disploss.training.config import TrainConfig, disp_blocks


def build_regularizer(model: torch.nn.Module, cfg: TrainConfig) -> DispersiveRegularizer | None:
    """The regulariser of --disp on the blocks of --disp-block (None without --disp). Build it on the unwrapped
    model before DDP / torch.compile wrap it: the hooks then fire whichever wrapper calls the blocks. With --compile
    and --grad-checkpointing it also lets dynamo trace the captures inside the checkpointed blocks (see
    disploss.regularizer.compile_checkpointed_captures)."""
    if not cfg.disp:
        return None
    if cfg.compile and cfg.grad_checkpointing:
        compile_checkpointed_captures()  # else a graph break at every checkpointed block
    blocks = disp_blocks(cfg.disp_block, len(model.blocks), cfg.model)
    return DispersiveRegularizer(
        model, layers=[f"blocks.{i}" for i in blocks], weight=cfg.disp_weight, tau=cfg.disp_tau,
        variant=cfg.disp_variant, margin=cfg.disp_margin, gather=cfg.disp_gather,
    )  # fmt: skip


def build_objective(cfg: TrainConfig, transport, regularizer: DispersiveRegularizer | None) -> Callable:
    """The objective of --objective: flow_objective or meanflow_objective."""
    if cfg.objective == "meanflow":
        return meanflow_objective(cfg.meanflow, regularizer)
    return flow_objective(transport, regularizer)


def flow_objective(transport, regularizer: DispersiveRegularizer | None) -> Callable:
    """(net, x, y) -> terms: 'loss' (B,), 'flow' (B,), 'disp' () and 'layers' {layer: dispersive value}."""

    def objective(net, x, y):
        terms = transport.training_losses(net, x, dict(y=y), regularizer=regularizer)
        terms["layers"] = dict(regularizer.last_values) if regularizer is not None else {}
        return terms

    return objective


def meanflow_objective(settings, regularizer: DispersiveRegularizer | None) -> Callable:
    """(net, x, y) -> terms as flow_objective's, of MeanFlow (disploss.meanflow.meanflow_losses): 'loss' (B,) the
    adaptively weighted MeanFlow loss plus the regulariser's term, 'flow' (B,) the mean squared error to the MeanFlow
    target. The JVP (and guidance) passes run without gradient on the module under DDP / torch.compile; the pass
    with gradient, the one the regulariser's hooks capture, runs through `net`."""
    from disploss.meanflow import meanflow_losses
    from disploss.regularizer import unwrap_model

    def objective(net, x, y):
        terms = meanflow_losses(net, x, y, settings, jvp_model=unwrap_model(net))
        terms["disp"] = torch.zeros((), device=x.device)
        terms["layers"] = {}
        if regularizer is not None:
            terms["loss"] = terms["loss"] + regularizer.loss()
            terms["layers"] = dict(regularizer.last_values)
            terms["disp"] = torch.stack(list(terms["layers"].values())).mean()  # the unweighted dispersive value
        return terms

    return objective


class DispersionWatch:
    """What the dispersive term sees, logged at log steps for any run: the regularised blocks' dispersion_stats,
    or without --disp those of the blocks --disp-block names (watched by a weight-0 regulariser that captures only
    during log steps and never computes the loss)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, regularizer: DispersiveRegularizer | None):
        self.regularizer = regularizer
        self.monitor = None
        if regularizer is None:
            blocks = disp_blocks(cfg.disp_block, len(model.blocks), cfg.model)
            self.monitor = DispersiveRegularizer(
                model, layers=[f"blocks.{i}" for i in blocks], weight=0.0, tau=cfg.disp_tau
            )
            self.monitor.enabled = False

    def before_step(self, log_step: bool) -> None:
        """Arm the capture for a step whose metrics are logged."""
        if not log_step:
            return
        if self.regularizer is not None:
            self.regularizer.request_diagnostics()
        else:
            self.monitor.enabled = True

    def collect(self) -> dict[str, torch.Tensor]:
        """{'diag/blocks.5/rms': 0-d tensor, ...} of the last armed step ({} when none)."""
        if self.regularizer is not None:
            stats, self.regularizer.last_diagnostics = self.regularizer.last_diagnostics, {}
        else:
            stats = self.monitor.stats()
            self.monitor.enabled = False
        return {f"diag/{layer}/{k}": v for layer, values in stats.items() for k, v in values.items()}
