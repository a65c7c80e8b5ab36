"""MeanFlow (Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", 2025): a network of the
average velocity, trained through the MeanFlow identity, sampled in one (or a few) steps. Pure functions of a model
function; the model is called as model(z, t, y, r=r, force_drop_ids=drop) (disploss.models.SiT with meanflow=True).

Time, the mapping stated once. This code base runs t = 0 noise to t = 1 data (disploss.transport); the MeanFlow
paper runs tau = 0 data to tau = 1 noise. Here tau = 1 - t, on the Linear path:
    z_t = t x + (1 - t) eps,    v = dz_t/dt = x - eps          (the paper: z_tau = (1 - tau) x + tau eps, v = eps - x)
The roles of the two times are the paper's: t is the time of the state z_t, r the other end of the interval, so
here r >= t (r lies toward the data). The network predicts the average velocity over [t, r],
    u(z_t, r, t) = (z_r - z_t) / (r - t) = 1 / (r - t) * integral_t^r v(z_s, s) ds,
which is -u_paper at (tau_r, tau_t) = (1 - r, 1 - t), and is conditioned on t and on r - t (the paper's choice of
(t, t - r)). Differentiating (r - t) u = z_r - z_t in t gives the MeanFlow identity, which reads the same in both
conventions:
    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,    du/dt = v . d_z u + d_t u  (one JVP along (v, 0, 1) of (z, r, t)).
Sampling from the noise end (t = 0) toward the data end: z_r = z_t + (r - t) u(z_t, r, t); one step:
    x = eps + u(eps, r=1, t=0)                    (the paper's Algorithm 2: x = eps - u_paper(eps, 0, 1)).

The objective (the paper's Algorithm 1; its code's guidance and label dropout):
    u_tgt = v~ - (t - r) * du/dt   with du/dt along (v~, 0, 1), clip(r - t, 0, 1) as the code, under stop-gradient;
    delta = u(z_t, r, t) - u_tgt;  loss = ||delta||^2 / sg(||delta||^2 + c)^p   (||.||^2 summed over C, H, W).
Classifier-free guidance folded into the target, the improved form of the paper's appendix (kappa = 0: the form of
its main text):
    v~ = omega v + kappa u(z_t, t, t | y) + (1 - omega - kappa) u(z_t, t, t | null),
both u's evaluated at r = t (the instantaneous velocity), without gradient, in one batched call; omega = 1, kappa = 0
(the default) is v~ = v and costs no call. A sample whose label is dropped (probability label_dropout) is trained
on the null class with v~ = v. The effective guidance scale is omega / (1 - kappa).

Passes of one step, and why. du/dt only matters where r != t (the target is v~ wherever r = t), so the JVP runs
on that share of the batch only (25% by default), on dual tensors (torch.autograd.forward_ad) and without gradient
(the target is under stop-gradient anyway); then one ordinary forward pass of the whole batch with gradient gives u.
Hooks on the model (disploss.DispersiveRegularizer) therefore capture once per step, on that primal pass: the JVP
pass runs without gradient, when they capture nothing. The alternative, one forward pass on dual tensors with
gradient, has autograd record the tangent computations too (they involve the weights): on SiT-S/2 it kept 3.1x the
activation memory of a flow step for backward (0.97 GiB against 0.32 GiB at batch 8, 16x16 latents), computes the
tangent of every sample, and leaves hooks to unwrap dual tensors; BENCHMARKS.md has the measured step times. SiT's
attention switches to a written-out softmax attention on dual inputs (SDPA's fused kernels have no forward
derivative); the primal pass keeps the fused kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from disploss.options import at_least, check_options, finite, in_interval, option, positive

__all__ = [
    "MeanFlowSettings",
    "jvp_u",
    "meanflow_losses",
    "meanflow_target",
    "paper_time",
    "sample_meanflow",
    "sample_times",
]


@dataclass(frozen=True)
class MeanFlowSettings:
    """The MeanFlow objective's settings, with the paper's ImageNet defaults (guidance: none by default, the paper
    sets omega and kappa per model size)."""

    ratio: float = option(0.25, "share of each batch with r != t (the rest trains the instantaneous velocity, r = t)",
                          check=in_interval(0.0, 1.0, closed_high=True), flag="--meanflow-ratio")  # fmt: skip
    time_mu: float = option(-0.4, "mean of the logit-normal draw of (r, t), in the paper's time axis (tau = 1 - t)",
                            check=finite, flag="--meanflow-time-mu")  # fmt: skip
    time_sigma: float = option(1.0, "std of the logit-normal draw of (r, t)", check=positive,
                               flag="--meanflow-time-sigma")  # fmt: skip
    weight_p: float = option(1.0, "power p of the adaptive loss weight 1 / (||delta||^2 + c)^p (0: plain squared "
                             "error)", check=at_least(0.0), flag="--meanflow-p")  # fmt: skip
    weight_c: float = option(1e-3, "c of the adaptive loss weight", check=positive, flag="--meanflow-c")
    omega: float = option(1.0, "guidance folded into the target: v~ = omega v + kappa u(.|y) + (1 - omega - kappa) "
                          "u(.|null); 1 with kappa 0: no guidance", check=finite, flag="--meanflow-omega")  # fmt: skip
    kappa: float = option(0.0, "kappa of the improved guidance form (effective scale omega / (1 - kappa))",
                          check=in_interval(0.0, 1.0), flag="--meanflow-kappa")  # fmt: skip
    label_dropout: float = option(0.1, "probability that a sample trains on the null class with an unguided target",
                                  check=in_interval(0.0, 1.0), flag="--meanflow-label-dropout")  # fmt: skip

    def __post_init__(self):
        check_options(self)

    @property
    def guided(self) -> bool:
        """Whether the target folds in guidance (one or two extra model calls without gradient)."""
        return self.omega != 1.0 or self.kappa != 0.0


def paper_time(t: torch.Tensor) -> torch.Tensor:
    """A time of this code base (t = 0 noise) in the MeanFlow paper's axis (tau = 0 data): tau = 1 - t."""
    return 1.0 - t


def sample_times(batch: int, settings: MeanFlowSettings, device: torch.device | str = "cpu"):
    """(t, r) of one batch, each (B,), t <= r, drawn as the paper's code does, on the CPU generator (then moved).

    Two logit-normal draws sigmoid(N(time_mu, time_sigma^2)) in the paper's axis, tau_t the larger; the first
    int(B (1 - ratio)) samples get r = t (as its code: a fixed count per batch). Mapped to this code's axis:
    t = 1 - tau_t, r = 1 - tau_r.
    """
    tau = torch.sigmoid(torch.randn(2, batch) * settings.time_sigma + settings.time_mu)  # (2, B), paper axis
    tau_t, tau_r = tau.max(dim=0).values, tau.min(dim=0).values
    equal = torch.arange(batch) < int(batch * (1 - settings.ratio))
    tau_r = torch.where(equal, tau_t, tau_r)
    return paper_time(tau_t).to(device), paper_time(tau_r).to(device)


def jvp_u(model: Callable, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, **model_kwargs):
    """u(z, r, t) and du/dt = v . d_z u + d_t u, from one forward pass on dual tensors.

    Args:
        model: called as model(z, t, r=r, **model_kwargs).
        z: (B, C, H, W) states; t, r: (B,); v: (B, C, H, W) the tangent of z (the velocity).
    Returns:
        (u, du/dt), each (B, C, H, W); u carries the autograd graph of the forward pass (when gradients are on),
        du/dt is detached.
    """
    with fwAD.dual_level():
        with warnings.catch_warnings():  # torch's first make_dual loads its JVP decompositions with torch.jit.script,
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
            z_dual, t_dual = fwAD.make_dual(z, v), fwAD.make_dual(t, torch.ones_like(t))  # which warns; not ours
        out = model(z_dual, t_dual, r=r, **model_kwargs)
        u, dudt = fwAD.unpack_dual(out)
    return u, (torch.zeros_like(u) if dudt is None else dudt.detach())  # None: u does not depend on (z, t)


def meanflow_target(
    model: Callable, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, v: torch.Tensor, **model_kwargs
) -> torch.Tensor:
    """The MeanFlow identity's target u_tgt = v - (t - r) du/dt, du/dt along (v, 0, 1), t - r clipped to [-1, 0] as
    the paper's code does; computed without gradient.

    Args:
        model: called as model(z, t, r=r, **model_kwargs).
        z: (B, C, H, W) states at t; t, r: (B,), r >= t; v: (B, C, H, W) the velocity at (z, t).
    Returns:
        (B, C, H, W) in v's dtype (float32 under bf16 autocast), detached.
    """
    with torch.no_grad():
        _, dudt = jvp_u(model, z, t, r, v, **model_kwargs)
    h = (r - t).clamp(0.0, 1.0).view(-1, *([1] * (z.dim() - 1)))  # -(t - r)
    return (v + h * dudt.to(v.dtype)).detach()


def _guided_velocity(model, z, t, v, y, drop, settings: MeanFlowSettings) -> torch.Tensor:
    # v~ = omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null), the two u's in one call; v where
    # the label is dropped.
    if not settings.guided:
        return v
    with torch.no_grad():
        if settings.kappa:
            zz, tt, yy = torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, y])  # (2B, ...)
            ids = torch.cat([torch.zeros_like(y), torch.ones_like(y)])
            cond, uncond = model(zz, tt, yy, r=tt, force_drop_ids=ids).to(v.dtype).chunk(2)
        else:
            cond, uncond = None, model(z, t, y, r=t, force_drop_ids=torch.ones_like(y)).to(v.dtype)
        guided = settings.omega * v + (1 - settings.omega - settings.kappa) * uncond
        if cond is not None:
            guided = guided + settings.kappa * cond
    keep = drop.view(-1, *([1] * (v.dim() - 1)))
    return torch.where(keep, v, guided)


def meanflow_losses(
    model: Callable,
    x1: torch.Tensor,
    y: torch.Tensor,
    settings: MeanFlowSettings,
    *,
    jvp_model: Callable | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The MeanFlow loss of one batch (see the module docstring for the formulas and the passes).

    Args:
        model: called as model(z, t, y, r=r, force_drop_ids=ids), ids (B,) 1 where the label is replaced by the null
            class; a MeanFlow SiT (or its DDP / compile wrapper): the pass with gradient.
        x1: (B, C, H, W) data; y: (B,) labels.
        settings: ratio, times, weighting, guidance, label dropout.
        jvp_model: the same network for the passes without gradient (the JVP and the guidance), e.g. unwrapped from
            DDP and torch.compile; default `model`.
        noise, t, r, drop: optional fixed eps (B, C, H, W), t and r (B,), and dropped-label mask (B,) bool; drawn
            otherwise, in this order: (t, r) and drop on the CPU generator, then noise like x1.
    Returns:
        dict with 'loss' (B,) the adaptively weighted loss, 'flow' (B,) the mean squared error to the target (per
        element, unweighted: the flow-matching loss where r = t and no guidance), 'pred' u (B, C, H, W), 'target'
        (B, C, H, W).
    """
    B, device = x1.shape[0], x1.device
    jvp_model = model if jvp_model is None else jvp_model
    if t is None or r is None:
        t, r = sample_times(B, settings)
    jvp_rows = (r.cpu() != t.cpu()).nonzero().squeeze(1).to(device)  # drawn on the CPU: no device sync
    t, r = t.to(device), r.to(device)
    if drop is None:
        drop = torch.rand(B) < settings.label_dropout
    drop = drop.to(device)
    if noise is None:
        noise = torch.randn_like(x1)
    t_ = t.view(-1, *([1] * (x1.dim() - 1)))
    z = t_ * x1 + (1 - t_) * noise  # (B, C, H, W): the Linear path
    v_tilde = _guided_velocity(jvp_model, z, t, x1 - noise, y, drop, settings)
    target = v_tilde.clone()  # u_tgt = v~ where r = t
    if len(jvp_rows):  # u_tgt = v~ - (t - r) du/dt where r != t
        target[jvp_rows] = meanflow_target(
            jvp_model, z[jvp_rows], t[jvp_rows], r[jvp_rows], v_tilde[jvp_rows], y=y[jvp_rows],
            force_drop_ids=drop[jvp_rows].long(),
        )  # fmt: skip
    u = model(z, t, y, r=r, force_drop_ids=drop.long()).to(target.dtype)  # with gradient: the hooks capture here
    sq = ((u - target) ** 2).flatten(1).sum(1)  # (B,) ||delta||^2
    weight = 1.0 / (sq.detach() + settings.weight_c) ** settings.weight_p
    return {"loss": weight * sq, "flow": sq.detach() / u[0].numel(), "pred": u, "target": target}


def sample_meanflow(model: Callable, z: torch.Tensor, num_steps: int = 1, **model_kwargs) -> list[torch.Tensor]:
    """From noise (t = 0) to data (t = 1) in `num_steps` equal steps z_r = z_t + (r - t) u(z_t, r, t).

    Args:
        model: called as model(z, t, r=r, **model_kwargs): exactly num_steps calls.
        z: (B, C, H, W) noise.
    Returns:
        The states at t = 0, 1/N, ..., 1 (the last is the sample).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    grid = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64).tolist()
    states = [z]
    for t0, t1 in zip(grid[:-1], grid[1:]):
        t = torch.full((z.shape[0],), t0, device=z.device)
        r = torch.full((z.shape[0],), t1, device=z.device)
        z = z + (t1 - t0) * model(z, t, r=r, **model_kwargs).to(z.dtype)
        states.append(z)
    return states
