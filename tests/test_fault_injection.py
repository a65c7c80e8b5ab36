"""Fault injection (issue 20, item 7): every kind of file the commands read, damaged in every way a table lists, given
to every entry point that reads it, ends in one line naming the file (status 2), or in a documented skip. Entry points
run in this process (disploss.commands.main.main); each table has a positive control, the undamaged file through the
same entry points, so that a row cannot pass for a reason other than the damage.

- training checkpoint .pt, through train --ckpt, sample, sample-ddp, convert-checkpoint: empty, truncated, flipped
  bytes, a NaN weight, a wrong shape, an integer weight, a pickled class, not a checkpoint;
- .safetensors, through sample, sample-ddp: empty, truncated, a flipped header byte, a NaN weight, a wrong shape, not
  safetensors;
- latent shard, through train --latents: empty, truncated, a flipped header, NaN, out of range, wrong shape, wrong
  dtype, an object array, a bad label;
- manifest.json, through train --latents: empty, truncated, a list, a wrong type, a missing field, a wrong shape;
- plan.json, through train --latents (an unfinished cache) and extract-latents (the rerun): empty, truncated, a
  wrong type;
- .npz, through evaluate as the sample and as the reference batch: empty, truncated, a bad CRC, an object array,
  float images, a wrong shape, string / object / NaN statistics, a .npy;
- image, through train and extract-latents: truncated, a flipped header byte, empty, not an image: skipped with a
  warning naming it (log.txt too), or one line with --on-bad-image error.

What no check here can find, and the docs say so (docs/operations.md): a changed byte inside a latent shard's data or a
compressed image's pixel data that leaves a plausible value (neither format carries checksums; checkpoints do).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from disploss.commands.main import main
from disploss.data import BadImageWarning
from disploss.data import latents as fmt
from trainkit import (
    make_image_folder,
    only_run,
    save_tiny_vae,
    tiny_flags,
    write_latent_cache,
)


def run(capsys, *argv) -> tuple[int, str]:
    """`disploss ARGV` in this process: (status, stderr)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def assert_one_line(status: int, err: str, command: str, *named: str) -> str:
    """Status 2 and one line `disploss COMMAND: error: ...` on stderr naming each of `named` (besides it only the
    command's own progress lines: extract-latents logs its plan and a progress bar on stderr)."""
    progress = ("[extract-latents] ", "extract-latents:")
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith(progress)]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"disploss {command}: error: "), lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def flip(path: Path, offset: int, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# -- training checkpoints (.pt) -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    """A one-step training checkpoint of the tiny run (with checksums, as every training checkpoint)."""
    results = tmp_path_factory.mktemp("trained")
    assert main(["train", *map(str, tiny_flags(images, results, steps=1))]) == 0
    return only_run(results) / "checkpoints" / "0000001.pt"


def _resaved(path: Path, change) -> None:
    from disploss.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(path)
    change(state)
    save_checkpoint(path, state, checksums=True)  # valid checksums: only the change itself is wrong


def _set(key: str, value):
    def change(state):
        for part in ("model", "ema"):
            state[part][key] = value(state[part][key])

    return change


def _nan_row(t: torch.Tensor) -> torch.Tensor:
    return t.index_fill(0, torch.tensor([3]), float("nan"))


def _pickled_class(path: Path) -> None:
    import argparse

    state = torch.load(path, weights_only=True)
    state["args"] = argparse.Namespace(**state["args"])  # what the reference's train.py stored
    torch.save(state, path)


def _data_record_offset(path: Path) -> int:
    # The middle of the largest tensor record of a torch zip archive.
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


CHECKPOINT_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "flipped bytes": lambda p: flip(p, _data_record_offset(p)),
    "NaN weight": lambda p: _resaved(p, _set("blocks.0.attn.qkv.weight", _nan_row)),
    "wrong shape": lambda p: _resaved(p, _set("pos_embed", lambda t: t[:, :-1].clone())),
    "integer weight": lambda p: _resaved(p, _set("final_layer.linear.weight", lambda t: (t * 1e4).to(torch.int64))),
    "pickled class": _pickled_class,
    "not a checkpoint": lambda p: p.write_bytes(b"this is a text file, not a checkpoint\n" * 20),
}  # fmt: skip
# convert-checkpoint of a plain checkpoint copies its tensors as they are (no SiT check: the file that uses them
# does it), so these two go through it; the others are refused by load_checkpoint.
CHECKPOINT_COPIED = {("integer weight", "convert-checkpoint"), ("wrong shape", "convert-checkpoint")}

SAMPLE = ["ODE", "--sampling-method", "euler", "--num-sampling-steps", "2", "--device", "cpu"]


def checkpoint_entry(entry: str, ckpt: Path, images: Path, tmp: Path) -> list:
    if entry == "train":
        return ["train", *tiny_flags(images, tmp / "results", steps=1, ckpt=ckpt)]
    if entry == "sample":
        return ["sample", *SAMPLE, "--ckpt", ckpt, "--out", tmp / "grid.png"]
    if entry == "sample-ddp":
        return ["sample-ddp", *SAMPLE, "--num-fid-samples", "2", "--ckpt", ckpt, "--sample-dir", tmp / "samples"]
    return ["convert-checkpoint", ckpt, tmp / "converted.pt"]


CHECKPOINT_ENTRIES = ("train", "sample", "sample-ddp", "convert-checkpoint")


@pytest.mark.parametrize("entry", CHECKPOINT_ENTRIES)
def test_an_undamaged_checkpoint_passes_every_entry_point(trained, images, tmp_path, capsys, entry):
    status, err = run(capsys, *checkpoint_entry(entry, trained, images, tmp_path))
    assert status == 0, err[-3000:]


@pytest.mark.parametrize("entry", CHECKPOINT_ENTRIES)
@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_it(trained, images, tmp_path, capsys, damage, entry):
    ckpt = tmp_path / "0000001.pt"
    ckpt.write_bytes(trained.read_bytes())
    CHECKPOINT_DAMAGE[damage](ckpt)
    status, err = run(capsys, *checkpoint_entry(entry, ckpt, images, tmp_path))
    if (damage, entry) in CHECKPOINT_COPIED:
        assert status == 0, err[-3000:]
        return
    assert_one_line(status, err, entry, str(ckpt))


# -- safetensors --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "ema.safetensors"
    assert main(["convert-checkpoint", str(trained), str(out)]) == 0
    return out


def _resaved_safetensors(change):
    def damage(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)

    return damage


def _nan_first(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("qkv.weight"))
    tensors[key] = tensors[key].index_fill(0, torch.tensor([1]), float("nan"))


def _shorter_pos_embed(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("pos_embed"))
    tensors[key] = tensors[key][:, :-1].contiguous()


SAFETENSORS_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "flipped header byte": lambda p: flip(p, 12, 2),  # inside the JSON header
    "NaN weight": _resaved_safetensors(_nan_first),
    "wrong shape": _resaved_safetensors(_shorter_pos_embed),
    "not safetensors": lambda p: p.write_bytes(b"\x00" * 64),
}


def safetensors_entry(entry: str, path: Path, images: Path, tmp: Path) -> list:
    return [*checkpoint_entry(entry, path, images, tmp), "--vae", "none"]  # the export stores no VAE


@pytest.mark.parametrize("entry", ["sample", "sample-ddp"])
def test_an_undamaged_safetensors_file_passes(exported, images, tmp_path, capsys, entry):
    status, err = run(capsys, *safetensors_entry(entry, exported, images, tmp_path))
    assert status == 0, err[-3000:]


@pytest.mark.parametrize("entry", ["sample", "sample-ddp"])
@pytest.mark.parametrize("damage", list(SAFETENSORS_DAMAGE))
def test_a_damaged_safetensors_file_is_one_line_naming_it(exported, images, tmp_path, capsys, damage, entry):
    path = tmp_path / "ema.safetensors"
    path.write_bytes(exported.read_bytes())
    SAFETENSORS_DAMAGE[damage](path)
    status, err = run(capsys, *safetensors_entry(entry, path, images, tmp_path))
    assert_one_line(status, err, entry, str(path))


# -- the latent cache: shards, manifest, plan ----------------------------------------------------------------------
def latents_entry(cache: Path, images: Path, tmp: Path) -> list:
    return ["train", *tiny_flags(images, tmp / "results", steps=2, latents=cache)]  # 2 steps read all 16 items


def _rewrite_shard(array_of):
    def damage(path: Path) -> None:
        array = np.load(path)
        with open(path, "wb") as f:
            np.save(f, array_of(array), allow_pickle=True)

    return damage


def _set_item(value):
    def change(a):
        a = a.copy()
        a[5, 1, 0, 2, 1, 3] = value
        return a

    return change


SHARD_DAMAGE = {  # (damage of moments_000000.npy or labels_000000.npy, the file the error names)
    "empty": (lambda p: p.write_bytes(b""), "moments"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "moments"),
    "flipped header": (lambda p: flip(p, 0, 3), "moments"),
    "NaN": (_rewrite_shard(_set_item(np.nan)), "moments"),
    "out of range": (_rewrite_shard(_set_item(3e38)), "moments"),  # an exponent bit flipped
    "wrong shape": (_rewrite_shard(lambda a: a[:, :, :, :3]), "moments"),
    "wrong dtype": (_rewrite_shard(lambda a: a.astype(np.float64)), "moments"),
    "object array": (_rewrite_shard(lambda a: np.array([object()] * len(a), dtype=object)), "moments"),
    "bad label": (_rewrite_shard(lambda a: np.where(np.arange(len(a)) == 5, 7, a)), "labels"),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_latent_cache(tmp_path_factory.mktemp("cache") / "latents")


def copy_cache(cache: Path, tmp: Path) -> Path:
    out = tmp / "latents"
    out.mkdir()
    for p in cache.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_an_undamaged_cache_trains(cache, images, tmp_path, capsys):
    status, err = run(capsys, *latents_entry(cache, images, tmp_path))
    assert status == 0, err[-3000:]


@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
def test_a_damaged_latent_shard_is_one_line_naming_it(cache, images, tmp_path, capsys, damage):
    root = copy_cache(cache, tmp_path)
    change, kind = SHARD_DAMAGE[damage]
    name = fmt.moments_name(0) if kind == "moments" else fmt.labels_name(0)
    change(root / name)
    status, err = run(capsys, *latents_entry(root, images, tmp_path))
    line = assert_one_line(status, err, "train", name)
    if damage in ("NaN", "out of range", "bad label"):  # read during training: the item is named, the data's fault
        assert "item 5 (row 5 of" in line and "Lower --lr" not in line and str(root) in line
    else:  # found from the header when the dataset opens: before any run folder exists
        assert str(root / name) in line and not (tmp_path / "results").exists()


def _edit_json(change):
    def damage(path: Path) -> None:
        value = json.loads(path.read_text())
        path.write_text(json.dumps(change(value)))

    return damage


MANIFEST_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "a list": _edit_json(lambda v: list(v)),
    "wrong type": _edit_json(lambda v: {**v, "count": "sixteen"}),
    "missing field": _edit_json(lambda v: {k: x for k, x in v.items() if k != "scale"}),
    "wrong shape": _edit_json(lambda v: {**v, "latent_shape": [4, 4]}),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_line_naming_it(cache, images, tmp_path, capsys, damage):
    root = copy_cache(cache, tmp_path)
    MANIFEST_DAMAGE[damage](root / fmt.MANIFEST_NAME)
    status, err = run(capsys, *latents_entry(root, images, tmp_path))
    assert_one_line(status, err, "train", str(root / fmt.MANIFEST_NAME))
    assert not (tmp_path / "results").exists()  # before the run folder


PLAN_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "wrong type": _edit_json(lambda v: {**v, "shard_size": None}),
}


@pytest.fixture(scope="module")
def vae_and_images(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extract")
    return save_tiny_vae(root / "vae"), make_image_folder(root / "images", per_class=2)


def extract_entry(vae: Path, data: Path, out: Path, *extra) -> list:
    return ["extract-latents", "--data-path", data, "--vae", vae, "--out", out, "--image-size", "8",
            "--num-classes", "3", "--num-workers", "0", "--device", "cpu", "--shard-size", "4", *extra]  # fmt: skip


@pytest.mark.parametrize("damage", list(PLAN_DAMAGE))
def test_a_damaged_plan_is_one_line_naming_it(cache, images, vae_and_images, tmp_path, capsys, damage):
    root = copy_cache(cache, tmp_path)
    (root / fmt.MANIFEST_NAME).unlink()  # an unfinished cache: train reads its plan to say what is missing
    PLAN_DAMAGE[damage](root / fmt.PLAN_NAME)
    status, err = run(capsys, *latents_entry(root, images, tmp_path))
    assert_one_line(status, err, "train", str(root / fmt.PLAN_NAME))

    vae, data = vae_and_images
    out = tmp_path / "extracted"
    status, err = run(capsys, *extract_entry(vae, data, out))
    assert status == 0, err[-3000:]
    PLAN_DAMAGE[damage](out / fmt.PLAN_NAME)
    status, err = run(capsys, *extract_entry(vae, data, out))  # the rerun that resumes an extraction
    assert_one_line(status, err, "extract-latents", str(out / fmt.PLAN_NAME))


# -- ADM .npz batches (disploss evaluate) -------------------------------------------------------------------------
def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _bad_crc(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arr_0.npy")
    flip(path, info.header_offset + 30 + len(info.filename) + len(info.extra) + 300)  # inside the image bytes


NPZ_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncate,
    "bad CRC": _bad_crc,
    "object array": lambda p: _npz(p, arr_0=np.array([object()] * 6, dtype=object)),
    "float images": lambda p: _npz(p, arr_0=_images().astype(np.float32) / 255),
    "wrong shape": lambda p: _npz(p, arr_0=_images()[..., 0]),
    ".npy": lambda p: np.save(open(p, "wb"), _images()),
}
STATISTICS_DAMAGE = {
    "string statistics": lambda p: _npz(
        p, mu=np.array(["1.0"] * 4), sigma=np.eye(4).astype(str), mu_s=np.zeros(3), sigma_s=np.eye(3)
    ),  # fmt: skip
    "NaN statistics": lambda p: _npz(p, mu=np.full(4, np.nan), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3)),
    "object statistics": lambda p: _npz(
        p, mu=np.array([object()] * 4, dtype=object), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3)
    ),  # fmt: skip
}


def evaluate_entry(ref: Path, sample: Path, tmp: Path) -> list:
    return ["evaluate", ref, sample, "--inception-weights", tmp / "no-weights.pth", "--device", "cpu", "--no-progress"]


def test_undamaged_batches_reach_the_inception_network(tmp_path, capsys):
    """The control: good batches pass every check of the files and stop only at the missing Inception weights."""
    ref, sample = _npz(tmp_path / "ref.npz", arr_0=_images(8, 1)), _npz(tmp_path / "sample.npz", arr_0=_images())
    line = assert_one_line(*run(capsys, *evaluate_entry(ref, sample, tmp_path)), "evaluate", "no-weights.pth")
    assert "--inception-weights" in line


@pytest.mark.parametrize(
    "damage, role",
    [(d, r) for d in NPZ_DAMAGE for r in ("sample", "reference")] + [(d, "reference") for d in STATISTICS_DAMAGE],
)  # statistics are read from the reference batch only
def test_a_damaged_npz_is_one_line_naming_it(tmp_path, capsys, damage, role):
    ref, sample = _npz(tmp_path / "ref.npz", arr_0=_images(8, 1)), _npz(tmp_path / "sample.npz", arr_0=_images())
    target = sample if role == "sample" else ref
    (NPZ_DAMAGE | STATISTICS_DAMAGE)[damage](target)
    assert_one_line(*run(capsys, *evaluate_entry(ref, sample, tmp_path)), "evaluate", str(target))


# -- images --------------------------------------------------------------------------------------------------------
IMAGE_DAMAGE = {
    "truncated": truncate,
    "flipped header byte": lambda p: flip(p, 16, 1),  # inside IHDR, whose CRC Pillow checks
    "empty": lambda p: p.write_bytes(b""),
    "not an image": lambda p: p.write_text("not an image\n"),
}


@pytest.mark.parametrize("damage", list(IMAGE_DAMAGE))
def test_a_damaged_image_is_skipped_naming_it_or_one_line(tmp_path, capsys, vae_and_images, damage):
    data = make_image_folder(tmp_path / "images", per_class=3)
    bad = data / "class_1" / "1.png"
    IMAGE_DAMAGE[damage](bad)
    flags = tiny_flags(data, tmp_path / "results", steps=1)
    warned = f"skipping unreadable image file {bad}"
    with pytest.warns(BadImageWarning, match=re.escape(warned)):  # on stderr outside pytest
        status, err = run(capsys, "train", *flags)
    assert status == 0, err[-3000:]
    assert warned in (only_run(tmp_path / "results") / "log.txt").read_text()
    assert_one_line(*run(capsys, "train", *flags, "--on-bad-image", "error"), "train", str(bad))

    vae, _ = vae_and_images
    with pytest.warns(BadImageWarning, match=re.escape(warned)):
        status, err = run(capsys, *extract_entry(vae, data, tmp_path / "latents"))
    assert status == 0, err[-3000:]
    out = tmp_path / "latents-strict"
    assert_one_line(
        *run(capsys, *extract_entry(vae, data, out, "--on-bad-image", "error")), "extract-latents", str(bad)
    )
