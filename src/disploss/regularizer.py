"""DispersiveRegularizer: dispersive loss on the outputs of any layers of any PyTorch model, through forward hooks.

    reg = DispersiveRegularizer(model, layers=["down_blocks.*", "mid_block"], weight=0.25, tau=1.0)
    out = model(x, t)                  # the hooks capture the chosen layers' outputs (training mode, grad on)
    loss = mse + reg.loss()            # weight * mean over the captured layers of dispersive_loss(z)
    reg.remove()                       # detach every hook

Layer names are those of `model.named_modules()`; in a pattern `*` stands for exactly one dotted name component
(`blocks.*` is every SiT block, `down_blocks.*` each diffusers down block, not their children), and "all" is every
child of the model's first ModuleList (SiT: its blocks). A DDP- or torch.compile-wrapped model is unwrapped to
name its layers; the hooks sit on the wrapped module, so they fire whichever wrapper calls it. Under torch.compile,
build the regulariser before the compiled model first runs: dynamo does not trace hooks added later (loss() then
finds nothing captured and says so).

What is captured: a tensor output as is; of a tuple or list, its first tensor; of a dict or a diffusers BaseOutput,
its first tensor value; flattened per sample to (B, M). Nothing is captured (and nothing kept) when the hooked
module is in eval mode, when gradients are off (torch.no_grad, inference), or when activation checkpointing
recomputes the forward inside backward: a checkpointed layer contributes its first forward only. Inside a
*reentrant* checkpoint (use_reentrant=True) the first forward runs without gradients, so such a layer is not
captured at all: `loss()` warns (once) naming the layers that captured nothing.

A capture belongs to one forward, one call of the model given (unwrapped: the module that DDP or torch.compile
calls). A forward that would capture (training mode, gradients on) starts clean: the captures of an earlier forward
that no `loss()` consumed are dropped, so a loop that runs the model in training mode without `loss()` (an eval loop
that forgot `model.eval()`) keeps one forward's captures, never more; forwards without gradient (torch.no_grad,
MeanFlow's JVP and guidance passes) leave them alone, before or after the pass with gradient. A forward that raises
drops its captures at once (with torch.compile: when the next forward starts), so neither its partial term nor its
graph survives it. A layer that runs k times in one forward (a shared block) is one term: the mean of its k values
(`last_values` holds that mean), so `loss()` stays weight * mean over the layers. Captures are not copied: a layer
output changed in place after its hook (`x += ...`, an in-place activation) would regularise a value the layer did
not output, so `loss()` refuses it, naming the layer (the tensor's version counter, checked for free; not under
torch.compile, which does not trace it: there such a change is regularised unchecked).
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from disploss.dispersive import check_variant, dispersion_stats, dispersive_loss
from disploss.errors import ConfigError

__all__ = ["DispersiveRegularizer", "compile_checkpointed_captures", "resolve_layers", "unwrap_model"]

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule")
_WRAPPER_ATTRS = ("module", "_orig_mod")  # where DDP / DataParallel and torch.compile's OptimizedModule keep it


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (the model itself when not wrapped)."""
    while type(model).__name__ in _WRAPPERS:
        model = next(getattr(model, a) for a in _WRAPPER_ATTRS if isinstance(getattr(model, a, None), nn.Module))
    return model


def _all_layers(names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    # "all": the children of the first ModuleList (SiT's blocks, a diffusers DiT's transformer_blocks); ambiguous
    # otherwise (a timm ViT keeps its blocks in an nn.Sequential: name them, blocks.*).
    for name in names:
        if name and isinstance(modules[name], nn.ModuleList):
            return [f"{name}.{k}" for k, _ in modules[name].named_children()]
    raise ConfigError(
        "layers='all' needs a model with a ModuleList of blocks (as SiT's `blocks`); name the layers instead, "
        f"e.g. {', '.join(_top_names(names)[:6])}"
    )


def _top_names(names: list[str]) -> list[str]:
    return [n for n in names if n and "." not in n]


def _nearest(pattern: str, names: list[str], k: int = 6) -> list[str]:
    import difflib

    close = difflib.get_close_matches(pattern, [n for n in names if n], n=k, cutoff=0.4)
    return close or _top_names(names)[:k]


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Module names matched by `layers` (patterns where `*` is one dotted component, or "all"), in model order.

    Raises:
        ConfigError: a pattern matches nothing (the message lists the nearest real names), or no layers at all.
    """
    modules = dict(unwrap_model(model).named_modules())
    names = list(modules)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ConfigError("layers: give at least one layer name or pattern")
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"layers: {pattern!r} is not a layer name or pattern")
        if pattern == "all":
            found = _all_layers(names, modules)
        else:
            regex = re.compile("^" + r"[^.]+".join(re.escape(p) for p in pattern.split("*")) + "$")
            found = [n for n in names if n and regex.match(n)]
        if not found:
            raise ConfigError(
                f"layers: {pattern!r} matches no module of {type(unwrap_model(model)).__name__}; nearest names: "
                f"{', '.join(_nearest(pattern, names))}"
            )
        chosen += [n for n in found if n not in chosen]
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # dicts and diffusers' BaseOutput (an OrderedDict)
        values = list(output.values())
    elif isinstance(output, Sequence) and not isinstance(output, str):
        values = list(output)
    else:
        return None
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def compile_checkpointed_captures() -> bool:
    """Let torch.compile trace the capture hooks inside activation-checkpointed layers without graph breaks.

    A capture is a side effect of the forward; inside torch.utils.checkpoint dynamo refuses to trace one (a graph
    break at every checkpointed block: SiT-S/2 with all blocks hooked compiles to 5 graphs) unless told not to replay
    it when backward recomputes the forward, which is what the hooks do in eager mode anyway. This sets
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint, for the whole process.

    Returns:
        False when this torch has no such setting (nothing changed), else True.
    """
    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return False
    config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return True


def _world_size() -> int:
    from disploss.distributed import get_world_size

    return get_world_size()


def _in_backward() -> bool:
    # Activation checkpointing recomputes a forward inside backward; that forward must not capture a second time.
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _mean_stats(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # dispersion_stats of a layer's calls in one forward, averaged stat by stat (one call: as is).
    if len(stats) == 1:
        return stats[0]
    return {k: torch.stack([s[k].float() for s in stats]).mean() for k in stats[0]}


class DispersiveRegularizer:
    """Dispersive loss on chosen layers of a model, captured by forward hooks.

    Args:
        model: any nn.Module (DDP- or compile-wrapped ones are unwrapped to name layers).
        layers: a name or pattern, or a list of them (see the module docstring), or "all".
        weight: lambda; `loss()` returns weight * mean over the captured layers of dispersive_loss(z).
        tau, variant, margin, gather: as disploss.dispersive_loss. With gather=True the term is computed over the
            global batch and its gradient scaled by the world size, so that DDP's gradient averaging yields
            weight * dL_global / dtheta.
    Attributes:
        layer_names: the resolved module names, in model order.
        last_values: {layer name: detached dispersive value} of the last `loss()` call: the layer's term (the mean
            over its calls, for a layer that ran more than once in the forward).
        last_diagnostics: {layer name: {stat: 0-d tensor}} (disploss.dispersive.dispersion_stats) of the last
            `loss()` call after `request_diagnostics()`.
        enabled: False makes the hooks capture nothing (the regulariser stays attached).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "all",
        weight: float = 0.25,
        tau: float = 1.0,
        variant: str = "infonce_l2",
        margin: float = 1.0,
        gather: bool = False,
    ):
        check_variant(variant)
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"weight must be a finite number >= 0, got {weight}")
        if not tau > 0 or not math.isfinite(tau):
            raise ConfigError(f"tau must be positive, got {tau}")
        self.weight, self.tau, self.variant, self.margin, self.gather = (
            float(weight),
            float(tau),
            variant,
            margin,
            gather,
        )
        self.enabled = True
        self.layer_names = resolve_layers(model, layers)
        self.last_values: dict[str, torch.Tensor] = {}
        self.last_diagnostics: dict[str, dict[str, torch.Tensor]] = {}
        self._captured: list[tuple[str, torch.Tensor]] = []  # (layer, output) of the current forward, in call order
        self._versions: list[int | None] = []  # each output's version counter when captured (None under compile)
        self._diagnose = False
        self._warned_missing = False
        root = unwrap_model(model)
        modules = dict(root.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layer_names]
        # One forward of the root bounds the captures: it starts clean, and a forward that raises drops its own.
        self._handles.append(root.register_forward_pre_hook(self._start_forward))
        self._handles.append(root.register_forward_hook(self._end_forward, always_call=True))

    # -- capture ------------------------------------------------------------------------------------------------
    def _captures_now(self, module: nn.Module) -> bool:
        # Whether a forward of `module` now is one that captures: enabled, training mode, gradients on, and not the
        # recomputation of activation checkpointing inside backward.
        if not self.enabled or not module.training or not torch.is_grad_enabled():
            return False
        return torch.compiler.is_compiling() or not _in_backward()

    def _start_forward(self, module: nn.Module, args) -> None:
        if self._captures_now(module) and self._captured:  # captures no loss() consumed: of an earlier forward
            self._captured, self._versions = [], []

    def _end_forward(self, module: nn.Module, args, output) -> None:
        # always_call: torch calls this with output None when the forward raised (never under torch.compile, whose
        # next forward starts clean instead); the failed forward's captures, and the graph they hold, go now.
        if output is None and sys.exc_info()[1] is not None:
            self._captured, self._versions = [], []

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if not self._captures_now(module):
                return
            z = _first_tensor(output)
            if z is None:
                raise ConfigError(
                    f"layer {name!r} returned {type(output).__name__}, which holds no tensor to regularise; choose "
                    "another layer"
                )
            if z.dim() < 2:
                raise ConfigError(f"layer {name!r} returned a tensor of shape {tuple(z.shape)}; need (B, ...)")
            self._captured.append((name, z))
            self._versions.append(None if torch.compiler.is_compiling() else z._version)

        return hook

    def _take(self) -> list[tuple[str, list[torch.Tensor]]]:
        """The current forward's captures, grouped by layer in model order, and cleared; an output changed in place
        since its capture is refused."""
        captured, versions = self._captured, self._versions
        self._captured, self._versions = [], []
        grouped: dict[str, list[torch.Tensor]] = {}
        for (name, z), version in zip(captured, versions):
            if version is not None and z._version != version:
                raise ConfigError(
                    f"DispersiveRegularizer: the output of layer {name!r} was changed in place after its hook captured "
                    "it (an in-place op such as `x += ...` or ReLU(inplace=True) on it), so the term would regularise "
                    "a value the layer did not output; make that op out of place, or regularise a layer after it"
                )
            grouped.setdefault(name, []).append(z)
        return [(name, grouped[name]) for name in self.layer_names if name in grouped]

    # -- the loss -----------------------------------------------------------------------------------------------
    def loss(self) -> torch.Tensor:
        """weight * mean over the layers captured in the last forward of dispersive_loss(z) (a layer that ran k
        times: the mean of its k values); clears the captures.

        Returns:
            A 0-d float32 tensor (float64 for float64 activations) that carries the gradient.
        Raises:
            RuntimeError: nothing was captured since the last call (the model was not run in training mode with
                gradients, or its hooked layers were not called, or that forward raised).
            ConfigError: a captured output was changed in place after its hook (naming the layer).
        """
        captured = self._take()
        if not captured:
            raise RuntimeError(
                f"DispersiveRegularizer: nothing captured from {', '.join(self.layer_names)} since the last loss(); "
                "run the model in training mode with gradients enabled before calling loss() (with torch.compile, "
                "build the regulariser before the compiled model first runs: hooks added later are not traced)"
            )
        missing = [name for name in self.layer_names if name not in {n for n, _ in captured}]
        if missing and not self._warned_missing:
            self._warned_missing = True  # once: a layer left out of every forward would otherwise warn every step
            warnings.warn(
                f"DispersiveRegularizer: {', '.join(missing)} captured nothing since the last loss(), so their term is "
                "missing from it: they did not run, or ran in eval mode, under torch.no_grad(), or inside a reentrant "
                "torch.utils.checkpoint (whose forward runs without gradients); use checkpoint(..., use_reentrant="
                "False)",
                RuntimeWarning,
                stacklevel=2,
            )
        batch = captured[0][1][0].shape[0]
        if batch < 2 and not (self.gather and _world_size() > 1):
            raise ConfigError(
                "DispersiveRegularizer: a batch of 1 makes the dispersive loss constant (no gradient); it needs at "
                "least 2 samples per process, or gather=True over several processes"
            )
        diagnose, self._diagnose = self._diagnose, False
        values, terms = {}, []
        for name, outputs in captured:
            calls = [
                dispersive_loss(z, self.variant, tau=self.tau, margin=self.margin, gather=self.gather) for z in outputs
            ]
            value = calls[0] if len(calls) == 1 else torch.stack(calls).mean()  # one term per layer
            terms.append(value)
            values[name] = value.detach()
            if diagnose:
                with torch.no_grad():
                    self.last_diagnostics[name] = _mean_stats([dispersion_stats(z.detach(), self.tau) for z in outputs])
        self.last_values = values
        total = torch.stack(terms).mean()
        if self.gather:
            w = _world_size()
            total = total * w - total.detach() * (w - 1)  # value unchanged, gradient w * d total
        return self.weight * total

    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """dispersion_stats of each layer captured in the last forward (the mean over its calls), without computing
        the loss; clears the captures.

        For watching layers that are not regularised (a regulariser with weight 0, enabled for one step)."""
        captured = self._take()
        with torch.no_grad():
            return {
                name: _mean_stats([dispersion_stats(z.detach(), self.tau) for z in outputs])
                for name, outputs in captured
                if outputs[0].shape[0] > 1
            }

    def request_diagnostics(self) -> None:
        """Make the next `loss()` also compute `last_diagnostics` (a few B x B matrices; e.g. at log steps)."""
        self._diagnose = True

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook and drop what was captured (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._captured, self._versions = [], []

    def __enter__(self) -> DispersiveRegularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"DispersiveRegularizer(layers={self.layer_names}, weight={self.weight}, tau={self.tau}, "
            f"variant={self.variant!r}, gather={self.gather})"
        )
