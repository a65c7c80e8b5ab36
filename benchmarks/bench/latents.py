"""A synthetic latent cache for timing `train.py --latents` where no dataset or VAE is at hand (the GPU check).

    python -m benchmarks.bench.latents OUT --count 2048 --image-size 256 --num-classes 1000

The cache has the format of `disploss extract-latents` (disploss.data.latents): posterior means ~ N(0, 1) and stds
0.1 for each image and its flip, uniform labels, the SD-VAE's scale 0.18215. train.py reads it like a real one, so
everything after the VAE (data loading, the step, logging, EMA, checkpoints) runs as in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from disploss.data import latents as fmt

SD_VAE_SCALE = 0.18215


def write_synthetic_latents(
    out: str | Path, count: int, image_size: int, num_classes: int, shard_size: int = 1024, seed: int = 0
) -> Path:
    """Write a complete cache of `count` random latents (4 x image_size/8 x image_size/8) into `out` (new or empty)."""
    out = Path(out)
    side = image_size // 8
    plan = {
        "format": fmt.LATENT_FORMAT, "version": fmt.LATENT_FORMAT_VERSION, "image_size": image_size,
        "vae": "synthetic", "scale": SD_VAE_SCALE, "shift": 0.0, "latent_shape": [4, side, side],
        "downsample_factor": 8, "count": count, "num_classes": num_classes,
        "class_names": [f"class_{k}" for k in range(num_classes)], "shard_size": shard_size,
        "num_shards": fmt.num_shards(count, shard_size), "dtype": "float32", "alpha": "white",
        "data_path": "synthetic", "layout": fmt.LAYOUT,
    }  # fmt: skip
    fmt.prepare_cache_folder(out, plan)
    rng = np.random.default_rng(seed)
    for k in range(plan["num_shards"]):
        n = fmt.shard_length(k, count, shard_size)
        moments = np.empty((n, 2, 2, 4, side, side), dtype=np.float32)  # image/flip x mean/std
        moments[:, :, 0] = rng.standard_normal((n, 2, 4, side, side), dtype=np.float32)
        moments[:, :, 1] = 0.1
        fmt.write_shard(out, k, moments, rng.integers(0, num_classes, n))
    fmt.write_manifest(out, plan)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    path = write_synthetic_latents(args.out, args.count, args.image_size, args.num_classes)
    print(f"wrote a synthetic latent cache of {args.count} images at {args.image_size} px to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
