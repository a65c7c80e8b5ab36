"""The sample folder of `disploss sample-ddp`: its name, its record of settings, its PNGs and the .npz.

Where the files go (the reference's layout, with a name that holds every setting that changes the images and
none that does not, such as the batch size or the number of processes):
    {sample_dir}/{folder}/{index:06d}.png, {sample_dir}/{folder}/sample_config.json, {sample_dir}/{folder}.npz
    folder = {model}-{ckpt name}[-ema|-model]-{fingerprint}-size-{image_size}-vae-{vae}-cfg-{cfg}-seed-{global_seed}
             -{mode}-{steps}-{method}
             [-{diffusion_form}-{last_step}-{last_step_size} for SDE][-power{rho} for --time-schedule power]
             [-batchsteps for --step-control batch][-guide-{K|all} if not 3 and cfg > 1]
             [-round for --pixel-conversion round]
with '/' replaced by '-' (a --vae folder contributes its base name). The ckpt name is the checkpoint's file stem
(a model folder's or hub id's name); ema or model says which weights of a checkpoint holding both were sampled
(--weights; a bare state dict has no tag); the fingerprint (8 hex digits, disploss.statedict.fingerprint) names the
weights' content, so two checkpoints of the same name (step 400000 of two runs) get folders of their own, and a
checkpoint that was moved, or exported to another format, finds its folder again.

sample_config.json records the resolved settings; a later run into the same folder with different settings stops
with an error instead of mixing images. The .npz holds images 0 .. N-1; a run with a smaller --num-fid-samples
than an existing .npz's count writes `{folder}-n{N}.npz` beside it instead of replacing it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from disploss.errors import ConfigError
from disploss.sampling.config import REFERENCE_GUIDE_CHANNELS

CONFIG_FILE = "sample_config.json"
_PNG_NAME = re.compile(r"^(\d{6,})\.png$")
# Settings recorded in sample_config.json that may change between runs of one folder (they do not change
# which image an index gets, up to float rounding).
_FREE_KEYS = ("ckpt", "per_proc_batch_size", "num_fid_samples", "world_size", "precision", "tf32")
# (The ckpt may move: the folder is keyed by its weights' fingerprint, which is not free.)


def _vae_label(spec: str) -> str:
    path = Path(spec).expanduser()
    if spec not in ("ema", "mse", "none") and path.is_dir():
        return path.resolve().name
    return spec.replace("/", "-")


def folder_name(config: dict) -> str:
    """The sample folder's name (see the module docstring); '/' never appears in it. Without a "fingerprint" in
    `config`, the name of a folder made before folders were keyed by the weights."""
    keyed = "fingerprint" in config  # folders made before they were keyed by the weights have neither part
    weights = [config["weights"]] if keyed and config.get("weights") in ("ema", "model") else []
    parts = [
        config["model"],
        config["ckpt_name"],
        *weights,
        *([config["fingerprint"]] if keyed else []),
        "size",
        config["image_size"],
        "vae",
        _vae_label(config["vae"]),
        "cfg",
        config["cfg_scale"],
        "seed",
        config["global_seed"],
        config["mode"],
        config["num_sampling_steps"],
        config["sampling_method"],
    ]
    if config["mode"] == "SDE":
        parts += [config["diffusion_form"], config["last_step"], config["last_step_size"]]
    if config.get("time_schedule", "uniform") != "uniform":
        parts.append(f"{config['time_schedule']}{config['time_rho']:g}")
    if config.get("step_control") == "batch":
        parts.append("batchsteps")
    if config["guide_channels"] not in ("unused", REFERENCE_GUIDE_CHANNELS):
        parts += ["guide", config["guide_channels"]]
    if config["pixel_conversion"] != "truncate":
        parts.append(config["pixel_conversion"])
    return "-".join(str(p) for p in parts).replace("/", "-")


def legacy_folder_name(config: dict) -> str:
    """The name the folder of these settings had before sample folders were keyed by the weights."""
    return folder_name({k: v for k, v in config.items() if k not in ("fingerprint", "weights")})


def npz_path_for(folder: Path, num: int) -> tuple[Path, int | None]:
    """Where the .npz of images 0 .. num-1 goes: `{folder}.npz`, unless that file holds more images (a smaller run
    never replaces it), then `{folder}-n{num}.npz`. Returns (the path, the larger file's count or None)."""
    main = folder.with_name(folder.name + ".npz")
    count = npz_image_count(main) if main.is_file() else None
    if count is not None and count > num:
        return folder.with_name(f"{folder.name}-n{num}.npz"), count
    return main, None


def sample_folder_of(npz_path: str | Path) -> Path | None:
    """The sample folder an .npz was built from (`{folder}.npz` or `{folder}-n{N}.npz` beside it), when it holds a
    sample_config.json; else None (an .npz made elsewhere)."""
    npz_path = Path(npz_path)
    stem = npz_path.name[: -len(".npz")] if npz_path.name.endswith(".npz") else npz_path.name
    for name in (stem, re.sub(r"-n\d+$", "", stem)):
        if (npz_path.parent / name / CONFIG_FILE).is_file():
            return npz_path.parent / name
    return None


def existing_indices(folder: Path) -> set[int]:
    """Indices of the complete PNGs `{index:06d}.png` in `folder` (temporary files are not counted)."""
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for entry in folder.iterdir() if (m := _PNG_NAME.match(entry.name))}


def missing_indices(folder: Path, num: int) -> list[int]:
    """Indices in [0, num) without a PNG, in increasing order."""
    present = existing_indices(folder)
    return [i for i in range(num) if i not in present]


def _check_config(folder: Path, config: dict) -> None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); remove it if the images in {folder} are yours") from err
    keys = sorted((set(old) | set(config)) - set(_FREE_KEYS))
    differ = [f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in keys if old.get(k) != config.get(k)]
    if differ:
        raise ConfigError(
            f"{folder} holds samples made with other settings ({'; '.join(differ)}); use another --sample-dir "
            f"or remove that folder"
        )


def prepare_folder(folder: Path, npz_path: Path, config: dict) -> list[int]:
    """Rank 0, before sampling: create the folder, check / write sample_config.json and remove a stale .npz;
    return the missing indices. (The temporary files of a killed run are removed by whoever claims their block:
    another launch may be writing its own right now.)"""
    from disploss.fileio import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    _check_config(folder, config)
    if existing_indices(folder) and not (folder / CONFIG_FILE).is_file():
        print(
            f"warning: {folder} holds PNGs but no {CONFIG_FILE}; assuming they were made with these settings",
            file=sys.stderr,
        )
    atomic_write_json(folder / CONFIG_FILE, config)
    missing = missing_indices(folder, config["num_fid_samples"])
    if missing and npz_path.exists():
        npz_path.unlink()  # it no longer describes a complete folder: it would be rebuilt anyway
        print(f"removed the stale {npz_path} ({len(missing)} images are missing)")
    return missing


def build_npz(folder: Path, num: int, npz_path: Path, image_size: int) -> tuple[int, ...]:
    """Stack PNGs 0 .. num-1 into `npz_path` (arr_0, uint8 (num, H, W, 3)), atomically.

    Raises:
        ValueError: a PNG is missing, unreadable or of another shape (its path is named).
    """
    from PIL import Image
    from tqdm import tqdm

    from disploss.evaluation.npz import save_samples_npz

    images = np.empty((num, image_size, image_size, 3), dtype=np.uint8)
    for i in tqdm(range(num), desc="building .npz", unit="img"):
        path = folder / f"{i:06d}.png"
        try:
            with Image.open(path) as img:
                array = np.asarray(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise ConfigError(f"cannot read {path} ({err}); delete it and rerun to sample it again") from err
        if array.shape != images.shape[1:] or array.dtype != np.uint8:
            raise ConfigError(
                f"{path} is {array.dtype} {array.shape}, expected uint8 {images.shape[1:]}; delete it "
                f"and rerun to sample it again"
            )
        images[i] = array
    save_samples_npz(npz_path, images)
    return images.shape


def npz_image_count(path: Path) -> int | None:
    """The number of images in an .npz's arr_0, from the array header only (no image is read); None if unreadable."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape = read_header(f)[0]
            return int(shape[0]) if shape else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
