"""Image folders (data/images.py): the ADM crop, mode conversion, bad files, folder errors, and very large images (a
JPEG of more than LARGE_IMAGE_PIXELS decoded at a reduced size, its ADM crop equal to the full decode's up to
rounding; any large image decoded once per process, not on every read); and the bundled digits.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import disploss.data.images as images_module
from disploss.data import (
    BadImageWarning,
    DigitsDataset,
    ImageFolderDataset,
    UnreadableImageError,
    center_crop_arr,
    digits_arrays,
    read_image,
    scan_image_folder,
    split_indices,
    to_rgb,
)


def noise_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def save(img, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


# ---------------------------------------------------------------------------------------------------------
# ADM centre crop


def test_center_crop_halves_with_box_then_bicubic():
    img = noise_image(1000, 700)
    # By hand for S = 64: halve while the short side >= 128: 700 -> 350 -> 175 -> 87 (widths 500, 250, 125),
    # then bicubic to short side 64: width round(125 * 64 / 87) = 92, then crop x offset (92 - 64) // 2 = 14.
    expected = (
        img.resize((500, 350), Image.BOX)
        .resize((250, 175), Image.BOX)
        .resize((125, 87), Image.BOX)
        .resize((92, 64), Image.BICUBIC)
        .crop((14, 0, 78, 64))
    )
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_center_crop_upscales_small_images():
    img = noise_image(10, 20)
    # Short side 10 -> 16 (scale 1.6): 16 x 32, then crop rows (32 - 16) // 2 = 8 .. 24.
    expected = img.resize((16, 32), Image.BICUBIC).crop((0, 8, 16, 24))
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 16)), np.asarray(expected))


@pytest.mark.parametrize("size,halvings", [(16, 0), (31, 0), (32, 1), (63, 1), (64, 2)])
def test_center_crop_square_halving_threshold(size, halvings):
    img = noise_image(size, size)
    expected = img
    for _ in range(halvings):
        expected = expected.resize((expected.width // 2, expected.height // 2), Image.BOX)
    expected = expected.resize((16, 16), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 16)), np.asarray(expected))


def test_center_crop_of_exact_size_is_identity():
    img = noise_image(16, 16)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 16)), np.asarray(img))


# ---------------------------------------------------------------------------------------------------------
# Mode conversion


def grey_array(value, dtype):
    return np.full((4, 5), value, dtype=dtype)


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: Image.fromarray(grey_array(100, np.uint8)), (100, 100, 100)),  # L
        (lambda: Image.fromarray(grey_array(257 * 100, np.uint16)), (100, 100, 100)),  # I;16
        (lambda: Image.fromarray(grey_array(65535, np.uint16)), (255, 255, 255)),  # I;16, full scale
        (lambda: Image.fromarray(grey_array(257 * 200, np.int32), "I"), (200, 200, 200)),  # I holding 16 bits
        (lambda: Image.fromarray(grey_array(50, np.int32), "I"), (50, 50, 50)),  # I holding 8 bits
        (lambda: Image.fromarray(grey_array(0.5, np.float32), "F"), (128, 128, 128)),  # F in [0, 1]
        (lambda: Image.fromarray(grey_array(30.0, np.float32), "F"), (30, 30, 30)),  # F in [0, 255]
        (lambda: Image.new("1", (5, 4), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("CMYK", (5, 4), (255, 0, 0, 0)), (0, 255, 255)),
        (lambda: Image.new("RGBA", (5, 4), (200, 10, 20, 255)), (200, 10, 20)),
        (lambda: Image.new("RGBA", (5, 4), (200, 10, 20, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("LA", (5, 4), (40, 255)), (40, 40, 40)),
        (lambda: Image.new("LA", (5, 4), (40, 0)), (255, 255, 255)),
        (lambda: Image.new("YCbCr", (5, 4), (255, 128, 128)), (255, 255, 255)),
    ],
)
def test_to_rgb_modes(make, expected):
    img = make()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)
    assert np.asarray(out)[0, 0].tolist() == list(expected)


def test_to_rgb_half_transparent_composite_and_drop():
    img = Image.new("RGBA", (2, 2), (200, 0, 0, 128))
    white = np.asarray(to_rgb(img, "white"))[0, 0].astype(int)
    # alpha 128/255 of (200, 0, 0) over (255, 255, 255)
    a = 128 / 255
    np.testing.assert_allclose(white, [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1)
    assert np.asarray(to_rgb(img, "drop"))[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ValueError, match="'white', 'drop'"):
        to_rgb(img, "black")


def test_to_rgb_palette_with_transparency():
    img = Image.new("P", (3, 2), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [10, 200, 30]
    img.info["transparency"] = 1  # palette entry 1 fully transparent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about palette transparency either
        assert np.asarray(to_rgb(img, "white"))[0, 0].tolist() == [255, 255, 255]
        assert np.asarray(to_rgb(img, "drop"))[0, 0].tolist() == [10, 200, 30]


@pytest.mark.parametrize(
    "name,make,expected",
    [
        ("grey.png", lambda: Image.fromarray(grey_array(90, np.uint8)), [90] * 3),
        ("grey16.png", lambda: Image.fromarray(grey_array(257 * 90, np.uint16)), [90] * 3),
        ("float.tif", lambda: Image.fromarray(grey_array(0.2, np.float32), "F"), [51] * 3),
        ("rgba.png", lambda: Image.new("RGBA", (5, 4), (1, 2, 3, 0)), [255] * 3),
        ("cmyk.jpg", lambda: Image.new("CMYK", (5, 4), (0, 0, 0, 0)), [255] * 3),
        ("palette.png", lambda: Image.new("P", (5, 4), 0), [0] * 3),
        ("palette.gif", lambda: Image.new("P", (5, 4), 0), [0] * 3),
    ],
)
def test_read_image_files_of_every_mode(tmp_path, name, make, expected):
    path = save(make(), tmp_path / name)
    arr = read_image(path, 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), expected, atol=2)


# ---------------------------------------------------------------------------------------------------------
# Image folders


def make_folder(root, classes=("cat", "dog"), per_class=2, size=(20, 12)):
    for c, name in enumerate(classes):
        for i in range(per_class):
            save(noise_image(*size, seed=10 * c + i), root / name / f"{i}.png")
    return root


def test_dataset_items_and_labels(tmp_path):
    make_folder(tmp_path, classes=("b", "a", "c"), per_class=2)
    ds = ImageFolderDataset(tmp_path, 8, num_classes=3, flip=False)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 6
    assert ds.targets == [0, 0, 1, 1, 2, 2]
    x, y = ds[2]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    assert -1 <= x.min() and x.max() <= 1
    arr = np.array(center_crop_arr(Image.open(tmp_path / "b" / "0.png").convert("RGB"), 8))
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    assert len(pickle.loads(pickle.dumps(ds))) == 6


def test_random_flip_uses_torch_rng(tmp_path):
    make_folder(tmp_path, classes=("a",), per_class=1)
    ds = ImageFolderDataset(tmp_path, 8)
    plain, _ = ImageFolderDataset(tmp_path, 8, flip=False)[0]
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(200)]
    flipped = sum(torch.equal(d, plain.flip(-1)) for d in draws)
    assert sum(torch.equal(d, plain) for d in draws) + flipped == 200
    assert 70 < flipped < 130
    torch.manual_seed(0)
    assert all(torch.equal(a, ds[0][0]) for a in draws[:10])


def test_scan_order_matches_image_folder_rules(tmp_path):
    make_folder(tmp_path, classes=("x",), per_class=1)
    save(noise_image(4, 4), tmp_path / "x" / "sub" / "deep.JPG")
    save(noise_image(4, 4), tmp_path / "x" / "sub" / "deeper" / "1.png")
    save(noise_image(4, 4), tmp_path / "x" / "sub-b" / "0.webp")
    save(noise_image(4, 4), tmp_path / "x" / ".hidden" / "0.png")
    save(noise_image(4, 4), tmp_path / "x" / "._junk.png")
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    os.symlink(tmp_path / "x", tmp_path / "x" / "sub" / "loop")  # a cycle must not hang the scan
    classes, samples = scan_image_folder(tmp_path)
    assert classes == ["x"]
    rel = [os.path.relpath(p, tmp_path) for p, _ in samples]
    # folders sorted by path string ("x/sub" < "x/sub-b" < "x/sub/deeper"), files by name, as torchvision
    assert rel == ["x/0.png", "x/sub/deep.JPG", "x/sub-b/0.webp", "x/sub/deeper/1.png"]


def test_scan_agrees_with_torchvision(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    make_folder(tmp_path, classes=("n02", "n01", "N03"), per_class=2)
    save(noise_image(4, 4), tmp_path / "n01" / "z" / "a.jpeg")
    save(noise_image(4, 4), tmp_path / "n01" / "z-y" / "b.bmp")
    save(noise_image(4, 4), tmp_path / "n01" / "z" / "w" / "c.PNG")
    classes, samples = scan_image_folder(tmp_path)
    ref = datasets.ImageFolder(str(tmp_path))
    assert classes == ref.classes and samples == ref.samples


@pytest.fixture
def folder_with_bad_files(tmp_path):
    save(noise_image(16, 16, seed=1), tmp_path / "a" / "0_good.png")
    buf = io.BytesIO()
    noise_image(32, 32, seed=2).save(buf, format="JPEG", quality=90)
    (tmp_path / "a" / "1_trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "a" / "2_text.png").write_text("this is not a png\n")
    save(noise_image(16, 16, seed=3), tmp_path / "a" / "3_good.png")
    save(noise_image(16, 16, seed=4), tmp_path / "b" / "0_good.png")
    (tmp_path / "b" / "1_empty.png").write_bytes(b"")
    return tmp_path


def test_bad_files_skipped_with_one_warning_each(folder_with_bad_files):
    ds = ImageFolderDataset(folder_with_bad_files, 8, flip=False)
    good3, _ = ds[3]
    with pytest.warns(BadImageWarning) as record:
        x, y = ds[1]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "1_trunc.jpg" in messages[0] and "2_text.png" in messages[1]
    assert torch.equal(x, good3) and y == 0  # the next readable sample stands in
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already known bad: no second warning
        assert torch.equal(ds[2][0], good3)
    with pytest.warns(BadImageWarning, match="1_empty.png"):
        x, y = ds[5]  # the last index wraps around to the first
    assert torch.equal(x, ds[0][0]) and y == 0
    assert ds.load(1)[2] == 3  # which file was read instead


def test_bad_files_raise_with_error_policy(folder_with_bad_files):
    ds = ImageFolderDataset(folder_with_bad_files, 8, on_bad_image="error")
    with pytest.raises(UnreadableImageError, match="1_trunc.jpg"):
        ds[1]
    with pytest.raises(UnreadableImageError, match="2_text.png"):
        ds[2]
    assert ds[0][0].shape == (3, 8, 8)


def test_all_files_bad_raises_instead_of_hanging(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_text("nope")
    ds = ImageFolderDataset(tmp_path, 8)
    with pytest.warns(BadImageWarning), pytest.raises(UnreadableImageError, match="no readable image"):
        ds[0]


def test_invalid_options(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match="'skip', 'error'"):
        ImageFolderDataset(tmp_path, 8, on_bad_image="ignore")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataset(tmp_path / "nope", 8)


def test_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolderDataset(tmp_path / "f", 8)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no class sub-folders.*empty"):
        ImageFolderDataset(tmp_path, 8)


def test_images_without_class_folders(tmp_path):
    save(noise_image(4, 4), tmp_path / "0.png")
    with pytest.raises(ValueError, match="no class sub-folders.*1 image files sit directly"):
        ImageFolderDataset(tmp_path, 8)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no image files .* under {tmp_path}"):
        ImageFolderDataset(tmp_path, 8)


def test_one_empty_class(tmp_path):
    make_folder(tmp_path, classes=("a", "c"))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="class folders without image files .*: b$"):
        ImageFolderDataset(tmp_path, 8)


def test_too_many_classes(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"), per_class=1)
    with pytest.raises(ValueError, match="3 class folders but --num-classes is 2"):
        ImageFolderDataset(tmp_path, 8, num_classes=2)
    assert len(ImageFolderDataset(tmp_path, 8, num_classes=1000)) == 3


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder(tmp_path):
    make_folder(tmp_path)
    os.chmod(tmp_path / "cat", 0)
    try:
        with pytest.raises(ValueError, match="cannot read folder .*cat"):
            ImageFolderDataset(tmp_path, 8)
        os.chmod(tmp_path, 0)
        with pytest.raises(ValueError, match=f"cannot read dataset folder {tmp_path}"):
            ImageFolderDataset(tmp_path, 8)
    finally:
        os.chmod(tmp_path, 0o755)
        os.chmod(tmp_path / "cat", 0o755)


# ---------------------------------------------------------------------------------------------------------
# Digits


def test_digits_arrays():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = digits_arrays(16, 3)
    assert x.shape == (1797, 16, 16, 3) and x.dtype == np.uint8
    assert y.shape == (1797,) and sorted(set(y.tolist())) == list(range(10))
    assert np.array_equal(x[..., 0], x[..., 2]) and x.max() == 255 and x.min() == 0
    x8, _ = digits_arrays(8, 1)
    assert x8.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(x8[..., 0], np.round(raw.images * 255 / 16).astype(np.uint8))
    # bilinear 2x upsampling keeps the mean intensity of each image (up to the edges and rounding)
    np.testing.assert_allclose(x[..., 0].mean((1, 2)), x8[..., 0].mean((1, 2)), atol=6)
    x[0] = 0  # callers get their own copy
    assert digits_arrays(16, 3)[0][0].max() > 0


def test_split_indices():
    train, hold = split_indices(1797, 0.2, seed=3)
    assert len(hold) == round(1797 * 0.2) and len(train) + len(hold) == 1797
    assert np.array_equal(np.union1d(train, hold), np.arange(1797))
    again = split_indices(1797, 0.2, seed=3)
    assert np.array_equal(again[1], hold)
    assert not np.array_equal(split_indices(1797, 0.2, seed=4)[1], hold)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_indices(10, 1.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_digits_dataset(channels):
    train = DigitsDataset(16, split="train", channels=channels, seed=1)
    hold = DigitsDataset(16, split="holdout", channels=channels, seed=1)
    assert len(train) + len(hold) == len(DigitsDataset(16)) == 1797
    x, y = train[0]
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32 and 0 <= y <= 9
    assert train.x.min() == -1 and train.x.max() == 1
    assert train.num_classes == 10
    assert torch.equal(pickle.loads(pickle.dumps(train))[5][0], train[5][0])
    with pytest.raises(ValueError, match="'all', 'train', 'holdout'"):
        DigitsDataset(split="test")


def _photo(side: int, seed: int = 0) -> Image.Image:
    """Smooth colours plus noise, like a photo (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(images_module, "LARGE_IMAGE_PIXELS", 256 * 256)  # a 1024 px image is "large" here


def _full_decode_crop(path, size):
    with Image.open(path) as image:
        image.load()
        return np.asarray(images_module.center_crop_arr(image.convert("RGB"), size))


def test_large_jpeg_is_decoded_at_a_reduced_size(tmp_path, monkeypatch, small_threshold):
    path = tmp_path / "big.jpg"
    _photo(1024).save(path, quality=92)
    decoded = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def load(self):
        decoded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    crop = read_image(path, 64)
    assert set(decoded) == {(128, 128)}  # 1/8 of 1024: the three halvings the crop makes from 1024 down to 128
    monkeypatch.undo()
    full = _full_decode_crop(path, 64)
    diff = np.abs(crop.astype(int) - full.astype(int))
    assert crop.shape == (64, 64, 3) and diff.max() <= 4 and diff.mean() <= 1.5  # rounding of the block means


def test_draft_stops_where_the_crop_stops_halving(tmp_path, small_threshold):
    path = tmp_path / "big.jpg"
    _photo(600).save(path, quality=92)
    with Image.open(path) as image:
        images_module._draft_large_jpeg(image, 256)  # 600 -> 300 is the only halving (300 < 512)
        assert image.size == (300, 300)


def test_normal_images_are_decoded_in_full(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    _photo(1024).save(path, quality=92)  # 1 MP: below the real threshold
    np.testing.assert_array_equal(read_image(path, 64), _full_decode_crop(path, 64))


def test_large_image_is_decoded_once_per_process(tmp_path, monkeypatch, small_threshold):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    _photo(512).save(root / "a" / "big.png")  # PNG: no reduced decode, so the crop is kept
    _photo(64, seed=1).save(root / "a" / "small.png")
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(images_module.Image, "open", counting_open)
    dataset = ImageFolderDataset(root, 32, flip=False)
    first = [dataset[i][0] for i in range(2)]
    again = [dataset[i][0] for i in range(2) for _ in range(2)]
    assert sum(name.endswith("big.png") for name in opened) == 1
    assert sum(name.endswith("small.png") for name in opened) == 3  # small images are read every time
    for i, x in enumerate(again):
        assert x.equal(first[i // 2])


def test_crop_cache_is_bounded(tmp_path, monkeypatch, small_threshold):
    monkeypatch.setattr(images_module, "LARGE_CROP_CACHE_BYTES", 32 * 32 * 3)  # room for one crop
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    for k in range(2):
        _photo(512, seed=k).save(root / "a" / f"{k}.png")
    dataset = ImageFolderDataset(root, 32, flip=False)
    for _ in range(2):
        dataset.load(0), dataset.load(1)
    assert list(dataset._large) == [0]
