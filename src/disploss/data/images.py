"""Image folders (torchvision's ImageFolder layout, ADM centre crop) and image decoding.

Every dataset of this package returns `(x, y)`: `x` a float32 tensor, `y` an int label. Random choices
(horizontal flip, posterior noise) use torch's global RNG inside `__getitem__`, so DataLoader worker seeding
applies, and every dataset pickles cheaply (no open files, no decoded images) for DataLoader workers.

Image folders follow torchvision's ImageFolder layout and ordering, `root/<class>/**/<image>`, without
importing torchvision: classes are the sub-folders of `root` in sorted order (label = position), and the
images of a class are listed folder by folder (folders sorted by path, files sorted by name), following
symbolic links. Two deliberate differences, both of which only matter for folders ImageFolder would
mishandle: hidden entries (names starting with ".", e.g. `.ipynb_checkpoints` or macOS `._x.jpg` files) are
ignored, and symbolic-link cycles are visited once instead of looping forever.
"""

from __future__ import annotations

import operator
import os
import struct
import time
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image

from disploss.errors import ConfigError, MissingFileError

# The extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

BadImagePolicy = Literal["skip", "error"]
AlphaPolicy = Literal["white", "drop"]
BAD_IMAGE_POLICIES = ("skip", "error")
ALPHA_POLICIES = ("white", "drop")

# What a broken, truncated or mislabelled file raises while Pillow opens and decodes it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

# Images above this many pixels (about 5800 x 5800) are large: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size
# (libjpeg's DCT scaling, which stands for the crop's first halvings), and ImageFolderDataset keeps their crops.
LARGE_IMAGE_PIXELS = 1 << 25
LARGE_CROP_CACHE_BYTES = 256 << 20  # per process


class UnreadableImageError(ConfigError):
    """An image file could not be opened or decoded (raised with on_bad_image="error"); names the file."""


class BadImageWarning(UserWarning):
    """An unreadable image file was skipped (on_bad_image="skip"); the message names the file."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError unless value is one of choices."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
        raise ConfigError(f"image_size must be positive, got {image_size}")
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
    check_choice("alpha", alpha, ALPHA_POLICIES)
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
        raise ConfigError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from e


def read_image(path: str | os.PathLike, image_size: int, alpha: AlphaPolicy = "white") -> np.ndarray:
    """Open, decode, convert to RGB and ADM-centre-crop one image file.

    A JPEG of more than LARGE_IMAGE_PIXELS is decoded at a reduced size (see `_draft_large_jpeg`): a 13000 x 13000
    photo then takes 0.1 s and 20 MB instead of 1.4 s and 1.1 GB (2-core CPU), and its crop differs from the full
    decode's by rounding only (measured: at most 4 levels, 1.1 on average, on a 13000^2 JPEG). Every other
    image is fully decoded, so its crop is exactly the reference's.

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
    return _read_image(path, image_size, alpha)[0]


def _read_image(path, image_size: int, alpha: AlphaPolicy) -> tuple[np.ndarray, bool]:
    # (the crop, whether the file is large).
    with Image.open(path) as image:
        large = image.width * image.height > LARGE_IMAGE_PIXELS
        if large:
            _draft_large_jpeg(image, image_size)
        image.load()  # decode now, inside the with-block, so a truncated file fails here
        rgb = to_rgb(image, alpha)
        return np.asarray(center_crop_arr(rgb, image_size), dtype=np.uint8).copy(), large  # H W 3


def _draft_large_jpeg(image: Image.Image, image_size: int) -> None:
    """Let libjpeg decode a JPEG at 1/2^k of its size, k the number of halvings the ADM crop makes (at most 3).

    libjpeg's scaled inverse DCT averages each 2^k x 2^k block as the crop's BOX halvings do, up to rounding
    (and the ceiling instead of the floor of odd sides); the halvings left and the bicubic resize then run on
    the smaller image as usual.
    """
    if image.format != "JPEG":
        return
    k, side = 0, min(image.size)
    while side >= 2 * image_size and k < 3:
        side //= 2
        k += 1
    if k:
        image.draft(None, (image.width >> k, image.height >> k))


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
    raise ConfigError(f"cannot read folder {err.filename}: {err.strerror or err}") from err


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
        raise MissingFileError(f"dataset folder {root_s} does not exist")
    if not os.path.isdir(root_s):
        raise ConfigError(f"dataset path {root_s} is not a folder (expected {root_s}/<class>/<image>)")
    try:
        with os.scandir(root_s) as it:
            entries = list(it)
    except OSError as e:
        raise ConfigError(f"cannot read dataset folder {root_s}: {e.strerror or e}") from e
    classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    if not classes:
        loose = sum(1 for e in entries if _is_image_file(e.name))
        hint = f" ({loose} image files sit directly in it)" if loose else " (it is empty)" if not entries else ""
        raise ConfigError(
            f"dataset folder {root_s} has no class sub-folders{hint}; expected the ImageFolder layout "
            f"{root_s}/<class>/<image>"
        )
    if num_classes is not None and len(classes) > num_classes:
        raise ConfigError(
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
        raise ConfigError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {root_s}")
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise ConfigError(f"class folders without image files under {root_s}: {shown}")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class-labelled images with the reference's transform: ADM centre crop, random flip, [-1, 1].

    Unreadable files (truncated, not an image, unsupported mode) are handled by `on_bad_image`: "error"
    raises `UnreadableImageError` naming the file; "skip" warns once per file (`BadImageWarning`, per
    process: each DataLoader worker warns for itself) and returns the next readable sample in index order
    instead, so batches keep their shape and the substitution is deterministic; after `log_skips_to(path)` each
    such warning is also appended to that file (a training run's log.txt), from every process and loader worker.
    If no file is readable an error is raised after one pass, never a hang.

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
        check_choice("on_bad_image", on_bad_image, BAD_IMAGE_POLICIES)
        check_choice("alpha", alpha, ALPHA_POLICIES)
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
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
        self.skip_log: str | None = None  # a file that also gets each skip warning (log_skips_to)
        # Crops of large images (more than LARGE_IMAGE_PIXELS), decoded once per process: the crop is the same
        # every epoch (the flip comes after it). Up to LARGE_CROP_CACHE_BYTES, then large images are decoded again.
        self._large: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def log_skips_to(self, path: str | os.PathLike | None) -> None:
        """Also append each skip warning, as one timestamped line, to `path` (None: stderr only). The file is
        opened per line in append mode, so it works in every DataLoader worker and process of a run."""
        self.skip_log = None if path is None else os.fspath(path)

    def _log_skip(self, message: str) -> None:
        if self.skip_log is None:
            return
        from disploss.fileio import LineFile

        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        who = f" (process {rank})" if rank is not None else ""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] WARNING{who}: {message}\n"
        try:
            log = LineFile(self.skip_log)
            try:
                log.write(line)
            finally:
                log.close()
        except OSError:
            pass  # the warning reached stderr; a full disk stops the run at its own next write of the log

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
            if j in self._large:
                return self._large[j].copy(), label, j
            try:
                arr, large = _read_image(path, self.image_size, self.alpha)
                if large and (len(self._large) + 1) * arr.nbytes <= LARGE_CROP_CACHE_BYTES:
                    self._large[j] = arr.copy()
                return arr, label, j
            except _DECODE_ERRORS as e:
                if self.on_bad_image == "error":
                    raise UnreadableImageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e
                self._bad.add(j)
                first_error = first_error or e
                message = (
                    f"skipping unreadable image file {path} ({type(e).__name__}: {e}); the next readable image "
                    "takes its place"
                )
                warnings.warn(message, BadImageWarning, stacklevel=3)
                self._log_skip(message)
        raise UnreadableImageError(f"no readable image file under {self.root}") from first_error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr, label, _ = self.load(index)
        x = uint8_to_unit(arr)  # 3 S S
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x, label
