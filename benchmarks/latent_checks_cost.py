"""What the latent cache's read checks cost, on a cache the size of ImageNet's (issue 20, item 3).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/latent_checks_cost.py --dir /tmp/latent-cost

Writes (once) a cache of 1,281,167 items in 1252 shards of 1024, 4 x 32 x 32 latents, as sparse files: the .npy
headers are real and each file has the size its header announces, the data reads as zeros (so the disk is not
filled). Times opening LatentsDataset (it reads every shard's two headers and sizes: the check that finds a truncated
or mislabelled shard before a run folder exists), first and again (the page cache warm), and, per item, the
finiteness / range check against the whole `__getitem__` that carries it (median of 5 rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from disploss.data import latents as fmt

COUNT, SHARD, LATENT = 1_281_167, 1024, (4, 32, 32)


def write_sparse_cache(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(fmt.num_shards(COUNT, SHARD)):
        n = fmt.shard_length(k, COUNT, SHARD)
        for name, shape, dtype in ((fmt.moments_name(k), (n, 2, 2, *LATENT), np.float32),
                                   (fmt.labels_name(k), (n,), np.int64)):  # fmt: skip
            with open(root / name, "wb") as f:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_1_0(f, header)
                f.truncate(f.tell() + math.prod(shape) * np.dtype(dtype).itemsize)
    plan = {
        "format": fmt.LATENT_FORMAT, "version": fmt.LATENT_FORMAT_VERSION, "image_size": 256, "vae": "ema",
        "scale": 0.18215, "shift": 0.0, "latent_shape": list(LATENT), "count": COUNT, "num_classes": 1000,
        "class_names": [f"n{i:08d}" for i in range(1000)], "shard_size": SHARD, "dtype": "float32",
    }  # fmt: skip
    (root / fmt.MANIFEST_NAME).write_text(json.dumps(plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/latent-cost")
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    root = Path(args.dir)
    if not (root / fmt.MANIFEST_NAME).exists():
        write_sparse_cache(root)
    opens = []
    for _ in range(2):
        start = time.perf_counter()
        dataset = fmt.LatentsDataset(root)
        opens.append(time.perf_counter() - start)
    indices = np.random.default_rng(0).integers(0, COUNT, args.items).tolist()
    for i in indices:  # map the shards these items touch, and warm their pages
        dataset.moments(i)
    item = np.zeros((2, 2, *LATENT), np.float32)
    check, total = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _ in indices:
            np.abs(item).max() <= fmt.MAX_MOMENT  # noqa: B015 - the check itself, as LatentsDataset.moments runs it
        check.append((time.perf_counter() - start) / len(indices))
        start = time.perf_counter()
        for i in indices:
            dataset[i]
        total.append((time.perf_counter() - start) / len(indices))
    print(f"{fmt.num_shards(COUNT, SHARD)} shards of {SHARD}, latents {LATENT}, {root}")
    print(f"  open LatentsDataset (2 headers + sizes per shard): first {opens[0]:.2f} s, again {opens[1]:.2f} s")
    print(f"  per item: check {statistics.median(check) * 1e6:.1f} us of a __getitem__ of "
          f"{statistics.median(total) * 1e6:.1f} us")  # fmt: skip


if __name__ == "__main__":
    main()
