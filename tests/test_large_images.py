"""Very large images (issue 13, item 8): a JPEG of more than LARGE_IMAGE_PIXELS is decoded at a reduced size
(its ADM crop equal to the full decode's up to rounding), and ImageFolderDataset decodes any large image once
per process, not on every read. Below the threshold nothing changes (the ADM crop tests in test_data.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import disploss.data.images as images_module
from disploss.data.images import ImageFolderDataset, read_image


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
