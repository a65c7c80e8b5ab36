"""The latent cache's checks (issue 20, item 3), beyond the fault table (tests/test_fault_injection.py): extraction
refuses to write moments a reader would refuse, naming the image; opening a cache reads headers only; an item's
check finds exactly the damaged row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from disploss.commands.main import main
from disploss.data import LatentsDataset
from disploss.data import latents as fmt
from disploss.data.vae import LatentCodec
from trainkit import make_image_folder, save_tiny_vae, write_latent_cache

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    return save_tiny_vae(root / "vae"), make_image_folder(root / "images", classes=2, per_class=3)


def extract(capsys, vae, data, out, *extra) -> tuple[int, str]:
    argv = ["extract-latents", "--data-path", data, "--vae", vae, "--out", out, "--image-size", "8", "--num-classes",
            "2", "--num-workers", "0", "--device", "cpu", "--shard-size", "4", "--batch-size", "2", *extra]  # fmt: skip
    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("dtype, value, hint", [("float32", float("nan"), "check that image and the VAE (--vae)"),
                                                ("float16", 1e5, "pass --dtype float32")])  # fmt: skip
def test_extraction_refuses_non_finite_moments_naming_the_image(vae_and_images, tmp_path, capsys, monkeypatch, dtype,
                                                                value, hint):  # fmt: skip
    vae, data = vae_and_images
    real = LatentCodec.encode_moments
    calls = [0]

    def encode(self, x):  # the third batch's second image (and its flip) gets one bad moment
        mean, std = real(self, x)
        calls[0] += 1
        if calls[0] == 3:
            mean = mean.clone()
            mean[1, 0, 0, 0] = value
        return mean, std

    monkeypatch.setattr(LatentCodec, "encode_moments", encode)
    out = tmp_path / "latents"
    status, line = extract(capsys, vae, data, out, "--dtype", dtype)
    bad = data / "class_1" / "2.png"  # images in order: class_0/0..2, class_1/0..2; batches of 2: the 6th image
    assert status == 2 and line.startswith("disploss extract-latents: error: "), line
    assert f"first {bad}; nothing of that shard was written: " in line and line.endswith(hint)
    assert sorted(p.name for p in out.glob("*.npy")) == [fmt.labels_name(0), fmt.moments_name(0)]  # shard 0 only
    monkeypatch.setattr(LatentCodec, "encode_moments", real)
    status, line = extract(capsys, vae, data, out, "--dtype", dtype)  # rerun: the cache is completed
    assert status == 0 and len(LatentsDataset(out)) == 6


def test_opening_a_cache_reads_headers_only(tmp_path, monkeypatch):
    root = write_latent_cache(tmp_path / "latents")
    loads = []
    real = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    dataset = LatentsDataset(root)
    assert loads == []  # no shard mapped, no data read: only the headers and the sizes
    dataset[3]
    assert len(loads) == 2  # the first item maps its shard's two files


def test_the_item_check_finds_exactly_the_damaged_row(tmp_path):
    root = write_latent_cache(tmp_path / "latents")
    moments = np.load(root / fmt.moments_name(1))
    moments[2, 0, 1, 0, 0, 0] = np.inf  # item 8 + 2 = 10, in the std of the flipped view
    fmt.save_npy(root / fmt.moments_name(1), moments)
    dataset = LatentsDataset(root)
    ok = [i for i in range(16) if i != 10]
    assert all(torch.isfinite(dataset[i][0]).all() for i in ok)
    with pytest.raises(ValueError, match=r"item 10 \(row 2 of moments_000001.npy\) holds non-finite or out-of-range "
                                         r"moments \(0 NaN, 1 infinite, 0 beyond \+-65504 of 256\)"):  # fmt: skip
        dataset[10]
