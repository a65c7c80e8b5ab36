"""Dispersive Loss (Wang & He 2025, "Diffuse and Disperse", section 3): a regulariser that spreads the
hidden representations of a batch, like a contrastive loss with no positive pairs.

Every variant flattens z (B, ...) to (B, M) and is computed from the B x B Gram matrix, which costs one
(B, M) x (M, B) matmul: far cheaper than pairwise differences for the sizes of SiT (M = T * D ~ 3e5).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from disploss.errors import ConfigError

Variant = Literal["infonce_l2", "infonce_cosine", "hinge", "covariance", "infonce_l2_ln"]
VARIANTS: tuple[str, ...] = ("infonce_l2", "infonce_cosine", "hinge", "covariance")  # the paper's four
# Not in the paper: InfoNCE-L2 of layer-normalised representations (experiments/digits weighs it).
EXPERIMENTAL_VARIANTS: tuple[str, ...] = ("infonce_l2_ln",)
ALL_VARIANTS: tuple[str, ...] = VARIANTS + EXPERIMENTAL_VARIANTS


def check_variant(variant: str) -> str:
    """Return `variant` when it is a known dispersive variant, else raise ValueError listing the choices."""
    if variant not in ALL_VARIANTS:
        raise ConfigError(f"unknown dispersive variant {variant!r}; valid choices: {', '.join(ALL_VARIANTS)}")
    return variant


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    # float64 stays float64; everything else (bf16/fp16 under autocast included) computes in float32.
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def pairwise_sq_dists(z: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances divided by the feature size: d_ij = ||z_i - z_j||^2 / M.

    Args:
        z: (B, M).
    Returns:
        (B, B), exactly zero on the diagonal and never negative.
    """
    z = z - z.mean(dim=0, keepdim=True)  # distances are translation invariant; centring cuts round-off
    gram = _gram(z)  # (B, B)
    sq = gram.diagonal()  # (B,)
    d = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d = d * (1 - torch.eye(len(z), dtype=d.dtype, device=d.device))  # i == j is exactly 0
    return d / z.shape[1]


def _gram(zc: torch.Tensor) -> torch.Tensor:
    # On CUDA, fp32 matmuls may run in TF32 (10-bit mantissa), which would swamp small distances next to large
    # norms; the (B, M) x (M, B) product is tiny, so do it in float64 there. CPUs have no TF32.
    if zc.device.type == "cuda" and zc.dtype == torch.float32:
        return (zc.double() @ zc.double().t()).float()
    return zc @ zc.t()


class _InfoNCEL2(torch.autograd.Function):
    """log mean_ij exp(-||z_i - z_j||^2 / (M tau)) with a hand-written backward: one (B, B) x (B, M) matmul.

    With w = softmax over all B*B entries of -d / tau and A = -(w + w^T) / tau, the gradient is
        dL/dz = (2 / M) (diag(A 1) - A) z,
    whose rows sum to zero, so centring z (done in forward for round-off) needs no term in backward.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, tau: float) -> torch.Tensor:  # z (B, M)
        B = z.shape[0]
        logits = (-pairwise_sq_dists(z) / tau).reshape(-1)  # (B*B,)
        lse = torch.logsumexp(logits, dim=0)
        ctx.save_for_backward(z, (logits - lse).exp().reshape(B, B))
        ctx.tau = tau
        return lse - math.log(B * B)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, w = ctx.saved_tensors
        B, M = z.shape
        a = -(w + w.t()) / ctx.tau  # (B, B) = dL/dd_ij + dL/dd_ji
        k = torch.diag(a.sum(dim=1)) - a
        return (grad_out * (2.0 / M)) * (k.to(z.dtype) @ z), None


def _log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    # log( mean over all B*B entries of exp(logits) ), stable at any scale.
    return torch.logsumexp(logits.reshape(-1), dim=0) - math.log(logits.numel())


def dispersive_loss(
    z: torch.Tensor,
    variant: Variant = "infonce_l2",
    tau: float = 1.0,
    margin: float = 1.0,
    gather: bool = False,
) -> torch.Tensor:
    """The dispersive loss of a batch of representations.

    Variants (docs/paper.md; all B*B ordered pairs, the diagonal included, as the reference does):
      - infonce_l2:     log mean_ij exp(-||z_i - z_j||^2 / (M tau))         in [-log B, 0]
      - infonce_cosine: log mean_ij exp(-(1 - cos(z_i, z_j)) / tau)
      - hinge:          mean_ij max(0, margin - ||z_i - z_j||^2 / M)^2
      - covariance:     sum of squared off-diagonal entries of the covariance (over the batch) of the
                        l2-normalised z; computed through the B x B Gram matrix, never the M x M covariance.
      - infonce_l2_ln:  infonce_l2 of layer-normalised representations (each z_i standardised over its M
                        features: mean 0, variance 1), so the term cannot be lowered by growing the norms
                        (not in the paper; see experiments/digits).

    Args:
        z: (B, ...) representations of one process's batch, e.g. the residual stream (B, T, D) of a block.
        variant: one of VARIANTS.
        tau: temperature of the InfoNCE variants (> 0).
        margin: epsilon of the hinge variant.
        gather: compute over the representations of every process (all-gather); gradients flow to the
            local part only. In a single process this changes nothing.
    Returns:
        A 0-dim tensor: float64 for float64 input, float32 otherwise (also under bf16 autocast).
    """
    check_variant(variant)
    if tau <= 0:
        raise ConfigError(f"tau must be positive, got {tau}")
    if z.dim() < 2 or z.shape[0] < 1:
        raise ConfigError(f"dispersive_loss expects z of shape (B, ...) with B >= 1, got {tuple(z.shape)}")
    if gather:
        from disploss.distributed import all_gather_with_grad

        z = all_gather_with_grad(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(z.shape[0], -1).to(_compute_dtype(z))  # (B, M)
        if variant == "infonce_l2":
            return _InfoNCEL2.apply(z, float(tau))
        if variant == "infonce_l2_ln":
            zn = torch.nn.functional.layer_norm(z, z.shape[1:], eps=1e-6)  # (B, M), no affine
            return _InfoNCEL2.apply(zn, float(tau))
        if variant == "infonce_cosine":
            zn = torch.nn.functional.normalize(z, dim=1)
            eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
            cos = torch.where(
                eye, torch.ones((), dtype=zn.dtype, device=z.device), zn @ zn.t()
            )  # exact self-similarity
            return _log_mean_exp(-(1 - cos) / tau)
        if variant == "hinge":
            return (margin - pairwise_sq_dists(z)).clamp_min(0).pow(2).mean()
        return _covariance_off_diagonal(z)


def _covariance_off_diagonal(z: torch.Tensor) -> torch.Tensor:
    # sum_{a != b} C_ab^2 = ||C||_F^2 - sum_a C_aa^2, and ||Zc^T Zc||_F = ||Zc Zc^T||_F (B x B instead of M x M).
    B = z.shape[0]
    if B < 2:
        return z.sum() * 0
    zc = torch.nn.functional.normalize(z, dim=1)
    zc = zc - zc.mean(dim=0, keepdim=True)  # (B, M)
    frob = (zc @ zc.t()).pow(2).sum() / (B - 1) ** 2
    diag = (zc.pow(2).sum(dim=0) / (B - 1)).pow(2).sum()
    return frob - diag


@torch.no_grad()
def dispersion_stats(z: torch.Tensor, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """What the dispersive term sees in a batch: cheap diagnostics (one B x B Gram matrix), 0-d float32 tensors.

    - rms: sqrt(mean z^2), the scale of the representations (InfoNCE-L2 can lower its value by growing it).
    - median_d: median over pairs i < j of d_ij = ||z_i - z_j||^2 / M (the distance InfoNCE-L2 divides by tau).
    - unsaturated: share of pairs i != j with exp(-d_ij / tau) >= 0.01 (d_ij <= 4.6 tau): pairs the InfoNCE terms
      still pull apart. At 0 the term sits at its floor -log B and its gradient vanishes.
    - offdiag_weight: share of sum_ij exp(-d_ij / tau) carried by the pairs i != j; 0 at the floor, (B - 1) / B
      when all representations coincide.
    - effective_rank: exp(entropy of the normalised singular values of the centred batch) (Roy and Vetterli,
      2007), between 1 and B - 1: how many directions the batch spans.

    Args:
        z: (B, ...) with B >= 2.
        tau: the InfoNCE temperature the stats refer to.
    """
    z = z.reshape(z.shape[0], -1).to(_compute_dtype(z))  # (B, M)
    B = z.shape[0]
    d = pairwise_sq_dists(z)  # (B, B)
    off = ~torch.eye(B, dtype=torch.bool, device=z.device)
    pairs = d[torch.triu(off, diagonal=1)]
    weights = torch.exp(-d / tau)
    zc = z - z.mean(dim=0, keepdim=True)
    eig = torch.linalg.eigvalsh(_gram(zc)).clamp_min(0)  # (B,) singular values squared
    s = eig.sqrt()
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(s.dtype).tiny))).sum()
    stats = {
        "rms": z.pow(2).mean().sqrt(),
        "median_d": pairs.median() if len(pairs) else torch.zeros((), dtype=z.dtype, device=z.device),
        "unsaturated": (weights[off] >= 0.01).to(z.dtype).mean() if B > 1 else torch.zeros((), device=z.device),
        "offdiag_weight": weights[off].sum() / weights.sum(),
        "effective_rank": entropy.exp(),
    }
    return {k: v.float() for k, v in stats.items()}


def reference_infonce_l2(z: torch.Tensor) -> torch.Tensor:
    """The reference's formula (pdist, concat of the diagonal zeros, exp, log), device-agnostic.

    Kept for the benchmark and equivalence tests only: it overflows/underflows where dispersive_loss
    does not, and pdist's backward is slow.
    """
    z = z.reshape(z.shape[0], -1)
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.cat((diff, diff, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)))
    return torch.log(torch.exp(-diff).mean())
