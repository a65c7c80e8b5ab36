"""The tests' shared helpers (test modules import from here, never from each other): the one tiny-SiT builder and
the checkpoint `disploss train` writes, a tiny ImageFolder, VAE and latent cache, the flags of a tiny CPU run,
running a `disploss` command in process, in a subprocess or under torchrun, and the one state-dict comparison."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "train.py"  # the reference's entry point: `torchrun ... train.py --model ... --data-path ... --disp`
MODEL = "SiT-T/2"  # the smallest named model (depth 6, width 128): the one the commands' test checkpoints name

TINY_SIT = dict(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
PIXEL_SIT = dict(input_size=8, in_channels=3, num_classes=5)  # MODEL on 8 px RGB: the checkpoints of the commands
MEANFLOW_SIT = dict(meanflow=True, patch_size=2, in_channels=3)  # with TINY_SIT's width and depth


def tiny_sit(seed: int = 0, *, preset: str | None = None, dtype: torch.dtype = torch.float32, **config):
    """The tests' SiT: TINY_SIT updated by `config` (or the named `preset`, e.g. MODEL, at PIXEL_SIT's sizes updated
    by `config`), drawn from `seed`, with its zero-initialised layers (the adaLN modulations and the final linear)
    re-drawn so its output is not zero. Eval mode."""
    from disploss.models import SiT, create_model

    torch.manual_seed(seed)
    model = create_model(preset, **{**PIXEL_SIT, **config}) if preset else SiT(**{**TINY_SIT, **config})
    with torch.no_grad():
        final = model.final_layer
        for module in [*(b.adaLN_modulation[-1] for b in model.blocks), final.adaLN_modulation[-1], final.linear]:
            module.weight.normal_(0, 0.1)
            module.bias.normal_(0, 0.1)
    return model.to(dtype).eval()


def save_training_checkpoint(path: Path, ema, model=None, **args) -> Path:
    """A checkpoint as `disploss train` writes it for a pixel-space MODEL: model, ema, opt, args (a plain dict with
    model_config); `args` overrides the stored settings."""
    from disploss.checkpoint import save_checkpoint

    stored = {
        "model": MODEL, "image_size": 8, "num_classes": ema.num_classes, "vae": "none", "path_type": "Linear",
        "prediction": "velocity", "loss_weight": None, "sample_eps": None, "train_eps": None,
        "model_config": ema.config(), **args,
    }  # fmt: skip
    model = model if model is not None else ema
    return save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": stored})


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 8, seed: int = 0) -> Path:
    """root/class_{k}/{i}.png: random RGB PNGs (a few larger than `size`, so the centre crop runs)."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = size if i % 3 else size + 4
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_flags(data: Path | str, results: Path | str, steps: int = 4, **overrides) -> list[str]:
    """Flags of a tiny CPU run: SiT-T/2 on 8 px pixels, 3 classes, batch 8, a checkpoint and a log line per
    step, no sample grids. `overrides` replace or add flags: ckpt_every=2 -> --ckpt-every 2; True -> a switch."""
    flags = {
        "model": "SiT-T/2", "data_path": data, "vae": "none", "image_size": 8, "num_classes": 3,
        "global_batch_size": 8, "num_workers": 0, "max_steps": steps, "log_every": 1, "ckpt_every": 1,
        "sample_every": 0, "results_dir": results, "device": "cpu",
    }  # fmt: skip
    flags.update(overrides)
    argv: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def train_cli(argv: list[str]) -> int:
    """`disploss train ARGV` in this process; returns the exit status."""
    from disploss.commands.main import main

    return main(["train", *map(str, argv)])


def env(**extra: str) -> dict:
    """Environment of a child process: one thread per process (two cores are shared), no GPU."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    out = {k: v for k, v in os.environ.items() if k not in launcher}  # a child decides its own world
    out.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def run_python(args: list, cwd: Path, timeout: float = 180, **extra_env: str) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process (text output captured)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env(**extra_env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def torchrun(nproc: int, args: list, cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nnodes=1 --nproc_per_node=N ARGS` (gloo on CPU). --standalone picks a free
    port, so concurrent test sessions do not collide on 29500."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    return run_python([*launcher, *args], cwd, timeout=timeout, **extra_env)


def run_dirs(results: Path) -> list[Path]:
    """The experiment folders in a --results-dir, by name."""
    return sorted(p for p in Path(results).iterdir() if p.is_dir())


def only_run(results: Path) -> Path:
    (folder,) = run_dirs(results)
    return folder


def checkpoint_names(run: Path) -> list[str]:
    """The files in a run folder's checkpoints/, by name."""
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def load(path: Path) -> dict:
    """A checkpoint, loaded the strict way (no code can run)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the tensors of two state dicts with the same keys and shapes (NaN where either holds
    one, so `== 0` means equal)."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)


def save_tiny_vae(folder: Path, scaling_factor: float | None = None, latent_channels: int = 4) -> Path:
    """A tiny random diffusers AutoencoderKL (downsampling factor 2) saved to `folder` with save_pretrained;
    diffusers' default scaling_factor (the SD value) unless one is given."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kwargs = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
        sample_size=16, **kwargs,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def write_latent_cache(root: Path, complete: bool = True) -> Path:
    """A valid latent cache of LATENT_COUNT items of LATENT_SHAPE, 3 classes, written with the format module (no VAE
    needed): moments drawn from N(0, 1), std 0.1. Without `complete` it has no manifest (an interrupted extraction)."""
    from disploss.data import latents as fmt

    rng = np.random.default_rng(0)
    plan = {
        "format": fmt.LATENT_FORMAT, "version": fmt.LATENT_FORMAT_VERSION, "image_size": 8, "vae": "ema",
        "scale": 0.18215, "shift": 0.0, "latent_shape": list(LATENT_SHAPE), "downsample_factor": 2,
        "count": LATENT_COUNT, "num_classes": 3, "class_names": ["a", "b", "c"], "shard_size": 8, "num_shards": 2,
        "dtype": "float32", "alpha": "white", "data_path": "/nowhere", "layout": fmt.LAYOUT,
    }  # fmt: skip
    fmt.prepare_cache_folder(root, plan)
    for k in range(2):
        moments = rng.standard_normal((8, 2, 2, *LATENT_SHAPE)).astype(np.float32)
        moments[:, :, 1] = 0.1
        fmt.write_shard(root, k, moments, np.arange(8) % 3)
    if complete:
        fmt.write_manifest(root, plan)
    return root


LATENT_COUNT, LATENT_SHAPE = 16, (4, 4, 4)  # 2 shards of 8 (SiT-T/2 on 4x4x4 latents: "8 px" images, VAE factor 2)


def call(capsys, argv: list[str]) -> tuple[int, str, str]:
    """Run `disploss ...` in this process: (exit code, stdout, stderr)."""
    from disploss.commands.main import main

    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package); its main() does not run on import."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_random_inception_weights(path: Path) -> Path:
    """Save a state dict with torch-fidelity's Inception-v3 layout and seeded random values (He-scaled convs)."""
    # Build the architecture without weights: skip the download and the state dict loading once.
    import pytest
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        template = tf_inception.FeatureExtractorInceptionV3("template", ["2048"]).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in template.items():
        if name.endswith("conv.weight"):
            tensor = torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
        elif name.startswith("fc."):
            tensor = torch.randn(tensor.shape, generator=generator) * (0.2 if name == "fc.weight" else 1.0)
        state[name] = tensor.clone()
    torch.save(state, path)
    return path


def error_line(capsys) -> str:
    """The one line `disploss train` printed to stderr (asserting it is one line, not a traceback)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("disploss train: error: ") and "\n" not in err and "Traceback" not in err, err
    return err
