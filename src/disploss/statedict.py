"""Weights as plain data: every tensor of a plain container with its place, the first one that is not finite, and a
short fingerprint of a state dict's content.

Shared by the checkpoint files (disploss.checkpoint.io: checksums, the non-finite check on load), the hub-format
folders (disploss.hub) and the sample folders, which are keyed by the fingerprint of the weights they sample.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["first_nonfinite", "fingerprint", "iter_tensors", "shape_differences", "tensor_crc32"]


def iter_tensors(obj: Any, where: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a plain container (dicts, lists, tuples) with its place, e.g.
    ("model['blocks.0.attn.qkv.weight']", tensor); top-level keys in `skip` are left out."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if where == "" and key in skip:
                continue
            yield from iter_tensors(value, f"{where}[{key!r}]" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from iter_tensors(value, f"{where}[{i}]")


def first_nonfinite(state: Any) -> str | None:
    """The first floating-point tensor of a plain container (dicts, lists, tensors) that holds NaN or infinity,
    with its place and counts, e.g. "model['blocks.0.attn.qkv.weight'] (12 NaN, 0 infinite of 27648)"; None when
    every tensor is finite."""
    for where, tensor in iter_tensors(state):
        if not tensor.is_floating_point() or tensor.layout != torch.strided:
            continue
        if torch.isfinite(tensor.sum()):  # any NaN or inf makes the sum non-finite; a finite sum is the fast path
            continue
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            return f"{where} ({nan} NaN, {inf} infinite of {tensor.numel()})"
    return None


def tensor_crc32(tensor: torch.Tensor) -> int:
    """The CRC-32 of the tensor's bytes in C order (-1 for a sparse tensor). zlib releases the GIL; ~7 GB/s on one
    core here."""
    t = tensor.detach()
    if t.layout != torch.strided:
        return -1
    t = t.cpu().contiguous().reshape(-1)
    return zlib.crc32(t.view(torch.uint8).numpy()) if t.numel() else 0


def fingerprint(state: Mapping[str, torch.Tensor], digits: int = 8) -> str:
    """A short hex name of a state dict's content: SHA-256 over each tensor's name, dtype, shape and CRC-32, in key
    order. The same weights give the same fingerprint in any file format (a training checkpoint, a .safetensors
    export, a hub-format folder); any changed value, dtype or shape gives another one (up to CRC-32 collisions,
    one in 2^32 per tensor).

    Args:
        state: tensors by name (official key names, as disploss.checkpoint.load_sit_weights returns them).
        digits: hex digits kept (8: one in 4 billion for two different state dicts to share it).
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|{tensor_crc32(t)};".encode())
    return digest.hexdigest()[:digits]


def shape_differences(file_sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per key that is missing, extra or of another shape in `file_sd` (weights read from a file) compared
    with `model_sd` (the model's state dict), e.g. "  pos_embed: checkpoint (1, 16, 64), model (1, 64, 64)"."""
    lines = []
    for key in model_sd:
        if key not in file_sd:
            lines.append(f"  {key}: missing in the checkpoint (model {tuple(model_sd[key].shape)})")
        elif tuple(file_sd[key].shape) != tuple(model_sd[key].shape):
            lines.append(f"  {key}: checkpoint {tuple(file_sd[key].shape)}, model {tuple(model_sd[key].shape)}")
    for key in file_sd:
        if key not in model_sd:
            lines.append(f"  {key}: in the checkpoint {tuple(file_sd[key].shape)}, not in the model")
    return lines
