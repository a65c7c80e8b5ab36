"""`disploss extract-latents` end to end with a tiny random AutoencoderKL, and LatentsDataset on its cache."""

import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from disploss import distributed
from disploss.commands import extract_latents
from disploss.commands.flags import config_from_namespace
from disploss.data import LatentsDataset, read_image, uint8_to_unit
from disploss.data import latents as latent_format
from disploss.data.extract import ExtractConfig
from disploss.data.extract import extract_latents as extract_library
from disploss.data.vae import LatentCodec, load_vae
from trainkit import save_tiny_vae

diffusers = pytest.importorskip("diffusers")

SCALE = 0.5


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("tiny_vae"), scaling_factor=SCALE)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """2 classes x 3 images, of 16 x 16 and some larger ones (so the crop matters)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("class_a", "class_b"):
        (root / c).mkdir()
        for i, size in enumerate([(16, 16), (24, 16), (16, 20)]):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def extract(args) -> bool:
    """The library call behind `disploss extract-latents`, which raises its errors (the command prints them)."""
    return extract_library(config_from_namespace(ExtractConfig, args), distributed.init("cpu"))


def flags(image_dir, vae_dir, out, shard_size: int = 4) -> list[str]:
    """The flags of a tiny extraction: 16 px, 2 classes, batches of 3, shards of `shard_size`, CPU, no workers."""
    return [
        "--data-path", str(image_dir), "--vae", str(vae_dir), "--out", str(out), "--image-size", "16",
        "--num-classes", "2", "--batch-size", "3", "--num-workers", "0", "--device", "cpu",
        "--shard-size", str(shard_size),
    ]  # fmt: skip


def parse(image_dir, vae_dir, out, *extra):
    parser = argparse.ArgumentParser()
    extract_latents.add_arguments(parser)
    return parser.parse_args([*flags(image_dir, vae_dir, out), *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, image_dir, vae_dir):
    out = tmp_path_factory.mktemp("cache") / "latents"
    assert extract_latents.run(parse(image_dir, vae_dir, out)) == 0
    return out


def shard_files(out):
    return sorted(p.name for p in out.iterdir() if p.suffix == ".npy")


def test_cache_contents(cache, image_dir, vae_dir):
    assert shard_files(cache) == ["labels_000000.npy", "labels_000001.npy", "moments_000000.npy", "moments_000001.npy"]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["format"] == "disploss-latents" and manifest["version"] == 1
    assert manifest["count"] == 6 and manifest["image_size"] == 16 and manifest["scale"] == SCALE
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["class_names"] == ["class_a", "class_b"]
    assert manifest["vae"] == str(vae_dir) and manifest["num_shards"] == 2 and manifest["dtype"] == "float32"

    moments = np.concatenate([np.load(cache / "moments_000000.npy"), np.load(cache / "moments_000001.npy")])
    labels = np.concatenate([np.load(cache / "labels_000000.npy"), np.load(cache / "labels_000001.npy")])
    assert moments.shape == (6, 2, 2, 4, 8, 8) and moments.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Independently: crop each file, flip the crop with numpy, encode one image at a time.
    codec = load_vae(str(vae_dir))
    files = sorted(image_dir.glob("*/*.png"))
    for i, path in enumerate(files):
        arr = read_image(path, 16)
        views = uint8_to_unit(np.stack([arr, arr[:, ::-1].copy()]))  # 2 3 16 16
        mean, std = codec.encode_moments(views)
        torch.testing.assert_close(torch.from_numpy(moments[i, :, 0]), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(moments[i, :, 1]), std, rtol=1e-4, atol=1e-5)


def test_dataset_sample_statistics(cache):
    ds = LatentsDataset(cache, flip=False)
    assert len(ds) == 6 and ds.scale == SCALE and ds.latent_shape == (4, 8, 8) and ds.num_classes == 2
    m, label = ds.moments(4)
    assert label == 1
    torch.manual_seed(0)
    n = 2000
    draws = torch.stack([ds[4][0] for _ in range(n)])  # n C h w
    mean, std = m[0, 0] * SCALE, m[0, 1] * SCALE
    assert draws.shape == (n, 4, 8, 8) and draws.dtype == torch.float32
    assert ((draws.mean(0) - mean).abs() <= 5 * std / n**0.5).all()
    ratio = draws.std(0) / std
    assert 0.9 < ratio.mean() < 1.1


def test_dataset_flip_choice(cache):
    ds = LatentsDataset(cache, sample=False)
    m, _ = ds.moments(0)
    torch.manual_seed(0)
    draws = [ds[0][0] for _ in range(400)]
    flipped = sum(torch.equal(d, m[1, 0] * SCALE) for d in draws)
    plain = sum(torch.equal(d, m[0, 0] * SCALE) for d in draws)
    assert plain + flipped == 400 and 150 < flipped < 250


def test_dataset_pickles_and_works_in_workers(cache):
    ds = LatentsDataset(cache)
    ds[0]  # opens memory maps, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._moments == {} and clone[5][0].shape == (4, 8, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1)
    batches = list(loader)
    assert [tuple(z.shape) for z, _ in batches] == [(3, 4, 8, 8)] * 2
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1]


def test_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentsDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a latent cache.*manifest.json"):
        LatentsDataset(tmp_path)


def counting_encoder(monkeypatch, out=None):
    """Count the images encoded; check that no manifest exists while encoding."""
    seen = []
    original = LatentCodec.encode_moments

    def spy(self, x):
        seen.append(x.shape[0] // 2)  # image and its flip
        if out is not None:
            assert not (out / "manifest.json").exists()
        return original(self, x)

    monkeypatch.setattr(LatentCodec, "encode_moments", spy)
    return seen


def test_resume_after_deleted_shard(tmp_path, image_dir, vae_dir, monkeypatch):
    out = tmp_path / "latents"
    assert extract_latents.run(parse(image_dir, vae_dir, out)) == 0
    stamp = (out / "moments_000000.npy").stat().st_mtime_ns
    before = np.load(out / "moments_000001.npy")
    (out / "moments_000001.npy").unlink()
    with pytest.raises(ValueError, match="incomplete.*moments_000001.npy"):
        LatentsDataset(out)
    seen = counting_encoder(monkeypatch, out)
    assert extract_latents.run(parse(image_dir, vae_dir, out)) == 0
    assert sum(seen) == 2  # only the 2 images of shard 1
    assert (out / "moments_000000.npy").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(np.load(out / "moments_000001.npy"), before, rtol=1e-5, atol=1e-6)
    assert (out / "manifest.json").exists() and len(LatentsDataset(out)) == 6
    seen.clear()
    assert extract_latents.run(parse(image_dir, vae_dir, out)) == 0  # complete: nothing to do
    assert seen == []


def test_crash_leaves_no_manifest_then_resumes(tmp_path, image_dir, vae_dir, monkeypatch):
    out = tmp_path / "latents"
    real_write = latent_format.write_shard

    def write_then_crash(out_, shard, moments, labels):
        if shard == 1:
            raise KeyboardInterrupt  # killed after the first shard
        real_write(out_, shard, moments, labels)

    monkeypatch.setattr(latent_format, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        extract_latents.run(parse(image_dir, vae_dir, out))
    assert not (out / "manifest.json").exists()
    assert shard_files(out) == ["labels_000000.npy", "moments_000000.npy"]
    with pytest.raises(ValueError, match="incomplete: manifest.json is missing.*1 of 2 shards.*moments_000001"):
        LatentsDataset(out)
    monkeypatch.setattr(latent_format, "write_shard", real_write)
    seen = counting_encoder(monkeypatch, out)
    assert extract_latents.run(parse(image_dir, vae_dir, out)) == 0
    assert sum(seen) == 2
    assert len(LatentsDataset(out)) == 6


def test_rerun_with_other_settings_refused(cache, image_dir, vae_dir, tmp_path):
    with pytest.raises(ValueError, match="other settings.*shard_size: 4 there, 2 now"):
        extract(parse(image_dir, vae_dir, cache, "--shard-size", "2"))
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*other.txt"):
        extract(parse(image_dir, vae_dir, tmp_path))


def test_bad_image_size_for_the_vae(image_dir, vae_dir, tmp_path):
    args = parse(image_dir, vae_dir, tmp_path / "x")
    args.image_size = 15
    with pytest.raises(ValueError, match="--image-size 15 .*factor 2.*14 or 16"):
        extract(args)


def test_float16_storage_through_the_cli(tmp_path, image_dir, vae_dir):
    from disploss.commands.main import main

    out = tmp_path / "latents16"
    argv = [
        "extract-latents",
        "--data-path",
        str(image_dir),
        "--vae",
        str(vae_dir),
        "--out",
        str(out),
        "--image-size",
        "16",
        "--num-classes",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float16",
    ]
    assert main(argv) == 0
    assert np.load(out / "moments_000000.npy").dtype == np.float16
    z, _ = LatentsDataset(out)[0]
    assert z.dtype == torch.float32 and z.shape == (4, 8, 8)


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path, image_dir, vae_dir, cache):
    out = tmp_path / "latents"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "disploss",
        "extract-latents",
        *flags(image_dir, vae_dir, out, shard_size=2),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(shard_files(out)) == 6 and (out / "manifest.json").exists()
    single, multi = LatentsDataset(cache), LatentsDataset(out)
    for i in range(6):
        torch.testing.assert_close(multi.moments(i)[0], single.moments(i)[0], rtol=1e-4, atol=1e-5)
        assert multi.moments(i)[1] == single.moments(i)[1]
