"""Images out: [-1, 1] tensors to uint8 pixels, and grids written atomically as PNG."""

from __future__ import annotations

import os

import numpy as np
import torch

from disploss.errors import ConfigError

PIXEL_CONVERSIONS = ("truncate", "round")


def to_uint8(x: torch.Tensor, mode: str = "truncate") -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C).

    Args:
        mode: 'truncate' is the reference's clamp(127.5 x + 128, 0, 255) cast to uint8 (npz files
            bit-comparable with the reference's). Since 127.5 x + 128 = 127.5 (x + 1) + 0.5, the cast already
            rounds half up; 'round' rounds 127.5 (x + 1) half to even (torch.round): the two differ only on
            exact ties, a handful of pixels in a million.
    """
    if mode == "truncate":
        pixels = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    elif mode == "round":
        pixels = torch.clamp(torch.round(127.5 * (x + 1)), 0, 255).to(torch.uint8)
    else:
        raise ConfigError(f"unknown pixel conversion {mode!r}; valid choices: {', '.join(PIXEL_CONVERSIONS)}")
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 (B, H, W, 3) -> one (rows * (H + p) + p, nrow * (W + p) + p, 3) image, `nrow` images a row."""
    b, h, w, c = images.shape
    rows = -(-b // nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W, 3) array as PNG, atomically; encoded in memory first, so that a full disk is one line
    naming the file and the bytes it needed (disploss.fileio.DiskFullError)."""
    import io

    from PIL import Image

    from disploss.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 8, zoom: int = 1) -> None:
    """Save uint8 (B, H, W, 3) images as one grid PNG, atomically; zoom > 1 enlarges each pixel (nearest)."""
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    save_png(make_grid(images, nrow), path)
