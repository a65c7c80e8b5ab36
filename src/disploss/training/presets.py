"""Named training settings (`--preset NAME`): the paper's two implementations and the CPU demo, as values laid under
the flags given, then built into a frozen TrainConfig that records the name.

    from disploss.training import presets, train
    train(presets.build("jax", model="SiT-B/2", data_path="/data/imagenet/train", disp=True))
    train(presets.demo("results/demo", steps=1500))

- `release`: the official PyTorch release (its README's table): lambda 0.25, tau 1, InfoNCE-L2 on the last block,
  AdamW lr 1e-4, beta2 0.999, global batch 256 (32 per GPU on 8), EMA 0.9999: the reference's defaults, by name.
- `jax`: the paper's JAX runs: lambda 0.5, tau 0.5, the block at depth num_layers // 4 (block 7 of SiT-XL/2's 28,
  index 6), AdamW beta2 0.95 as the paper's text states, global batch 256 (16 per device on 16).
- `demo`: the CPU demo (`disploss demo`, behind `make demo`), also the small-run recipe of docs/quickstart.md.

A preset sets no `disp`: `--disp` turns the term on, so that a preset's baseline and dispersive runs differ in that
flag alone, as the official README's commands do. Where the numbers come from: docs/paper.md; the full pipeline per
row of the official table: docs/reproducing.md.
"""

from __future__ import annotations

from disploss.errors import ConfigError
from disploss.training.config import DIGITS, PRESET_HELP, TrainConfig

PRESETS = tuple(PRESET_HELP)

# The method's settings in the two implementations (docs/paper.md, "Settings").
_RELEASE = dict(
    disp_weight=0.25, disp_tau=1.0, disp_variant="infonce_l2", disp_block="-1", lr=1e-4, beta2=0.999,
    global_batch_size=256, ema_decay=0.9999,
)  # fmt: skip
_JAX = {**_RELEASE, "disp_weight": 0.5, "disp_tau": 0.5, "beta2": 0.95}  # disp_block: depth // 4, by model

# Why these values: 8 px is the digits' own resolution (16 px would be a bilinear upsample of the same images at 4x the
# cost per step); grids enlarge them. EMA 0.99 (half-life ~70 steps): with the reference's 0.9999, or even 0.999, the
# EMA after 1500 steps still holds much of the initial weights and samples noise.
# The dispersive variant is InfoNCE with cosine distance (a variant of the paper, section 3), not the release's
# InfoNCE-L2: on a model this small, InfoNCE-L2 at lambda 0.25, tau 1 reaches its floor -log B by inflating the
# hidden activations about 5x and the samples stop following their class (experiments/digits: feature-FID 252
# against 89 for the baseline at 800 steps); the cosine variant cannot inflate norms. `--disp-variant
# infonce_l2 --disp-tau 1` runs the release's settings.
_DEMO = dict(
    data_path=DIGITS, vae="none", image_size=8, model="SiT-T/2", num_classes=10, global_batch_size=64,
    lr=1e-3, ema_decay=0.99, disp_variant="infonce_cosine", disp_weight=0.25, disp_tau=0.5,
    num_workers=0, log_every=50,
    cfg_scale=2.0, precision="fp32", sample_steps=50,
)  # fmt: skip
DEMO_STEPS = 1500


def jax_block(model: str) -> str:
    """The paper's JAX block for `model`: the output of block num_layers // 4 (1-based), as a --disp-block index."""
    from disploss.models import parse_model_name

    return str(parse_model_name(model)[0] // 4 - 1)


def preset_values(name: str, model: str | None = None) -> dict:
    """The TrainConfig fields preset `name` sets, for `model` where they depend on it (jax's block; default: the
    preset's model, else TrainConfig's).

    Raises:
        ConfigError: an unknown name, naming the valid ones.
    """
    from disploss.models import MODEL_PRESETS

    if name == "release":
        return dict(_RELEASE)
    if name == "jax":
        model = model or TrainConfig.model
        return {**_JAX, "disp_block": jax_block(model)} if model in MODEL_PRESETS else dict(_JAX)
    if name == "demo":
        return {**_DEMO, "max_steps": DEMO_STEPS, "ckpt_every": DEMO_STEPS, "sample_every": DEMO_STEPS}
    raise ConfigError(f"--preset {name!r} is not a known preset; valid choices: {', '.join(PRESETS)}")


def build(name: str | None = None, **given) -> TrainConfig:
    """The TrainConfig of preset `name` (None: TrainConfig's defaults) with the fields `given` laid over it, recording
    the name in `preset`.

    Args:
        name: a preset of PRESETS, or None.
        given: TrainConfig fields that override the preset (the flags given on the command line).
    Raises:
        ConfigError: an unknown preset or an invalid value.
    """
    if name is None:
        return TrainConfig(**given)
    values = preset_values(name, given.get("model"))
    return TrainConfig(**{**values, **given, "preset": name})


def describe(cfg: TrainConfig) -> str | None:
    """The log line of a run built from a preset: its values, those the flags given override, and a note when
    --disp is off (the preset's dispersive settings are then unused); None without a preset."""
    if cfg.preset is None:
        return None
    values = preset_values(cfg.preset, cfg.model)
    shown = ", ".join(f"{k} {v}" for k, v in values.items())
    over = [f"{k} {getattr(cfg, k)}" for k, v in values.items() if getattr(cfg, k) != v]
    line = f"preset {cfg.preset} ({PRESET_HELP[cfg.preset]}): {shown}"
    if over:
        line += f"; the flags given override {', '.join(over)}"
    if not cfg.disp:
        line += "; --disp is off, so its dispersive settings are unused (a baseline)"
    return line


def demo(
    results_dir: str = "results/demo", steps: int = DEMO_STEPS, disp: bool = True, seed: int = 0, device: str = "cpu",
    **overrides,
) -> TrainConfig:  # fmt: skip
    """The demo: a small SiT (SiT-T/2) with dispersive loss on scikit-learn's bundled digits, in pixel space on the
    CPU, in minutes; checkpoints and the sample grid at the last step only.

    Args:
        results_dir: parent folder of the run.
        steps: training steps (max_steps; also the checkpoint and sample-grid interval).
        disp: train with the dispersive term (False: the baseline).
        seed: global seed.
        device: cpu or cuda.
        overrides: any other TrainConfig field, e.g. disp_variant / disp_weight / disp_tau.
    """
    return TrainConfig(**{
        **_DEMO, "results_dir": results_dir, "max_steps": steps, "ckpt_every": steps, "sample_every": steps,
        "disp": disp, "global_seed": seed, "device": device, **overrides,
    })  # fmt: skip
