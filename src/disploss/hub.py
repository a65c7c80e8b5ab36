"""Hub-format model folders: the layout of huggingface_hub's PyTorchModelHubMixin, so that a trained SiT is a folder
(or a Hugging Face hub id) that anyone loads in one line, `SiT.from_pretrained(DIR_OR_ID)`.

    config.json        the model's constructor arguments (SiT.config()), "_class_name", and a "disploss" entry: how
                       the weights were made (model name, which weights, step, the training settings sampling needs)
    model.safetensors  the weights, official key names
    README.md          the model card (`disploss export` writes the full one)

Loading builds the model from config.json, checks the weights' keys and shapes against it (one line per
difference) and refuses non-finite weights, naming the tensor. A hub id is taken from the local Hugging Face cache
when the hub cannot be reached (HF_HUB_OFFLINE=1, no network); uncached, it is a one-line error naming a local folder
as the fix. huggingface_hub (the optional `disploss[vae]` extra) is imported only to fetch or push a hub id.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from disploss.errors import (
    ConfigError,
    HubUnavailableError,
    MissingDependencyError,
    MissingFileError,
    NonFiniteWeightsError,
)
from disploss.fileio import atomic_path, atomic_write_json, dir_mode, read_json_object
from disploss.statedict import first_nonfinite, shape_differences

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
INFO_KEY = "disploss"  # the config.json entry that is not a constructor argument
# Names that are files, never hub ids, even when they do not exist.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".npz")

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "INFO_KEY",
    "WEIGHTS_NAME",
    "constructor_args",
    "hub_unreachable",
    "is_model_folder",
    "load_pretrained",
    "looks_like_hub_id",
    "names_hub_id",
    "push_folder",
    "read_folder",
    "resolve",
    "save_pretrained",
    "snapshot",
    "write_folder",
]


def looks_like_hub_id(text: str) -> bool:
    """'owner/name' with no leading '.', '/' or '~' and no backslash: anything else is meant as a local path."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def hub_unreachable(hub_id: str) -> str | None:
    """None when the hub answers for hub_id, else why not; one HEAD request without retries (the hub library's
    own download retries for about 30 s when offline), none at all under HF_HUB_OFFLINE=1."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = huggingface_hub.hf_hub_url(hub_id, CONFIG_NAME)
    kwargs = {"timeout": constants.HF_HUB_ETAG_TIMEOUT}
    if "retry_on_errors" in inspect.signature(huggingface_hub.get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False
    try:
        huggingface_hub.get_hf_file_metadata(url, **kwargs)
    except Exception as e:  # no connection, a timeout, an unknown or gated repository: cannot fetch it here
        return f"{type(e).__name__}: {e}"
    return None


def names_hub_id(text: str) -> bool:
    """`text` is meant as a hub id: no such local path, of the form owner/name, and no file name (.pt, ...)."""
    path = Path(os.path.expanduser(text))
    return not path.exists() and looks_like_hub_id(text) and path.suffix not in _FILE_SUFFIXES


def is_model_folder(path: str | os.PathLike) -> bool:
    """A folder holding config.json (a hub-format model folder, complete or not)."""
    path = Path(os.path.expanduser(str(path)))
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def resolve(
    name_or_path: str | os.PathLike, *, flag: str = "--ckpt", revision: str | None = None, cache_dir=None
) -> Path:
    """The local folder of a hub-format model.

    Args:
        name_or_path: a folder holding config.json and model.safetensors, or a hub id "owner/name".
        flag: how the caller names the value in messages (--ckpt, or the argument of a library call).
        revision, cache_dir: of the hub id (huggingface_hub.snapshot_download).
    Returns:
        The folder itself, or the hub id's snapshot in the local cache (downloaded first when the hub is reachable).
    Raises:
        MissingFileError: neither an existing folder (with both files) nor a hub id.
        HubUnavailableError: a hub id that is not cached and cannot be fetched (the message names a local folder).
        MissingDependencyError: a hub id without huggingface_hub installed.
    """
    text = str(name_or_path)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
        if missing:
            raise MissingFileError(
                f"{flag} {text}: the folder has no {' and no '.join(missing)}; a model folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (`disploss export CKPT DIR` or SiT.save_pretrained(DIR) writes one)"
            )
        return path
    if path.exists():
        raise MissingFileError(f"{flag} {text} is a file, not a model folder")
    if not names_hub_id(text):
        raise MissingFileError(f"{flag} {text}: no such file or model folder (nor a hub id of the form owner/name)")
    return snapshot(text, flag=flag, revision=revision, cache_dir=cache_dir)


def snapshot(
    hub_id: str, *, flag: str = "--ckpt", revision: str | None = None, cache_dir=None,
    files: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME), patterns: list[str] | None = None,
) -> Path:  # fmt: skip
    """The local snapshot of a hub repository: from the cache when the hub cannot be reached, else fetched.

    Args:
        files: the files it must hold (a MissingFileError names the missing ones).
        patterns: what to fetch (default: `files` and the card).
    Raises:
        HubUnavailableError: not cached and not fetchable (the message names a local folder as the fix).
    """
    try:
        import huggingface_hub
    except ImportError:
        raise MissingDependencyError(
            f"{flag} {hub_id}: loading a hub id needs huggingface_hub (pip install 'disploss[vae]'); or pass a local "
            "model folder"
        ) from None
    unreachable = hub_unreachable(hub_id)
    try:
        # Offline, only the local cache can have it: one look there, no download attempt and no retries.
        folder = Path(
            huggingface_hub.snapshot_download(
                hub_id, allow_patterns=patterns or [*files, CARD_NAME], revision=revision, cache_dir=cache_dir,
                local_files_only=unreachable is not None,
            )
        )  # fmt: skip
    except (OSError, ValueError) as err:
        reason = " ".join(str(unreachable or err).split())[:300] or type(err).__name__
        raise HubUnavailableError(
            f"{flag} {hub_id}: could not fetch the model from the Hugging Face hub, nor find it in the local cache "
            f"({reason}). Without network access pass {flag} DIR, a local copy of the model folder (run `hf download "
            f"{hub_id} --local-dir DIR` where the hub is reachable)"
        ) from err
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{flag} {hub_id}: the hub repository (or its cached copy) has no {' and no '.join(missing)}: it is not a "
            "disploss model folder"
        )
    return folder


def read_config(folder: Path) -> dict:
    """config.json of a model folder as a dict (ConfigError when it is not a JSON object)."""
    return read_json_object(Path(folder) / CONFIG_NAME, fix="export the model folder again")


def read_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and config.json of a model folder (already resolved: see `resolve`).

    Returns:
        (tensors by name, on the CPU; the config.json dict).
    Raises:
        ConfigError: an unreadable config.json or weights file.
        NonFiniteWeightsError: naming the file and the first tensor holding NaN or infinity, with the counts.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config = read_config(folder)
    path = folder / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"cannot read {path}: {err}; the file is damaged or not a safetensors file") from err
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteWeightsError(
            f"{path} holds non-finite values in {bad}: the weights are unusable (its run had diverged, or the file is "
            "damaged); export an earlier checkpoint"
        )
    return state, config


def constructor_args(config: Mapping[str, Any], cls: type, source: str | os.PathLike = CONFIG_NAME) -> dict:
    """The entries of a config.json that are arguments of `cls.__init__`; keys starting with '_' and the "disploss"
    entry are metadata. Any other key is a ConfigError (written by a newer version, or by hand)."""
    params = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = [key for key in config if key not in params and not key.startswith("_") and key != INFO_KEY]
    if unknown:
        raise ConfigError(
            f"{source} has settings that {cls.__name__} does not take: {', '.join(unknown)} (written by a newer "
            f"disploss?); valid keys: {', '.join(params)}"
        )
    return {key: config[key] for key in params if key in config}


def load_pretrained(
    cls: type, name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir=None,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:  # fmt: skip
    """Build `cls` from a model folder or hub id's config.json and load its weights strictly (see SiT.from_pretrained).

    Raises:
        ConfigError: the weights do not fit the config (each differing key with both shapes); NonFiniteWeightsError;
        MissingFileError / HubUnavailableError (see `resolve`).
    """
    folder = resolve(name_or_path, flag=f"{cls.__name__}.from_pretrained:", revision=revision, cache_dir=cache_dir)
    state, config = read_folder(folder)
    model = cls(**constructor_args(config, cls, folder / CONFIG_NAME))
    diff = shape_differences(state, model.state_dict())
    if diff:
        shown = diff[:6] + ([f"  ... and {len(diff) - 6} more"] if len(diff) > 6 else [])
        raise ConfigError(
            f"{folder / WEIGHTS_NAME} does not fit the model of its {CONFIG_NAME}:\n" + "\n".join(shown)
            + "\nthe two files come from different models: export the folder again"
        )  # fmt: skip
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def write_folder(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: dict, card: str | None) -> Path:
    """Write a model folder: model.safetensors, config.json and (when given) README.md.

    A new or empty `folder` appears whole: the files are written into a temporary folder beside it, which is then
    renamed; into a folder that holds other files, each file is replaced atomically, the weights first.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; a model folder is a directory (choose another name)")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}

    def write(into: Path) -> None:
        with atomic_path(into / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_json(into / CONFIG_NAME, config)
        if card is not None:
            with atomic_path(into / CARD_NAME) as tmp:
                tmp.write_text(card)

    if folder.is_dir() and any(folder.iterdir()):
        write(folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, dir_mode())  # as mkdir would (mkdtemp makes it 0700)
        write(tmp)
        os.replace(tmp, folder)  # an empty folder of that name is replaced; a non-empty one cannot be (checked above)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_pretrained(model: torch.nn.Module, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """Save `model` (anything with a `config()` of its constructor arguments) as a model folder (see SiT.save_pretrained).

    Args:
        info: the "disploss" entry of config.json (how the weights were made); None: none.
    """
    from disploss import __version__

    config = {"_class_name": type(model).__name__, "_disploss_version": __version__, **model.config()}
    if info:
        config[INFO_KEY] = info
    card = None if (Path(folder) / CARD_NAME).exists() else minimal_card(config)
    return write_folder(folder, model.state_dict(), config, card)


def minimal_card(config: Mapping[str, Any]) -> str:
    """The model card of a folder saved from Python: front matter and how to load it (`disploss export` writes the
    full card, from the training run's settings and its metrics)."""
    objective = "meanflow" if config.get("meanflow") else "flow-matching"
    return (
        "---\nlibrary_name: disploss\ntags:\n- disploss\n- sit\n- " + objective + "\n- image-generation\n---\n\n"
        f"# {config.get('_class_name', 'SiT')}\n\n"
        "Saved with `SiT.save_pretrained`. Load it with:\n\n"
        '```python\nfrom disploss.models import SiT\n\nmodel = SiT.from_pretrained("THIS_FOLDER_OR_HUB_ID")\n```\n'
    )


def push_folder(
    folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
    commit_message: str = "Upload a disploss model folder",
) -> str:  # fmt: skip
    """Upload a model folder to the Hugging Face hub (the repository is created when missing); returns the commit
    URL. Needs network access and a token (`hf auth login`)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MissingDependencyError("pushing to the hub needs huggingface_hub: pip install 'disploss[vae]'") from None
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    return str(api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 commit_message=commit_message))  # fmt: skip
