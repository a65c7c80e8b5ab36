"""SiT: the DiT backbone used for stochastic interpolants (Ma et al. 2024), as in the reference code.

The backbone predicts a field and knows nothing of losses or time conventions. State-dict key names and
shapes are those of the released checkpoints (SiT-XL-2-256x256.pt and the DispLoss B/2 and XL/2 files).
Shapes: x (B, C, H, W); tokens (B, T, D); t (B,); y (B,) with y == num_classes the null class.

One module on purpose (a little over 400 lines): the blocks, the network, its registry and its FLOP count are
one architecture, read together against the released checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from disploss.errors import ConfigError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens. x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] (used raw, not times 1000) with [cos, sin] frequencies and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features (B, dim): cos first, then sin; frequencies exp(-ln(max_period) k / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with an extra row (index num_classes) for the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability dropout_prob (or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


def _is_dual(x: torch.Tensor) -> bool:
    # A forward-mode AD dual tensor (torch.autograd.forward_ad), e.g. inside MeanFlow's Jacobian-vector product.
    if torch.compiler.is_compiling():
        return False
    return fwAD.unpack_dual(x).tangent is not None


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out: what SDPA computes, in ops that support forward-mode AD (SDPA's fused
    CPU / CUDA kernels have no forward derivative). q, k, v (B, heads, T, d) -> (B, heads, T, d)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, T, T)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    """Multi-head self-attention on F.scaled_dot_product_attention (flash / memory-efficient when available); on
    forward-mode AD dual inputs (MeanFlow's JVP) the same attention written out (`math_attention`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, D/heads)
        x = math_attention(q, k, v) if _is_dual(q) else F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C_out)


class PatchEmbed(nn.Module):
    """Conv2d(kernel = stride = patch) then tokens in row-major order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class SiT(nn.Module):
    """Scalable Interpolant Transformer.

    Args:
        input_size: spatial size of the input (latent) image, H = W.
        patch_size: side of the square patches; must divide input_size.
        in_channels: C of the input (4 for SD-VAE latents, 3 in pixel space).
        hidden_size, depth, num_heads, mlp_ratio: transformer width D, number of blocks, heads, MLP ratio.
        class_dropout_prob: probability that a label is replaced by the null class in training mode.
        num_classes: number of classes; the null class is index num_classes.
        learn_sigma: the output layer has 2*in_channels channels and the forward keeps the first half
            (a DiT legacy that the released checkpoints carry).
        meanflow: a second time input for MeanFlow (disploss.meanflow): `r_embedder` embeds the length r - t of the
            interval whose average velocity the network predicts (the MeanFlow paper's (t, t - r) conditioning),
            added to the t and label embeddings. False (every released checkpoint): the exact reference network.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        meanflow: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ConfigError(
                f"input size {input_size} is not divisible by the patch size {patch_size}; "
                f"valid input sizes are multiples of {patch_size}"
            )
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.depth = depth
        self.meanflow = meanflow
        self.grad_checkpointing = False  # recompute block activations in backward (large local batches)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if meanflow:  # only then: a flow SiT keeps the released checkpoints' exact keys
            self.r_embedder = TimestepEmbedder(hidden_size)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table, stored as a non-trainable parameter because the released state dicts hold it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference init: xavier linears, zero biases, N(0, 0.02) embeddings, adaLN-Zero (output 0)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.meanflow:
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def config(self) -> dict:
        """Constructor arguments as a plain dict (stored in checkpoints and safetensors metadata)."""
        return {
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.blocks[0].mlp.fc1.out_features / self.hidden_size if self.depth else 4.0,
            "class_dropout_prob": self.y_embedder.dropout_prob,
            "num_classes": self.num_classes,
            "learn_sigma": self.learn_sigma,
            "meanflow": self.meanflow,
        }

    # -- model folders (disploss.hub): config.json + model.safetensors, the layout of huggingface_hub's mixin ------
    def save_pretrained(self, save_directory: str | os.PathLike, *, info: dict | None = None) -> Path:
        """Save as a model folder: config.json (`config()`), model.safetensors and, if absent, a short README.md.

        Args:
            save_directory: the folder (a new or empty one appears whole).
            info: config.json's "disploss" entry, how the weights were made (`disploss export` fills it).
        Returns:
            The folder.
        """
        from disploss.hub import save_pretrained

        return save_pretrained(self, save_directory, info)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir=None, device="cpu"
    ) -> SiT:
        """A SiT from a model folder or a Hugging Face hub id ("owner/name"), in eval mode.

        The weights must fit config.json (each differing key is named with both shapes) and be finite (the first
        non-finite tensor is named). An uncached hub id without network access is a one-line error naming a local
        folder as the fix.
        """
        from disploss.hub import load_pretrained

        return load_pretrained(cls, name_or_path, revision=revision, cache_dir=cache_dir, device=device)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
        """Save to a temporary folder and upload it to the hub repository `repo_id` (created when missing); returns
        the commit URL. A folder written by `disploss export` (with its full model card) is pushed with
        disploss.hub.push_folder."""
        import tempfile

        from disploss.hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return push_folder(folder, repo_id, private=private, token=token)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); feature order (p, q, c) with c fastest."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, r: torch.Tensor | None) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"SiT expects x of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ConfigError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if self.meanflow and (r is None or r.shape != t.shape):
            got = "none" if r is None else f"shape {tuple(r.shape)}"
            raise ConfigError(
                f"a MeanFlow SiT needs r of shape ({x.shape[0]},) (the other end of the interval), got {got}"
            )
        if not self.meanflow and r is not None:
            raise ConfigError("this SiT has one time input (a flow model); r is for MeanFlow models (meanflow=True)")
        # A range check needs the values on the host: do it only where that costs no device sync.
        if y.device.type == "cpu" and not torch.compiler.is_compiling() and y.numel():
            lo, hi = int(y.min()), int(y.max())
            top = self.y_embedder.embedding_table.num_embeddings - 1
            if lo < 0 or hi > top:
                raise ConfigError(
                    f"class labels must lie in [0, {self.num_classes - 1}] (or {self.num_classes} for the null "
                    f"class), got values in [{lo}, {hi}]"
                )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_act: bool = False, *,
        r: torch.Tensor | None = None, force_drop_ids: torch.Tensor | None = None,
    ):  # fmt: skip
        """Predict the field at (x, t) for labels y.

        Args:
            x: (B, C, H, W) input; t: (B,) times in [0, 1]; y: (B,) labels (num_classes = null class).
            return_act: also return the residual stream after each block.
            r: (B,) the other end of the interval, for a MeanFlow SiT only (required there).
            force_drop_ids: (B,) 1 where the label is replaced by the null class; given, no label is dropped at
                random (MeanFlow's objective drops labels itself, to know which targets to leave unguided).
        Returns:
            (B, C, H, W) prediction, or (prediction, acts) with acts[i] of shape (B, T, D).
        """
        self._check_inputs(x, t, y, r)
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        if self.meanflow:
            c = c + self.r_embedder(r - t)
        acts = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if return_act:
                acts.append(x)
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        x = self.unpatchify(x)  # (B, C_out, H, W)
        if self.learn_sigma:
            x, _ = x.chunk(2, dim=1)
        return (x, acts) if return_act else x

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guide_channels: int | None = 3,
        **kwargs,
    ) -> torch.Tensor:  # fmt: skip
        """Classifier-free guidance on a batch laid out as [x; x] with labels [y; null].

        Only the first half of x is used; the output is [guided; guided] so ODE/SDE solvers keep the layout.

        Args:
            guide_channels: guide the first `guide_channels` output channels and pass the rest through
                unguided (3 is the reference's DiT legacy that produced the published numbers); None guides
                every channel (the standard form).
            kwargs: passed to forward (a MeanFlow SiT's r, laid out as t).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self.forward(combined, t, y, **kwargs)
        k = out.shape[1] if guide_channels is None else guide_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos positional embedding (MAE): first half of the features encodes the column index,
# the second half the row; sin then cos; frequencies 1 / 10000^(k / (d/2)).
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table, tokens in row-major order."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_col = _1d_sincos(embed_dim // 2, grid[0])
    emb_row = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_col, emb_row], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ---------------------------------------------------------------------------------------------------------
# Registry: SiT-{S,B,L,XL}/{2,4,8} -> (depth, hidden_size, num_heads)
ARCHS: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _make(size: str, patch: int) -> Callable[..., SiT]:
    depth, hidden, heads = ARCHS[size]

    def build(**kwargs) -> SiT:
        return SiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)

    build.__name__ = f"SiT_{size}_{patch}"
    build.__doc__ = f"SiT-{size}/{patch}: depth {depth}, width {hidden}, {heads} heads, patch {patch}."
    return build


SiT_models: dict[str, Callable[..., SiT]] = {
    f"SiT-{size}/{patch}": _make(size, patch) for size in ("XL", "L", "B", "S") for patch in (2, 4, 8)
}

# Not in the reference: a tiny family for CPU demos and tests (depth 6, width 128, 4 heads).
ARCHS["T"] = (6, 128, 4)
MODEL_PRESETS: dict[str, Callable[..., SiT]] = {
    **SiT_models,
    **{f"SiT-T/{patch}": _make("T", patch) for patch in (1, 2, 4)},
}


def parse_model_name(name: str) -> tuple[int, int, int, int]:
    """'SiT-XL/2' -> (depth, hidden_size, num_heads, patch_size); ValueError listing the valid names."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {name!r}; valid choices: {', '.join(MODEL_PRESETS)}")
    size, patch = name[len("SiT-") :].split("/")
    depth, hidden, heads = ARCHS[size]
    return depth, hidden, heads, int(patch)


def create_model(name: str, **kwargs) -> SiT:
    """Build a registered model by name (ValueError listing the valid names for an unknown one)."""
    parse_model_name(name)
    return MODEL_PRESETS[name](**kwargs)


def model_name_for(config: dict) -> str | None:
    """The registry name of a configuration (None when it is not one of the 12 presets)."""
    for name in MODEL_PRESETS:
        depth, hidden, heads, patch = parse_model_name(name)
        if (config.get("depth"), config.get("hidden_size"), config.get("patch_size")) == (depth, hidden, patch):
            return name
    return None


def forward_flops(config: dict) -> float:
    """Analytic multiply-accumulate count of one forward pass for one image (the DiT 'Gflops' convention).

    Counts matmuls (patch embedding, attention projections, attention scores and values, MLP, adaLN,
    final layer); the numbers match the DiT paper (SiT-XL/2 at 32x32: ~118.6 GMACs).
    """
    D, depth, p = config["hidden_size"], config["depth"], config["patch_size"]
    C, S = config["in_channels"], config["input_size"]
    r = config.get("mlp_ratio", 4.0)
    c_out = C * (2 if config.get("learn_sigma", True) else 1)
    T = (S // p) ** 2
    per_block = T * (3 * D * D + D * D + 2 * r * D * D) + 2 * T * T * D + 6 * D * D
    embed = T * C * p * p * D + 256 * D + D * D
    final = T * D * p * p * c_out + 2 * D * D
    if config.get("meanflow", False):
        embed += 256 * D + D * D  # the r embedder
    return float(depth * per_block + embed + final)
