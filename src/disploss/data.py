"""Datasets: ImageNet-style image folders (ADM centre crop), the bundled digits, and cached VAE latents.

Every dataset returns `(x, y)`: `x` a float32 tensor, `y` an int label. Random choices (horizontal flip,
posterior noise) use torch's global RNG inside `__getitem__`, so DataLoader worker seeding applies, and every
dataset pickles cheaply (no open files, no decoded images) for DataLoader workers.

Image folders follow torchvision's ImageFolder layout and ordering, `root/<class>/**/<image>`, without
importing torchvision: classes are the sub-folders of `root` in sorted order (label = position), and the
images of a class are listed folder by folder (folders sorted by path, files sorted by name), following
symbolic links. Two deliberate differences, both of which only matter for folders ImageFolder would
mishandle: hidden entries (names starting with ".", e.g. `.ipynb_checkpoints` or macOS `._x.jpg` files) are
ignored, and symbolic-link cycles are visited once instead of looping forever.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import struct
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

BadImagePolicy = Literal["skip", "error"]
AlphaPolicy = Literal["white", "drop"]
DigitsSplit = Literal["all", "train", "holdout"]
_BAD_IMAGE_POLICIES = ("skip", "error")
_ALPHA_POLICIES = ("white", "drop")
_DIGITS_SPLITS = ("all", "train", "holdout")

# What a broken, truncated or mislabelled file raises while Pillow opens and decodes it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An image file could not be opened or decoded (raised with on_bad_image="error"); names the file."""


class BadImageWarning(UserWarning):
    """An unreadable image file was skipped (on_bad_image="skip"); the message names the file."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Image decoding


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """The ADM centre crop used by the reference training script.

    While the short side is at least 2 * image_size the image is halved (each side floor-divided by 2) with a
    BOX filter; then it is resized with BICUBIC so that the short side equals image_size (the long side is
    rounded), which also upscales images smaller than the crop; finally the central image_size x image_size
    square is cut out (offsets floor((side - image_size) / 2)).

    Args:
        pil_image: any PIL image (convert to RGB first, as the reference's loader does).
        image_size: side S of the square output.
    Returns:
        A new PIL image of size (S, S), same mode as the input.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image = pil_image
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_GREY_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth greyscale array to 0..255.

    Pillow's own convert("L") clips these modes at 255, which turns most 16-bit images white. The range is
    read from the mode where it is known and guessed from the values where it is not:
      I;16*: 0..65535.
      I (32-bit int, what older Pillow opened 16-bit PNGs as): 0..65535 if any value exceeds 255, else 0..255.
      F (32-bit float): 0..1 if all values lie in [0, 1], else 0..255 if none exceeds 255, else 0..65535.
    """
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "I":
        top = 65535.0 if a.size and a.max() > 255 else 255.0
    else:  # "F"
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            top = 1.0
        elif not a.size or a.max() <= 255.0:
            top = 255.0
        else:
            top = 65535.0
    a = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, alpha: AlphaPolicy = "white") -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit RGB.

    Handled modes: RGB (returned as is), 1, L, P (with or without transparency), CMYK, YCbCr, HSV,
    high-bit-depth greyscale (I;16 variants, I, F: rescaled to 0..255, see `_grey_to_uint8`, instead of
    Pillow's clipping), and every mode with transparency (RGBA, LA, PA, RGBa, La, and P/L/RGB with a
    transparency key).

    Args:
        image: the decoded image (call .load() first for files).
        alpha: how transparency is removed. "white" composites the image over a white background (what a
            viewer shows); "drop" discards the alpha channel and keeps the stored colours, which is what the
            reference's torchvision loader (`img.convert("RGB")`) does.
    Returns:
        An RGB image (possibly `image` itself when it already is RGB without transparency).
    Raises:
        ValueError: for a mode Pillow cannot convert to RGB (e.g. LAB).
    """
    _check_choice("alpha", alpha, _ALPHA_POLICIES)
    mode = image.mode
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if mode == "RGB" and not has_alpha:
        return image
    if mode in _HIGH_DEPTH_GREY_MODES:
        grey = _grey_to_uint8(np.asarray(image), mode)
        return Image.fromarray(grey).convert("RGB")  # grey is (H, W) uint8, i.e. mode L
    try:
        if not has_alpha:
            return image.convert("RGB")
        # Going through RGBA also avoids Pillow's warning about palette transparency given as bytes.
        rgba = image.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from e


def read_image(path: str | os.PathLike, image_size: int, alpha: AlphaPolicy = "white") -> np.ndarray:
    """Open, fully decode, convert to RGB and ADM-centre-crop one image file.

    Args:
        path: the image file (the first frame of animated or multi-page files is used; EXIF orientation is
            ignored, as by the reference's loader).
        image_size: side S of the crop.
        alpha: transparency policy of `to_rgb`.
    Returns:
        uint8 array (S, S, 3).
    Raises:
        OSError, SyntaxError, ValueError, ...: whatever Pillow raises for an unreadable file (truncated files
        fail: this never sets ImageFile.LOAD_TRUNCATED_IMAGES).
    """
    with Image.open(path) as image:
        image.load()  # decode now, inside the with-block, so a truncated file fails here
        rgb = to_rgb(image, alpha)
        return np.asarray(center_crop_arr(rgb, image_size), dtype=np.uint8).copy()  # H W 3


def uint8_to_unit(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HWC image(s) -> float32 CHW tensor in [-1, 1], computed as ToTensor then Normalize(0.5, 0.5).

    Args:
        arr: uint8 (..., H, W, C).
    Returns:
        float32 (..., C, H, W).
    """
    x = torch.as_tensor(arr).movedim(-1, -3).to(torch.float32) / 255.0  # ... C H W
    return (x - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------------------
# Image folders


def _raise_unreadable(err: OSError) -> None:
    raise ValueError(f"cannot read folder {err.filename}: {err.strerror or err}") from err


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan_class_folder(folder: str) -> list[str]:
    """The image files under `folder`, in ImageFolder's order: folders sorted by path, files by name."""
    seen = {os.path.realpath(folder)}
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_raise_unreadable):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith(".") or real in seen:  # hidden, or a symlink cycle / repeated target
                continue
            seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        found.append((dirpath, sorted(f for f in filenames if _is_image_file(f))))
    found.sort(key=lambda item: item[0])
    return [os.path.join(dirpath, f) for dirpath, files in found for f in files]


def scan_image_folder(
    root: str | os.PathLike, num_classes: int | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """List the classes and (path, label) samples of an ImageFolder-style tree.

    Args:
        root: folder holding one sub-folder per class.
        num_classes: if given, the number of class folders may not exceed it.
    Returns:
        (class_names sorted, samples as (file path, label) in ImageFolder order).
    Raises:
        FileNotFoundError: `root` does not exist.
        ValueError: `root` is not a folder or cannot be read; it has no class sub-folders (e.g. the images
            sit directly in it); there are more classes than num_classes; a class folder, or the whole
            tree, holds no image file. Every message names the folder.
    """
    root_s = os.fspath(root)
    if not os.path.exists(root_s):
        raise FileNotFoundError(f"dataset folder {root_s} does not exist")
    if not os.path.isdir(root_s):
        raise ValueError(f"dataset path {root_s} is not a folder (expected {root_s}/<class>/<image>)")
    try:
        with os.scandir(root_s) as it:
            entries = list(it)
    except OSError as e:
        raise ValueError(f"cannot read dataset folder {root_s}: {e.strerror or e}") from e
    classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if _is_image_file(e.name))
        hint = f" ({loose} image files sit directly in it)" if loose else " (it is empty)" if not entries else ""
        raise ValueError(
            f"dataset folder {root_s} has no class sub-folders{hint}; expected the ImageFolder layout "
            f"{root_s}/<class>/<image>"
        )
    if num_classes is not None and len(classes) > num_classes:
        raise ValueError(
            f"dataset folder {root_s} has {len(classes)} class folders but --num-classes is {num_classes}"
        )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = _scan_class_folder(os.path.join(root_s, name))
        if not files:
            empty.append(name)
        samples.extend((f, label) for f in files)
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {root_s}")
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ValueError(f"class folders without image files under {root_s}: {shown}")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class-labelled images with the reference's transform: ADM centre crop, random flip, [-1, 1].

    Unreadable files (truncated, not an image, unsupported mode) are handled by `on_bad_image`: "error"
    raises `UnreadableImageError` naming the file; "skip" warns once per file (`BadImageWarning`, per
    process: each DataLoader worker warns for itself) and returns the next readable sample in index order
    instead, so batches keep their shape and the substitution is deterministic. If no file is readable an
    error is raised after one pass, never a hang.

    Args:
        root: ImageFolder-style folder (see `scan_image_folder` for the errors it raises).
        image_size: side S of the centre crop.
        num_classes: the number of classes the model has; more class folders than that is an error.
        on_bad_image: "skip" or "error".
        flip: random horizontal flip with probability 0.5 (torch RNG), after the crop as in the reference.
        alpha: transparency policy, see `to_rgb` ("drop" is the reference's behaviour).
    Items:
        (x float32 (3, S, S) in [-1, 1], y int label).
    Attributes:
        classes (sorted folder names), class_to_idx, samples [(path, label)], targets, num_classes (the
        argument, or the number of class folders).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        num_classes: int | None = None,
        on_bad_image: BadImagePolicy = "skip",
        flip: bool = True,
        alpha: AlphaPolicy = "white",
    ):
        _check_choice("on_bad_image", on_bad_image, _BAD_IMAGE_POLICIES)
        _check_choice("alpha", alpha, _ALPHA_POLICIES)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        self.on_bad_image = on_bad_image
        self.flip = bool(flip)
        self.alpha = alpha
        self.classes, self.samples = scan_image_folder(self.root, num_classes)
        self.num_classes = len(self.classes) if num_classes is None else int(num_classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [label for _, label in self.samples]
        self._bad: set[int] = set()  # indices found unreadable in this process

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int, int]:
        """Decode sample `index`, or with on_bad_image="skip" the next readable one.

        Returns:
            (uint8 array (S, S, 3), label, index of the sample actually read).
        """
        n = len(self.samples)
        index = operator.index(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        first_error: BaseException | None = None
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            path, label = self.samples[j]
            try:
                return read_image(path, self.image_size, self.alpha), label, j
            except _DECODE_ERRORS as e:
                if self.on_bad_image == "error":
                    raise UnreadableImageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
                self._bad.add(j)
                first_error = first_error or e
                warnings.warn(
                    f"skipping unreadable image file {path} ({type(e).__name__}: {e}); the next readable "
                    "image takes its place",
                    BadImageWarning,
                    stacklevel=3,
                )
        raise UnreadableImageError(f"no readable image file under {self.root}") from first_error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr, label, _ = self.load(index)
        x = uint8_to_unit(arr)  # 3 S S
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, label


# ----------------------------------------------------------------------------------------------------------
# Bundled digits (the laptop demo)


@functools.lru_cache(maxsize=8)
def _digits_arrays_cached(image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # optional dependency, bundled data (no download)

    digits = load_digits()
    img = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # B 1 8 8, in [0, 1]
    if image_size != img.shape[-1]:
        img = F.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False,
                            antialias=image_size < img.shape[-1])  # B 1 H W
    u8 = (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    x = u8.permute(0, 2, 3, 1).expand(-1, -1, -1, channels).contiguous()  # B H W C
    return x.numpy(), digits.target.astype(np.int64)


def digits_arrays(image_size: int = 16, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), resized and as uint8.

    The 0..16 intensities are scaled to [0, 1], resized bilinearly (antialiased when shrinking) to
    image_size, rounded to 0..255; the grey channel is replicated `channels` times. White digits on black.

    Args:
        image_size: output side H = W.
        channels: 1 or 3.
    Returns:
        (x uint8 (N, H, W, C), y int64 (N,) in 0..9), N = 1797; fresh arrays the caller may modify.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    x, y = _digits_arrays_cached(int(image_size), int(channels))
    return x.copy(), y.copy()


def split_indices(n: int, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random split of range(n) into train and held-out indices.

    Args:
        n: number of items.
        holdout_fraction: share of items held out, in [0, 1); round(n * fraction) items.
        seed: seed of the permutation (numpy default_rng), the same split for the same (n, fraction, seed).
    Returns:
        (train indices, holdout indices), both sorted int64 arrays, disjoint, together range(n).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in [0, 1), got {holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_fraction))
    return np.sort(perm[n_hold:]).astype(np.int64), np.sort(perm[:n_hold]).astype(np.int64)


class DigitsDataset(torch.utils.data.Dataset):
    """The bundled digits as a pixel-space dataset for the CPU demo.

    Args:
        image_size: side S.
        split: "all", "train" or "holdout" (see `split_indices`).
        holdout_fraction, seed: the split.
        channels: 3 (grey replicated, the default) or 1.
        flip: random horizontal flip (off by default: a mirrored digit is not a digit).
    Items:
        (x float32 (C, S, S) in [-1, 1], y int in 0..9).
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        split: DigitsSplit = "all",
        holdout_fraction: float = 0.2,
        seed: int = 0,
        channels: int = 3,
        flip: bool = False,
    ):
        _check_choice("split", split, _DIGITS_SPLITS)
        x, y = digits_arrays(image_size, channels)
        if split != "all":
            train, holdout = split_indices(len(y), holdout_fraction, seed)
            keep = train if split == "train" else holdout
            x, y = x[keep], y[keep]
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.split = split
        self.flip = bool(flip)
        self.x = uint8_to_unit(x)  # N C S S
        self.y = torch.from_numpy(y)
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.x[index]
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, int(self.y[index])


# ----------------------------------------------------------------------------------------------------------
# Cached latents (written by `disploss extract-latents`)
#
# Format of a cache folder (version 1):
#   plan.json                 the settings of the extraction, written first (a rerun must match it)
#   moments_{k:06d}.npy       shard k: float32 or float16 (n, 2, 2, C, h, w) = [image, flipped image] x
#                             [posterior mean, posterior std], for dataset indices [k * shard_size, ...)
#   labels_{k:06d}.npy        shard k: int64 (n,)
#   manifest.json             written last, only once every shard exists: the cache is complete

LATENT_FORMAT = "disploss-latents"
LATENT_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"


def moments_name(shard: int) -> str:
    """File name of the posterior moments of shard `shard`."""
    return f"moments_{shard:06d}.npy"


def labels_name(shard: int) -> str:
    """File name of the labels of shard `shard`."""
    return f"labels_{shard:06d}.npy"


def num_shards(count: int, shard_size: int) -> int:
    """Number of shards holding `count` items, `shard_size` per shard (the last one may be shorter)."""
    return -(-count // shard_size)


def shard_length(shard: int, count: int, shard_size: int) -> int:
    """Number of items in shard `shard`."""
    return min(shard_size, count - shard * shard_size)


def missing_shards(root: str | os.PathLike, count: int, shard_size: int) -> list[int]:
    """Shards of a cache whose moments or labels file is absent."""
    root = Path(root)
    return [
        k for k in range(num_shards(count, shard_size))
        if not (root / moments_name(k)).is_file() or not (root / labels_name(k)).is_file()
    ]


class LatentsDataset(torch.utils.data.Dataset):
    """Stochastic SD-VAE latents from a cache, without running the encoder.

    Each item draws, like the reference's `vae.encode(x).latent_dist.sample() * scale` on a randomly flipped
    image: the original or the flipped image with probability 0.5 each, then
        z = (mean + std * eps - shift) * scale,   eps ~ N(0, I),
    with torch's RNG. The shards are memory-mapped on first use in each process (DataLoader workers share
    the page cache; nothing is loaded up front).

    Args:
        root: a folder written by `disploss extract-latents`.
        flip: draw the flipped image's moments half of the time (the reference's random flip).
        sample: draw a posterior sample (the reference); False returns mean * scale (shifted likewise).
    Items:
        (z float32 (C, h, w), y int).
    Attributes:
        manifest (dict), image_size, latent_shape (C, h, w), scale, shift, num_classes, class_names, vae.
    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the folder is not a complete cache; the message names what is missing.
    """

    def __init__(self, root: str | os.PathLike, flip: bool = True, sample: bool = True):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"latent cache folder {self.root} does not exist")
        manifest_path = os.path.join(self.root, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise ValueError(self._incomplete_message())
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("format") != LATENT_FORMAT or manifest.get("version") != LATENT_FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} is not a {LATENT_FORMAT} version {LATENT_FORMAT_VERSION} manifest "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
            )
        self.manifest = manifest
        self.count = int(manifest["count"])
        self.shard_size = int(manifest["shard_size"])
        missing = missing_shards(self.root, self.count, self.shard_size)
        if missing:
            raise ValueError(
                f"latent cache {self.root} is incomplete although its manifest exists: "
                f"{self._describe_missing(missing)}; rerun disploss extract-latents with the same arguments"
            )
        self.image_size = int(manifest["image_size"])
        self.latent_shape = tuple(int(s) for s in manifest["latent_shape"])
        self.scale = float(manifest["scale"])
        self.shift = float(manifest.get("shift", 0.0))
        self.num_classes = int(manifest["num_classes"])
        self.class_names = list(manifest["class_names"])
        self.vae = manifest["vae"]
        self.flip = bool(flip)
        self.sample = bool(sample)
        self._moments: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}

    def _describe_missing(self, missing: list[int]) -> str:
        names = [n for k in missing[:5] for n in (moments_name(k), labels_name(k))
                 if not os.path.isfile(os.path.join(self.root, n))]
        more = f" and files of {len(missing) - 5} more shards" if len(missing) > 5 else ""
        return f"missing {', '.join(names)}{more}"

    def _incomplete_message(self) -> str:
        plan_path = os.path.join(self.root, PLAN_NAME)
        if not os.path.isfile(plan_path):
            return (f"{self.root} is not a latent cache: it has no {MANIFEST_NAME} "
                    f"(write one with disploss extract-latents --out {self.root})")
        with open(plan_path) as f:
            plan = json.load(f)
        count, shard_size = int(plan["count"]), int(plan["shard_size"])
        missing = missing_shards(self.root, count, shard_size)
        total = num_shards(count, shard_size)
        detail = f"{total - len(missing)} of {total} shards present"
        if missing:
            detail += f", {self._describe_missing(missing)}"
        return (f"latent cache {self.root} is incomplete: {MANIFEST_NAME} is missing ({detail}); "
                "rerun disploss extract-latents with the same arguments to finish it")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_moments"], state["_labels"] = {}, {}  # memory maps are reopened in each worker
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._moments:
            n = shard_length(k, self.count, self.shard_size)
            mpath = os.path.join(self.root, moments_name(k))
            lpath = os.path.join(self.root, labels_name(k))
            moments = np.load(mpath, mmap_mode="r")
            labels = np.load(lpath, mmap_mode="r")
            if moments.shape != (n, 2, 2, *self.latent_shape) or labels.shape != (n,):
                raise ValueError(
                    f"latent cache shard {mpath} has shape {moments.shape} and {lpath} {labels.shape}; "
                    f"expected {(n, 2, 2, *self.latent_shape)} and {(n,)}"
                )
            self._moments[k], self._labels[k] = moments, labels
        return self._moments[k], self._labels[k]

    def __len__(self) -> int:
        return self.count

    def moments(self, index: int) -> tuple[torch.Tensor, int]:
        """The stored moments of one item.

        Returns:
            (float32 (2, 2, C, h, w) = [image, flipped] x [mean, std], label).
        """
        index = operator.index(index)
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for a cache of {self.count} items")
        index %= self.count
        moments, labels = self._shard(index // self.shard_size)
        j = index % self.shard_size
        return torch.from_numpy(np.array(moments[j], dtype=np.float32)), int(labels[j])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        m, label = self.moments(index)  # 2 2 C h w
        view = int(torch.rand(1).item() < 0.5) if self.flip else 0
        mean, std = m[view, 0], m[view, 1]  # C h w
        z = mean + std * torch.randn(mean.shape) if self.sample else mean
        return (z - self.shift) * self.scale, label
