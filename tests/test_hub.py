"""Model folders (disploss.hub): SiT.save_pretrained / from_pretrained round trips for flow and MeanFlow SiTs, the
folder huggingface_hub's mixin would write, refusals (non-finite, mismatched shapes, unknown keys, missing files),
hub ids from the local cache offline and their one-line error when uncached, push_to_hub's calls, and
`import disploss.models` without huggingface_hub."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from disploss.errors import ConfigError, HubUnavailableError, MissingFileError, NonFiniteWeightsError
from disploss.hub import CONFIG_NAME, WEIGHTS_NAME
from disploss.models import SiT
from trainkit import MODEL, ROOT, call, env, tiny_sit


@pytest.mark.parametrize("meanflow", [False, True], ids=["flow", "meanflow"])
def test_save_and_load_round_trip_bitwise(tmp_path, meanflow):
    model = tiny_sit(meanflow=meanflow, patch_size=2)
    folder = model.save_pretrained(tmp_path / "sit")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["_class_name"] == "SiT" and {k: config[k] for k in model.config()} == model.config()
    assert config["meanflow"] is meanflow and config["num_heads"] == 2  # the heads, which shapes cannot tell
    loaded = SiT.from_pretrained(folder)
    assert not loaded.training and loaded.meanflow is meanflow
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 5])
    kwargs = {"r": torch.rand(3)} if meanflow else {}
    assert torch.equal(loaded(x, t, y, **kwargs), model(x, t, y, **kwargs))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: disploss\n") and ("meanflow" if meanflow else "flow-matching") in card


def test_a_folder_as_huggingface_hubs_mixin_writes_it_loads(tmp_path):
    # PyTorchModelHubMixin: config.json holds the constructor arguments only, model.safetensors the state dict.
    model = tiny_sit(patch_size=2)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(model.config()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / WEIGHTS_NAME))
    loaded = SiT.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_saving_over_a_folder_keeps_its_card(tmp_path):
    folder = tiny_sit(0, patch_size=2).save_pretrained(tmp_path / "sit")
    (folder / "README.md").write_text("my card\n")
    tiny_sit(1, patch_size=2).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "my card\n"
    assert torch.equal(SiT.from_pretrained(folder).pos_embed, tiny_sit(1, patch_size=2).pos_embed)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    folder = tiny_sit(patch_size=2).save_pretrained(tmp_path / "sit")
    state = load_file(str(folder / WEIGHTS_NAME))
    state["blocks.1.mlp.fc2.weight"][0, :3] = bad
    save_file(state, str(folder / WEIGHTS_NAME))
    with pytest.raises(NonFiniteWeightsError) as info:
        SiT.from_pretrained(folder)
    kind = "3 NaN, 0 infinite" if bad != bad else "0 NaN, 3 infinite"
    assert f"blocks.1.mlp.fc2.weight ({kind} of 4096)" in str(info.value) and WEIGHTS_NAME in str(info.value)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    folder = tiny_sit(patch_size=2).save_pretrained(tmp_path / "sit")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "num_classes": 7}))
    with pytest.raises(ConfigError) as info:
        SiT.from_pretrained(folder)
    message = str(info.value)
    assert "does not fit the model of its config.json" in message
    assert "y_embedder.embedding_table.weight: checkpoint (6, 32), model (8, 32)" in message


def test_unknown_config_keys_and_missing_files_are_refused(tmp_path):
    folder = tiny_sit(patch_size=2).save_pretrained(tmp_path / "sit")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "qk_norm": True}))
    with pytest.raises(ConfigError, match="settings that SiT does not take: qk_norm"):
        SiT.from_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(MissingFileError, match="the folder has no model.safetensors"):
        SiT.from_pretrained(folder)
    with pytest.raises(MissingFileError, match="no such file or model folder"):
        SiT.from_pretrained(tmp_path / "nothere.pt")


def _cache_hub_id(cache, hub_id: str, folder) -> None:
    """Lay out `folder`'s files as huggingface_hub's cache holds a downloaded snapshot of hub_id."""
    commit = "0" * 40
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for path in folder.iterdir():
        (snap / path.name).write_bytes(path.read_bytes())


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as CI: no request at all
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_id_loads_offline(tmp_path, offline_cache):
    model = tiny_sit(meanflow=True, patch_size=2)
    _cache_hub_id(offline_cache, "someone/sit-tiny", model.save_pretrained(tmp_path / "sit"))
    loaded = SiT.from_pretrained("someone/sit-tiny", cache_dir=offline_cache)
    assert loaded.meanflow and all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_an_uncached_hub_id_offline_is_one_line_naming_a_local_folder(capsys, tmp_path, offline_cache):
    with pytest.raises(HubUnavailableError) as info:
        SiT.from_pretrained("someone/not-cached")
    assert "HF_HUB_OFFLINE is set" in str(info.value) and "a local copy of the model folder" in str(info.value)
    rc, _, err = call(capsys, ["sample", "ODE", "--ckpt", "someone/not-cached", "--out", str(tmp_path / "g.png")])
    assert rc == 2 and err.startswith("disploss sample: error: --ckpt someone/not-cached: could not fetch the model")
    assert "pass --ckpt DIR, a local copy of the model folder" in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_push_to_hub_saves_and_uploads_the_folder(monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # the two calls push_folder makes; no network
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
            from pathlib import Path

            calls.append(("upload_folder", repo_id, repo_type, sorted(p.name for p in Path(folder_path).iterdir())))
            return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = tiny_sit(patch_size=2).push_to_hub("me/sit-tiny", private=True)
    assert url == "https://huggingface.co/me/sit-tiny/commit/abc"
    assert calls == [("token", None), ("create_repo", "me/sit-tiny", True, True),
                     ("upload_folder", "me/sit-tiny", "model", ["README.md", CONFIG_NAME, WEIGHTS_NAME])]  # fmt: skip


def test_models_import_and_local_folders_work_without_huggingface_hub(tmp_path):
    # huggingface_hub is the optional `disploss[vae]` extra: SiT stays a plain nn.Module without it.
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"  # any import of it fails
        "import torch, disploss\nfrom disploss.models import SiT\n"
        "assert SiT.__mro__[1] is torch.nn.Module\n"
        "m = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3)\n"
        f"m.save_pretrained({str(tmp_path / 'sit')!r}); SiT.from_pretrained({str(tmp_path / 'sit')!r})\n"
        "try:\n    SiT.from_pretrained('someone/sit')\nexcept disploss.UsageError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "loading a hub id needs huggingface_hub (pip install 'disploss[vae]')" in done.stdout


def test_sampling_flags_check_the_folder_like_a_checkpoint(capsys, tmp_path):
    # A model folder goes through the same checks as a file: a contradicting flag names the setting.
    folder = tiny_sit(0, preset=MODEL).save_pretrained(tmp_path / "sit")
    rc, _, err = call(capsys, ["sample", "ODE", "--ckpt", str(folder), "--vae", "none", "--num-classes", "7",
                               "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert rc == 2 and "y_embedder.embedding_table.weight" in err and "--num-classes 5" in err


def test_train_ckpt_of_a_hub_id_or_a_missing_file(tmp_path, offline_cache, monkeypatch):
    from disploss.training import TrainConfig
    from disploss.training.run.resume import find_resume

    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubUnavailableError, match="--ckpt someone/not-cached: could not fetch the model"):
        find_resume(TrainConfig(ckpt="someone/not-cached"))
    with pytest.raises(MissingFileError, match="checkpoint not found: runs/0000100.pt"):  # a file name, no hub id
        find_resume(TrainConfig(ckpt="runs/0000100.pt"))
    _cache_hub_id(offline_cache, "someone/sit-t", tiny_sit(0, preset=MODEL).save_pretrained(tmp_path / "sit"))
    resume = find_resume(TrainConfig(ckpt="someone/sit-t", model="SiT-T/2"))
    assert resume.step == 0 and "opt" not in resume.state and "fine-tunes its weights" in resume.notes[0]
    assert all(torch.equal(resume.state["ema"][k], v) for k, v in tiny_sit(0, preset=MODEL).state_dict().items())
