"""The training objective of a run, and the one place where the dispersive term joins the loss:

    loss_i = L_obj(x_i) + lambda * mean over the regularised layers l of L_disp(Z_l)        (the paper's eq. 1)

L_obj is the transport's flow-matching (or score / noise) loss, or MeanFlow's adaptively weighted loss
(disploss.meanflow). The DispersiveRegularizer's hooks capture the layers' outputs during the model's forward with
gradient; `regularizer.loss()` turns them into lambda * mean_l L_disp, the same scalar added to every sample's
loss, as the reference adds it. Neither the transport nor MeanFlow knows that the term exists.
"""

from __future__ import annotations

import torch

from disploss.meanflow import MeanFlowSettings
from disploss.regularizer import DispersiveRegularizer, compile_checkpointed_captures, unwrap_model
from disploss.training.config import TrainConfig, disp_blocks


class Objective:
    """(net, x, y) -> the loss terms of one batch.

    Args:
        transport: disploss.transport.Transport: the flow-matching loss (unused with `meanflow`).
        regularizer: a DispersiveRegularizer hooked on the model, or None.
        meanflow: MeanFlow's settings to train the average velocity instead (disploss.meanflow), or None.
    Returns (of a call):
        dict with 'loss' (B,) the total per sample; 'flow' (B,) the objective's unweighted error (flow matching:
        its loss; MeanFlow: the mean squared error to its target); 'disp' () the regulariser's unweighted value,
        the mean over its layers (0 without one); 'layers' {layer name: () its value}; 'pred' the model output.
    """

    def __init__(
        self, transport, regularizer: DispersiveRegularizer | None = None, meanflow: MeanFlowSettings | None = None
    ):
        self.transport, self.regularizer, self.meanflow = transport, regularizer, meanflow

    def __call__(self, net, x: torch.Tensor, y: torch.Tensor, **draws) -> dict:
        """`draws`: fixed t / noise (and MeanFlow's r / drop) instead of random ones (tests)."""
        if self.meanflow is None:
            terms = self.transport.training_losses(net, x, {"y": y}, **draws)
            terms["flow"] = terms["loss"]
        else:  # the JVP and guidance passes run on the unwrapped module, the pass with gradient through `net`
            from disploss.meanflow import meanflow_losses

            terms = meanflow_losses(net, x, y, self.meanflow, jvp_model=unwrap_model(net), **draws)
        terms["disp"], terms["layers"] = torch.zeros((), device=x.device), {}
        if self.regularizer is not None:
            terms["loss"] = terms["loss"] + self.regularizer.loss()
            terms["layers"] = dict(self.regularizer.last_values)
            terms["disp"] = torch.stack(list(terms["layers"].values())).mean()
        return terms


def build_objective(cfg: TrainConfig, transport, regularizer: DispersiveRegularizer | None) -> Objective:
    """The Objective of --objective (flow | meanflow) with the run's regulariser."""
    return Objective(transport, regularizer, cfg.meanflow if cfg.objective == "meanflow" else None)


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
