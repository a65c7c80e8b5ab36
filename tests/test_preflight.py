"""Cheap things first, reported once: every flag (sampling-grid settings, EMA decay, finite scales and rates, the
device, the processes per GPU), the data folder and its size, wandb's variables and the output folder are checked
before the VAE is fetched and before a run folder exists; an offline hub fails at once (one request, no retries)
and names the ways around it; under torchrun the error is printed once."""

from __future__ import annotations

import diffusers
import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

import disploss.data.vae as vae_module
from disploss.errors import HubUnavailableError
from trainkit import SHIM, error_line, run_dirs, save_tiny_vae, tiny_flags, torchrun, train_cli


@pytest.fixture
def no_vae_fetch(monkeypatch):
    """Fail the test if the VAE is fetched."""

    def fetch(*args, **kwargs):
        raise AssertionError("the VAE was fetched before the cheap checks")

    monkeypatch.setattr(vae_module, "load_vae", fetch)


def _no_wandb_variables(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_KEY", "WANDB_API_KEY", "PROJECT", "ENTITY"):
        monkeypatch.delenv(name, raising=False)


def _full_disk(monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))


@pytest.mark.parametrize(
    "mistake, overrides, expected",
    [
        ("dataset smaller than a batch", {"global_batch_size": 64}, "fewer than one local batch of 64"),
        ("wandb without its variables", {"wandb": True}, "WANDB_KEY"),
        ("results under a regular file", {"results_dir": "FILE/results"}, "cannot create the folder"),
        ("a full disk", {}, "not enough free disk space"),
        ("no VAE factor", {"image_size": 12}, "not divisible by the VAE downsampling factor 8"),
        ("no patch", {"image_size": 8}, "patch size 2"),  # 8 px -> latents of side 1
        ("missing data", {"data_path": "MISSING"}, "does not exist"),
    ],
)
def test_cheap_checks_come_before_the_vae_and_the_run_folder(
    images, tmp_path, monkeypatch, capsys, no_vae_fetch, mistake, overrides, expected
):
    _no_wandb_variables(monkeypatch)
    if mistake == "a full disk":
        _full_disk(monkeypatch)
    (tmp_path / "FILE").write_text("")
    flags = {"vae": "ema", "image_size": 16, **overrides}  # the hub VAE: factor 8, known without fetching it
    for key in ("results_dir", "data_path"):
        if key in flags:
            flags[key] = tmp_path / flags[key]
    results = flags.pop("results_dir", tmp_path / "results")
    assert train_cli(tiny_flags(flags.pop("data_path", images), results, steps=1, **flags)) == 2
    assert expected in error_line(capsys)
    assert not results.exists() or not run_dirs(results)  # no run folder, empty or not


class Probe:
    """Stand-ins for the hub: one HEAD request (`get_hf_file_metadata`) and `from_pretrained`."""

    def __init__(self, monkeypatch, reachable: bool, cached_vae=None):
        self.heads, self.loads = [], []
        self.reachable, self.cached_vae = reachable, cached_vae
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI exports HF_HUB_OFFLINE=1; the probe is the hub
        monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", self.head)
        monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", self.load)

    def head(self, url, *, timeout=None, retry_on_errors=True, **kwargs):  # the signature of huggingface_hub 1+
        self.heads.append((url, {"timeout": timeout, "retry_on_errors": retry_on_errors, **kwargs}))
        if not self.reachable:
            raise ConnectionError("[Errno -2] Name or service not known")

    def load(self, name, **kwargs):
        self.loads.append((str(name), kwargs))
        if kwargs.get("local_files_only") and self.cached_vae is not None:
            return self.cached_vae
        raise OSError(f"{name} is not in the cache" if kwargs.get("local_files_only") else "download failed")


def test_offline_hub_fails_at_once_and_names_the_alternatives(monkeypatch):
    probe = Probe(monkeypatch, reachable=False)
    with pytest.raises(HubUnavailableError) as info:
        vae_module.load_vae("ema")
    # one request, without the hub library's retries; then only the local cache is looked at
    assert len(probe.heads) == 1 and probe.heads[0][1].get("retry_on_errors") is False
    assert "sd-vae-ft-ema" in probe.heads[0][0]
    assert probe.loads == [("stabilityai/sd-vae-ft-ema", {"local_files_only": True, "low_cpu_mem_usage": False})]
    message = str(info.value)
    assert "--vae none" in message and "local folder" in message and "Name or service not known" in message


def test_hub_offline_mode_makes_no_request(monkeypatch):
    probe = Probe(monkeypatch, reachable=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        vae_module.load_vae("mse")
    assert probe.heads == [] and [kw["local_files_only"] for _, kw in probe.loads] == [True]


def test_a_cached_vae_loads_offline(monkeypatch, tmp_path):
    tiny = diffusers.AutoencoderKL.from_pretrained(save_tiny_vae(tmp_path / "vae"))
    probe = Probe(monkeypatch, reachable=False, cached_vae=tiny)
    codec = vae_module.load_vae("ema")
    assert codec.vae is tiny and codec.spec == "ema" and len(probe.heads) == 1


def test_train_names_latents_when_the_hub_is_offline(images, tmp_path, monkeypatch, capsys):
    Probe(monkeypatch, reachable=False)
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, vae="ema", image_size=16)) == 2
    line = error_line(capsys)
    assert "--vae none" in line and "local folder" in line and "--latents DIR" in line
    results = tmp_path / "results"
    assert not results.exists() or not run_dirs(results)  # the output folder was checked, nothing was created


@pytest.mark.timeout(180)
def test_offline_vae_under_torchrun_is_one_line_first(images, tmp_path):
    """The seed's command on an offline machine (--vae ema, two processes): the first line printed is the one
    error, naming --vae none, a local folder and --latents; no retries, no library advice before it."""
    flags = tiny_flags(images, tmp_path / "results", steps=1, vae="ema", image_size=16)
    proc = torchrun(2, [SHIM, *flags], tmp_path, timeout=150, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("disploss train: error: ")]
    assert len(errors) == 1 and lines[0] == errors[0], proc.stderr[-3000:]
    assert "--vae none" in errors[0] and "local folder" in errors[0] and "--latents DIR" in errors[0]
    assert "Retrying" not in proc.stderr and "accelerate" not in proc.stderr and "Warning" not in proc.stdout
    assert not (tmp_path / "results").exists() or not run_dirs(tmp_path / "results")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"sample_steps": 1, "sample_every": 10_000}, "--sample-steps must be at least 2, got 1"),
        ({"ema_decay": 2}, "--ema-decay must lie in [0.0, 1.0), got 2.0"),
        ({"ema_decay": 1}, "--ema-decay must lie in [0.0, 1.0), got 1.0"),
        ({"cfg_scale": "nan"}, "--cfg-scale must be >= 1.0 and finite"),
        ({"cfg_scale": "inf"}, "--cfg-scale must be >= 1.0 and finite"),
        ({"lr": "inf"}, "--lr must be a finite number, got inf"),
        ({"beta2": 1.5}, "--beta2 must lie in [0.0, 1.0), got 1.5"),
        ({"disp": True, "disp_weight": "inf"}, "--disp-weight must be a finite number"),
        ({"grad_clip": "inf"}, "--grad-clip must be a finite number"),
        ({"train_eps": 0.7}, "--train-eps must lie in [0.0, 0.5)"),
        ({"ckpt_every_minutes": 0}, "--ckpt-every-minutes must be positive, got 0.0"),
        ({"keep_last": 0}, "--keep-last must be at least 1, got 0"),
        ({"keep_every": 3, "ckpt_every": 2}, "--keep-every 3 must be a multiple of --ckpt-every 2"),
    ],
)
def test_bad_flags_stop_before_anything_runs(images, tmp_path, capsys, overrides, expected):
    assert train_cli(tiny_flags(images, tmp_path / "results", steps=1, **overrides)) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "results").exists() or run_dirs(tmp_path / "results") == []  # no folder, no step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_device_that_is_not_there(images, tmp_path, capsys):
    assert train_cli(tiny_flags(images, tmp_path, steps=1, device="cuda")) == 2
    assert "--device cuda: no CUDA device is available" in error_line(capsys)


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from disploss import distributed
    from disploss.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 but only 1 CUDA device"):
        distributed.init("cuda")
