"""BenchConfig: every setting of `disploss bench`; sizes left None take the --quick or the full defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from disploss.errors import ConfigError
from disploss.options import at_least, check_options, option, positive
from disploss.runtime import DEVICES, PRECISIONS
from disploss.training.config import check_block_spec

SECTIONS = ("train", "disp", "sample", "paths", "profile")
TRAIN_VARIANTS = ("nodisp", "disp")
SAMPLERS = ("dopri5", "dopri5-batch", "euler", "heun2", "ab2", "ab3", "sde-euler")
ADAMW_IMPLS = ("auto", "fused", "foreach", "for-loop")
VAE_FACTOR = 8  # SD-VAE: 256 px images -> 32 x 32 x 4 latents

# --quick: tiny settings for CI (seconds on a CPU); explicit flags still win.
QUICK = dict(model="SiT-T/2", batch=4, input_size=8, num_classes=10, steps=3, warmup=2, disp_batch=8,
             disp_dim=4096, sample_batch=2, sample_batches=1, sample_steps=4)  # fmt: skip
FULL = dict(model="SiT-XL/2", batch=32, input_size=None, num_classes=1000, steps=10, warmup=3, disp_batch=32,
            disp_dim=256 * 1152, sample_batch=None, sample_batches=1, sample_steps=50)  # fmt: skip


def _names(text: str, choices: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in choices]
    if bad or not items:
        raise ConfigError(f"{flag}: unknown {bad or 'empty list'}; valid choices: {', '.join(choices)}")
    return items


def _check_block_specs(text: str) -> str | None:
    return next(filter(None, map(check_block_spec, block_specs(text))), None)


def block_specs(text: str) -> list[str]:
    """The --disp-block values of --disp-blocks ('0,6,11;all' -> ['0,6,11', 'all'])."""
    return [s.replace(" ", "") for s in text.split(";") if s.strip()]


@dataclass(frozen=True)
class BenchConfig:
    """Every flag of `disploss bench` (see benchmarks.bench.sections for what each section measures)."""

    sections: str = option("train,disp,sample", f"comma list of {', '.join(SECTIONS)}")
    quick: bool = option(False, f"tiny settings for CI, seconds on a CPU: {QUICK}")
    json: str | None = option(None, "write every number to this JSON file", metavar="OUT")
    reference_path: str | None = option(
        None, "a checkout of the reference code (SiT / DispLoss: models.py with SiT_models, needs timm): time its "
        "model and loss beside ours in the train section", metavar="DIR",
    )  # fmt: skip
    meanflow: bool = option(
        False, "train section: also time the MeanFlow step (`train --objective meanflow`, the paper's defaults) "
        "against the flow step, interleaved, and count the activations each keeps for backward",
    )  # fmt: skip
    model: str | None = option(None, f"model preset (default {FULL['model']}; --quick {QUICK['model']})")
    batch: int | None = option(None, f"training batch per device (default {FULL['batch']})", check=at_least(1))
    image_size: int | None = option(None, f"image side in pixels; latents are image/{VAE_FACTOR} (default 256)",
                                    check=at_least(1), exclusive="size")  # fmt: skip
    input_size: int | None = option(None, "latent (model input) side, instead of --image-size", check=at_least(1),
                                    exclusive="size")  # fmt: skip
    in_channels: int = option(4, "model input channels", check=at_least(1))
    num_classes: int | None = option(None, f"classes (default {FULL['num_classes']})", check=at_least(1))
    grad_checkpointing: bool = option(False, "recompute block activations in backward")
    precision: str = option("tf32", "fp32, tf32 (fp32 with TF32 matmuls, the reference) or bf16 autocast",
                            choices=PRECISIONS)  # fmt: skip
    device: str | None = option(None, "cuda or cpu (default: cuda when available)", choices=(None, *DEVICES))
    compile: bool = option(False, "torch.compile the model (the warm-up then compiles)")
    adamw: str = option("auto", "AdamW implementation; auto = what `disploss train` uses (fused where torch has it)",
                        choices=ADAMW_IMPLS)  # fmt: skip
    steps: int | None = option(None, f"measured steps per variant (default {FULL['steps']})", check=at_least(1))
    warmup: int | None = option(None, f"warm-up steps per variant, not measured (default {FULL['warmup']})",
                                check=at_least(0))  # fmt: skip
    threads: int | None = option(
        None, "CPU threads of torch (default: torch's; --quick on a CPU: 1, since two threads on a loaded 2-core "
        "machine can be 10-100x slower while OpenMP waits for a descheduled thread)", check=at_least(1),
    )  # fmt: skip
    seed: int = option(0, "random seed")
    peak_tflops: float | None = option(
        None, "peak TFLOP/s for MFU (default: H100/H200 dense datasheet for the precision: bf16 989, tf32 494.7, fp32 "
        "66.9)", check=positive,
    )  # fmt: skip
    disp_blocks: str = option(
        "", "more dispersive variants of the train section, beside ours_disp (the last block): --disp-block values "
        "separated by ';', e.g. all or '0,6,11;all', each timed as ours_disp[VALUE]", check=_check_block_specs,
        metavar="SPECS",
    )  # fmt: skip
    disp_weight: float = option(0.25, "lambda (the reference's)")
    disp_tau: float = option(1.0, "temperature", check=positive)
    disp_batch: int | None = option(
        None, f"B of the loss-alone timing (default {FULL['disp_batch']})", check=at_least(1)
    )
    disp_dim: int | None = option(None, f"M = T*D of the loss-alone timing (default {FULL['disp_dim']} = 256*1152)",
                                  check=at_least(1))  # fmt: skip
    samplers: str = option(",".join(SAMPLERS), f"comma list of {', '.join(SAMPLERS)} (default: all)")
    sample_batch: int | None = option(None, "sampling batch (default: --batch)", check=at_least(1))
    sample_batches: int | None = option(None, "measured batches per sampler (default 1)", check=at_least(1))
    max_nfe: int | None = option(
        None, "stop a sampler after this many model calls per batch and report it (guards the adaptive dopri5, whose "
        "NFE has no bound; default: no limit)", check=at_least(1),
    )  # fmt: skip
    sample_steps: int | None = option(
        None, f"grid points of the fixed-step samplers and the SDE (default {FULL['sample_steps']}); dopri5 is "
        "adaptive", check=at_least(2),
    )  # fmt: skip
    train_variants: str = option("nodisp,disp", "train section: the variants timed (one compile each with --compile)")
    profile_steps: int = option(3, "profile section: training steps under torch.profiler", check=at_least(1))
    paths_batches: str = option(
        "4,64", "paths section: the small (sample_ddp's default --per-proc-batch-size) and the large sampling batch",
    )  # fmt: skip

    def __post_init__(self):
        check_options(self)
        _names(self.sections, SECTIONS, "--sections")
        _names(self.samplers, SAMPLERS, "--samplers")
        _names(self.train_variants, TRAIN_VARIANTS, "--train-variants")
        self.paths_batch_sizes  # noqa: B018  (checks the flag now)
        if self.image_size and self.input_size and self.input_size != self.image_size // VAE_FACTOR:
            raise ConfigError("--image-size and --input-size are alternatives: give one of them")

    @property
    def section_list(self) -> tuple[str, ...]:
        return _names(self.sections, SECTIONS, "--sections")

    @property
    def paths_batch_sizes(self) -> tuple[int, int]:
        """(small, large) batch of the paths section."""
        try:
            small, large = (int(v) for v in self.paths_batches.split(","))
        except ValueError:
            raise ConfigError(
                f"--paths-batches: expected two integers SMALL,LARGE, got {self.paths_batches!r}"
            ) from None
        if not 1 <= small <= large:
            raise ConfigError(f"--paths-batches: expected 1 <= SMALL <= LARGE, got {self.paths_batches!r}")
        return small, large

    @property
    def sampler_list(self) -> tuple[str, ...]:
        return _names(self.samplers, SAMPLERS, "--samplers")

    def resolved(self) -> BenchConfig:
        """Every size filled from --quick's or the full defaults (explicit values win); checks the model and its
        patch size against the input size."""
        from disploss.models import parse_model_name

        base = QUICK if self.quick else FULL
        values = {k: v for k, v in base.items() if getattr(self, k) is None}
        out = dataclasses.replace(self, **values)
        if out.input_size is None:
            out = dataclasses.replace(out, input_size=(out.image_size or 256) // VAE_FACTOR)
        if out.sample_batch is None:
            out = dataclasses.replace(out, sample_batch=out.batch)
        patch = parse_model_name(out.model)[3]
        if out.input_size % patch:
            raise ConfigError(
                f"the input size {out.input_size} is not divisible by the patch size {patch} of {out.model}"
            )
        return out
