"""The latent codec: a tiny random AutoencoderKL saved to a folder, the identity codec, and --vae errors."""

import pytest
import torch

from disploss.data.vae import IdentityCodec, LatentCodec, load_vae
from trainkit import save_tiny_vae

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    save_tiny_vae(folder, scaling_factor=0.5)
    return folder


def test_load_local_folder_shapes_and_config(tiny_vae_dir):
    codec = load_vae(str(tiny_vae_dir), "cpu")
    assert isinstance(codec, LatentCodec)
    assert (codec.latent_channels, codec.downsample_factor, codec.scale, codec.shift) == (4, 2, 0.5, 0.0)
    assert codec.latent_size(16) == 8 and codec.latent_shape(16) == (4, 8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = codec.encode_moments(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and mean.dtype == torch.float32
    assert (std > 0).all()
    torch.testing.assert_close(codec.encode(x, sample=False), mean * 0.5)
    z = codec.encode(x, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, (mean + std * eps) * 0.5)
    assert not torch.equal(z, codec.encode(x))  # a posterior SAMPLE, as in the reference
    y = codec.decode(z)
    assert y.shape == (2, 3, 16, 16) and y.min() >= -1 and y.max() <= 1


def test_moments_match_diffusers_posterior(tiny_vae_dir):
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir)
    codec = load_vae(str(tiny_vae_dir))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        ref = vae.decode(torch.ones(1, 4, 8, 8) / 0.5).sample
    mean, std = codec.encode_moments(x)
    torch.testing.assert_close(mean, post.mean)
    torch.testing.assert_close(std, post.std)
    torch.testing.assert_close(codec.decode(torch.ones(1, 4, 8, 8), clamp=False), ref)


def test_decode_builds_no_graph(tiny_vae_dir):
    codec = load_vae(str(tiny_vae_dir))
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = codec.decode(z)
    assert not y.requires_grad and y.grad_fn is None
    assert not any(p.requires_grad for p in codec.vae.parameters())


def test_default_scale_when_config_has_none(tmp_path):
    save_tiny_vae(tmp_path)  # diffusers' default scaling_factor is the SD value
    assert load_vae(str(tmp_path)).scale == pytest.approx(0.18215)


def test_pipeline_folder_with_vae_subfolder(tmp_path):
    save_tiny_vae(tmp_path / "vae", scaling_factor=0.25)
    assert load_vae(str(tmp_path)).scale == 0.25


def test_none_is_identity():
    codec = load_vae("none", "cpu")
    assert isinstance(codec, IdentityCodec)
    assert (codec.latent_channels, codec.downsample_factor, codec.scale) == (3, 1, 1.0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(codec.encode(x), x)
    mean, std = codec.encode_moments(x)
    torch.testing.assert_close(mean, x)
    torch.testing.assert_close(std, torch.zeros_like(x))
    torch.testing.assert_close(codec.decode(x), x)
    assert codec.latent_size(7) == 7


@pytest.mark.parametrize("image_size,near", [(250, "248 or 256"), (4, "8"), (257, "256 or 264")])
def test_latent_size_validation(image_size, near):
    codec = IdentityCodec()
    codec.downsample_factor = 8  # as the SD VAEs
    assert codec.latent_size(256) == 32
    with pytest.raises(ValueError, match=f"--image-size {image_size} .*factor 8.*nearby: {near}$"):
        codec.latent_size(image_size)


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/vae", "not-a-keyword", "a/b/c"])
def test_invalid_spec_names_it(spec):
    with pytest.raises(FileNotFoundError, match="'ema', 'mse', 'none'") as info:
        load_vae(spec)
    assert spec in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))


@pytest.mark.parametrize(
    "spec,hub_id",
    [("ema", "stabilityai/sd-vae-ft-ema"), ("mse", "stabilityai/sd-vae-ft-mse"), ("someone/vae", "someone/vae")],
)
def test_hub_failure_suggests_local_folder(monkeypatch, spec, hub_id):
    asked = []

    def offline(name, *args, **kwargs):
        asked.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(OSError, match="could not fetch") as info:
        load_vae(spec)
    assert asked == [hub_id]
    assert hub_id in str(info.value) and "local folder" in str(info.value) and "--vae" in str(info.value)
