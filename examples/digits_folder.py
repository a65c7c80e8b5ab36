"""A folder of small images to train on, without a download: scikit-learn's bundled handwritten digits written out
as PNGs, one sub-folder per class (the layout `train.py --data-path` reads, like ImageNet's), and the same images
as an ADM reference batch for `disploss evaluate`.

    python examples/digits_folder.py data/digits        # data/digits/train/{0..9}/*.png, data/digits/reference.npz

Step 1 of the small-run recipe in docs/quickstart.md; with a folder of your own, skip it and make the reference
batch with `--reference-from DIR` (every image of DIR's class folders, centre-cropped to --size).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_digits(out: Path, per_class: int, size: int) -> tuple[Path, int]:
    """The first `per_class` digits of each class as `out/train/{label}/{i:04d}.png` (RGB, `size` px); returns
    (the train folder, the number of images)."""
    import numpy as np
    from PIL import Image

    from disploss.data import digits_arrays

    images, labels = digits_arrays(image_size=size, channels=3)  # (N, H, W, 3) uint8, (N,)
    train = out / "train"
    count = 0
    for label in range(10):
        folder = train / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
            count += 1
    return train, count


def write_reference(folder: Path, path: Path, size: int) -> int:
    """Every image of `folder`'s class folders, centre-cropped (ADM's crop) to `size`, as the reference batch
    `path` (arr_0: uint8 (N, size, size, 3)); returns N."""
    import numpy as np

    from disploss.data import read_image, scan_image_folder
    from disploss.evaluation import save_samples_npz

    paths = [p for p, _ in scan_image_folder(str(folder))[1]]
    save_samples_npz(path, np.stack([read_image(p, size) for p in paths]))
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (train/ and reference.npz inside)")
    parser.add_argument("--per-class", type=int, default=50, help="images per digit (up to ~180; default: 50)")
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (the digits' own: 8)")
    parser.add_argument("--reference-from", type=Path, default=None, metavar="DIR",
                        help="write only reference.npz, from the class folders of DIR (your own data)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference_from is None:
        train, count = write_digits(args.out, args.per_class, args.size)
        print(f"wrote {count} PNGs of {args.size}x{args.size} in 10 class folders under {train}")
    source = args.reference_from or args.out / "train"
    n = write_reference(source, args.out / "reference.npz", args.size)
    print(f"wrote {args.out / 'reference.npz'}: the {n} images of {source} (the reference batch of disploss evaluate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
