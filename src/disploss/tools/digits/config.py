"""The digits experiment (`disploss experiment digits`): dispersive loss weighed against its baseline at a scale
anyone can run.

    disploss experiment digits --threads 1          # baseline vs dispersive, seeds 0,1,2: ~20 min on 2 CPU cores
    disploss experiment digits --quick              # the same pipeline in under a minute (1 seed, tiny budget)
    disploss experiment digits --grid               # + every dispersive variant and a lambda x tau grid (hours)

`digits`: the demo's SiT (disploss.tools.demo.DEMO: SiT-T/2, pixel space, the bundled scikit-learn digits) is trained by
`disploss.training.train` for a fixed budget of steps in each arm and seed; checkpoints are written every
steps / evals steps. From the EMA weights of every checkpoint the same class-balanced set of images is drawn with
the same sampler (Heun ODE, fixed steps, fixed guidance scale, fixed noise: one generator seed shared by every
arm, seed and checkpoint), and scored in the feature space of a small digit classifier (disploss.tools.digits.classifier,
trained once on the "train" split, cached) against the real "holdout" digits:
    feature-FID   = Frechet distance of the feature Gaussians  (disploss.evaluation.metrics.frechet_distance)
    precision, recall = k-NN manifold precision / recall, k = 3 (disploss.evaluation.metrics.precision_recall)
    class accuracy = share of samples the classifier assigns to the class they were conditioned on.
Written into --out: results.json (every number and setting), results.md (mean +- std over seeds per arm, the
paired per-seed differences, the per-seed numbers), fid_vs_steps.png (mean with a +-1 std band per arm) and
samples_{arm}.png (the final samples of the first seed, a row per digit; real_digits.png the same for the
reference). Training runs live in --runs-dir (default {out}/runs, git-ignored); the same command run again resumes
unfinished runs and reuses the samples of finished checkpoints (and reports what they cost when they were made).

Choices, and why:
- Reference = the held-out split (about 360 real digits): the classifier never trained on them, just as it never
  saw the samples; the train split's features are fitted more tightly by the classifier and would bias the
  distance. (The generator trains on all 1797 digits, as the demo does: the reference is held out from the
  feature network, not from the generator.) --reference all uses every real digit instead. The score of the real
  train-split digits against the same reference is reported as a floor: a generator that reproduced its
  training data would score about that.
- 8 x 8 pixels by default (--image-size): the digits' own resolution, as the demo. 16 x 16 would be a bilinear
  upsample of the same 8 x 8 images at about 4x the cost per training step and per sample on a CPU.
- EMA decay 0.99 by default (--ema-decay), as the demo: with 0.999 the EMA of a 1500-step run still holds
  0.999**1500 = 22% of the random initialisation (69% at the first quarter), so early checkpoints would measure
  the EMA's lag, not the model.
- No guidance by default (--cfg-scale 1): the paper's no-cfg setting, and half the model calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from disploss.dispersive import VARIANTS
from disploss.errors import ConfigError
from disploss.options import at_least, check_options, in_interval, option
from disploss.runtime import DEVICES
from disploss.tools.digits.classifier import ClassifierConfig

REFERENCES = ("holdout", "all")


def int_list(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> tuple[float, ...]:
    """'0.25,0.5' -> (0.25, 0.5)."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


RESULTS_SCHEMA = "disploss-experiment-digits-v1"
METRICS = ("fid", "precision", "recall", "class_accuracy")


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Arm:
    """One training recipe: the baseline (disp=False) or a dispersive variant with its lambda and tau."""

    name: str
    disp: bool
    variant: str = "infonce_l2"
    weight: float = 0.25
    tau: float = 1.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown dispersive variant {self.variant!r}; valid choices: {', '.join(VARIANTS)}")
        if self.disp and not (self.weight > 0 and self.tau > 0):
            raise ConfigError(f"arm {self.name}: lambda and tau must be positive, got {self.weight}, {self.tau}")

    def describe(self) -> str:
        """A one-line description for tables."""
        if not self.disp:
            return "flow matching only"
        if self.variant == "covariance":
            return f"covariance, lambda={self.weight:g}"
        if self.variant == "hinge":
            return f"hinge, lambda={self.weight:g}"
        return f"{self.variant}, lambda={self.weight:g}, tau={self.tau:g}"


BASELINE = Arm("baseline", disp=False)
DISPERSIVE = Arm("dispersive", disp=True)  # the release's default: InfoNCE-L2, lambda 0.25, tau 1
# The demo's recipe (disploss.tools.demo.DEMO): InfoNCE with cosine distance, lambda 0.25, tau 0.5.
DISPERSIVE_COSINE = Arm("dispersive_cosine", disp=True, variant="infonce_cosine", weight=0.25, tau=0.5)


def grid_arms(lambdas: tuple[float, ...], taus: tuple[float, ...]) -> list[Arm]:
    """The arms --grid adds: the other three variants at the default lambda / tau, then InfoNCE-L2 over
    lambdas x taus (the default pair, which is the `dispersive` arm, left out)."""
    arms = [Arm(f"disp-{v}", disp=True, variant=v) for v in VARIANTS if v != DISPERSIVE.variant]
    for lam in lambdas:
        for tau in taus:
            if (lam, tau) != (DISPERSIVE.weight, DISPERSIVE.tau):
                arms.append(Arm(f"disp-l2-lam{lam:g}-tau{tau:g}", disp=True, weight=lam, tau=tau))
    return arms


@dataclass(frozen=True)
class DigitsConfig:
    """Every setting of `disploss experiment digits` (the flags, resolved)."""

    out: str = option("experiments/digits", "output folder of results.json / results.md / the plots")
    runs_dir: str | None = option(None, "folder of the training runs (default: OUT/runs, git-ignored)")
    cache_dir: str | None = option(
        None, "cache of the digit classifier (default: $DISPLOSS_CACHE or ~/.cache/disploss)"
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds, comma-separated; each arm runs every seed",
                                    parse=int_list)  # fmt: skip
    steps: int = option(800, "training steps per run", check=at_least(1))
    evals: int = option(4, "checkpoints scored per run, evenly spaced (steps must be a multiple)", check=at_least(1))
    image_size: int = option(8, "image side in pixels (8: the digits' own resolution)", check=at_least(1))
    batch_size: int = option(64, "training batch", check=at_least(1))
    ema_decay: float = option(0.99, "EMA decay per step (the samples come from the EMA weights)",
                              check=in_interval(0.0, 1.0))  # fmt: skip
    num_samples: int = option(1000, "images per checkpoint, class-balanced", check=at_least(40))
    sample_steps: int = option(11, "points of the Heun ODE grid (2 * (n - 1) model calls)", check=at_least(2))
    cfg_scale: float = option(1.0, "classifier-free guidance scale of the samples (1: none)", check=at_least(1.0))
    noise_seed: int = option(20250609, "seed of the initial noise, shared by every arm, seed and checkpoint")
    reference: str = option("holdout", "real images of the reference statistics: holdout or all", choices=REFERENCES)
    grid: bool = option(False, "also run the other dispersive variants and an InfoNCE-L2 lambda x tau grid")
    grid_lambdas: tuple[float, ...] = option((0.25, 0.5, 1.0), "lambdas of the --grid (InfoNCE-L2)", parse=float_list)
    grid_taus: tuple[float, ...] = option((0.5, 1.0, 2.0), "taus of the --grid (InfoNCE-L2)", parse=float_list)
    device: str = option("cpu", "cpu or cuda", choices=DEVICES)
    threads: int | None = option(
        None, "torch CPU threads (default: torch's choice); 1 is much faster than 2 on a machine shared with other "
        "jobs (threads of an oversubscribed pool wait for each other)", check=at_least(1),
    )  # fmt: skip
    quick: bool = option(False, "a smoke run in about a minute: 40 steps, seed 0 only, 100 samples, 3-epoch classifier")
    classifier: ClassifierConfig = option(default_factory=ClassifierConfig, cli=False)

    def __post_init__(self):
        check_options(self)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if self.steps % self.evals:
            raise ConfigError(f"--steps {self.steps} must be a multiple of --evals {self.evals} (checkpoint spacing)")
        if self.image_size % 2:
            raise ConfigError(f"--image-size must be even (the demo model's patch size is 2), got {self.image_size}")
        if self.classifier.image_size != self.image_size:
            raise ConfigError(
                f"the classifier reads {self.classifier.image_size} px images but the samples are {self.image_size} px"
            )

    def arms(self) -> list[Arm]:
        """Baseline and dispersive, then the grid's arms with --grid."""
        return [BASELINE, DISPERSIVE, DISPERSIVE_COSINE] + (
            grid_arms(self.grid_lambdas, self.grid_taus) if self.grid else []
        )

    def eval_steps(self) -> list[int]:
        """The steps whose checkpoints are scored."""
        every = self.steps // self.evals
        return [every * k for k in range(1, self.evals + 1)]

    def resolved_runs_dir(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir is not None else Path(self.out) / "runs"


# --quick: the whole pipeline in about a minute on 2 CPU cores.
QUICK = dict(
    seeds=(0,), steps=40, evals=2, num_samples=100, sample_steps=5, threads=1,
    classifier=ClassifierConfig(image_size=8, epochs=3),
)  # fmt: skip


def train_config(cfg: DigitsConfig, arm: Arm, seed: int):
    """The TrainConfig of one run: the demo's, with the experiment's budget, EMA, checkpoint spacing and arm.

    Its results_dir holds a hash of the settings, so a changed setting never resumes another run's checkpoints.
    """
    from disploss.tools.demo import demo_config

    base = demo_config("", cfg.steps, disp=arm.disp, seed=seed, device=cfg.device)
    tc = dataclasses.replace(
        base, image_size=cfg.image_size, global_batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
        ckpt_every=cfg.steps // cfg.evals, sample_every=0, log_every=max(1, min(100, cfg.steps // 10)),
        disp_variant=arm.variant, disp_weight=arm.weight, disp_tau=arm.tau,
    )  # fmt: skip
    settings = {k: v for k, v in dataclasses.asdict(tc).items() if k not in ("results_dir", "ckpt", "device")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    results_dir = cfg.resolved_runs_dir() / arm.name / f"seed{seed}-{key}"
    return dataclasses.replace(tc, results_dir=str(results_dir), ckpt="latest")
