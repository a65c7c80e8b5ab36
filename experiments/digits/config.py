"""The digits experiment (`disploss experiment digits`, or `python -m experiments.digits` from the repository
root): dispersive loss weighed against its baseline at a scale anyone can run.

    disploss experiment digits --threads 1          # baseline vs dispersive, seeds 0,1,2: ~20 min on 2 CPU cores
    disploss experiment digits --quick              # the same pipeline in under a minute (1 seed, tiny budget)
    disploss experiment digits --grid               # + every dispersive variant and a lambda x tau grid (hours)
    disploss experiment digits --meanflow           # + MeanFlow arms, and FID against the number of model calls

`digits`: the demo's SiT (disploss.training.presets.demo: SiT-T/2, pixel space, the bundled scikit-learn digits) is
trained by `disploss.training.train` for a fixed budget of steps in each arm and seed; checkpoints are written every
steps / evals steps. From the EMA weights of every checkpoint the same class-balanced set of images is drawn with
the same sampler (Heun ODE, fixed steps, fixed guidance scale, fixed noise: one generator seed shared by every
arm, seed and checkpoint), and scored in the feature space of a small digit classifier (experiments.digits.classifier,
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

--meanflow (MeanFlow, disploss.meanflow; one-step generation): two more arms train `--objective meanflow` with the
same budget (steps, batch, EMA, seeds), without and with the dispersive term (the demo's InfoNCE-cosine recipe, for
the reason above), folding the experiment's guidance scale into their target (omega = --cfg-scale) and sampling
without guidance at 1 model call per image at every checkpoint. The final checkpoint of every run is also scored
against the number of model calls: the flow arms with Euler at 1, 2, 4, 8 and Heun at 20 calls, the MeanFlow arms
at 1 and 2 (NFE_SWEEP); fid_vs_nfe.png plots it. A MeanFlow step costs more than a flow step (BENCHMARKS.md): the
budget rule is steps, not time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from disploss.dispersive import ALL_VARIANTS, VARIANTS
from disploss.errors import ConfigError
from disploss.options import at_least, check_options, in_interval, option
from disploss.runtime import DEVICES
from disploss.training.config import EXPERIMENT_FIELDS
from experiments.digits.classifier import ClassifierConfig

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
OBJECTIVES = ("flow", "meanflow")
METRICS = ("fid", "precision", "recall", "class_accuracy")


# ---------------------------------------------------------------------------------------------------------
# Configuration


_SPEC_KEYS = {"lam": "weight", "tau": "tau", "blocks": "blocks", "margin": "margin"}


@dataclass(frozen=True)
class Arm:
    """One training recipe: the baseline (disp=False) or a dispersive variant with its lambda, tau and blocks; the
    objective flow (flow matching) or meanflow (MeanFlow, sampled in 1 step).

    blocks is a --disp-block value ('-1' = the last block, '0,2', 'all'); margin is the hinge's epsilon.
    """

    name: str
    disp: bool
    variant: str = "infonce_l2"
    weight: float = 0.25
    tau: float = 1.0
    blocks: str = "-1"
    margin: float = 1.0
    objective: str = "flow"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; valid choices: {', '.join(OBJECTIVES)}")
        if self.variant not in ALL_VARIANTS:
            raise ConfigError(f"unknown dispersive variant {self.variant!r}; valid choices: {', '.join(ALL_VARIANTS)}")
        if self.disp and not (self.weight > 0 and self.tau > 0):
            raise ConfigError(f"arm {self.name}: lambda and tau must be positive, got {self.weight}, {self.tau}")

    @classmethod
    def from_spec(cls, spec: str) -> Arm:
        """An arm from its spec: 'baseline', or a variant with '+key=value' settings (keys: lam, tau, blocks,
        margin; blocks as in --disp-block with '/' for ','), e.g. 'infonce_l2+tau=4+blocks=all'; a 'meanflow+'
        prefix trains it with the MeanFlow objective ('meanflow+baseline'). The spec, normalised, is the arm's
        name (the named arms keep theirs)."""
        spec = spec.strip()
        if spec in NAMED_ARMS:
            return NAMED_ARMS[spec]
        if spec.startswith("meanflow+"):  # the same recipe trained with the MeanFlow objective
            flow = cls.from_spec(spec[len("meanflow+") :])
            arm = dataclasses.replace(flow, objective="meanflow")
            return dataclasses.replace(arm, name=arm.spec())
        variant, *settings = spec.split("+")
        values: dict = {}
        for item in settings:
            key, _, value = item.partition("=")
            if key not in _SPEC_KEYS or not value:
                raise ConfigError(f"arm {spec!r}: {item!r} is not one of {', '.join(k + '=...' for k in _SPEC_KEYS)}")
            field = _SPEC_KEYS[key]
            try:
                values[field] = value.replace("/", ",") if field == "blocks" else float(value)
            except ValueError:
                raise ConfigError(f"arm {spec!r}: {key}={value!r} is not a number") from None
        arm = cls(name="", disp=True, variant=variant, **values)
        return dataclasses.replace(arm, name=arm.spec())

    def spec(self) -> str:
        """The normalised spec (settings that differ from the release's defaults, in a fixed order)."""
        if self.objective == "meanflow":
            return "meanflow+" + dataclasses.replace(self, objective="flow").spec()
        if not self.disp:
            return "baseline"
        parts = [self.variant]
        defaults = Arm("", disp=True)
        for key, field in _SPEC_KEYS.items():
            value = getattr(self, field)
            if value != getattr(defaults, field):
                parts.append(f"{key}={value.replace(',', '/') if field == 'blocks' else f'{value:g}'}")
        return "+".join(parts)

    def describe(self) -> str:
        """A one-line description for tables."""
        if self.objective == "meanflow":
            return "MeanFlow, 1 model call" + (f" + {dataclasses.replace(self, objective='flow').describe()}"
                                              if self.disp else "")  # fmt: skip
        if not self.disp:
            return "flow matching only"
        where = {"-1": "last block", "all": "all blocks"}.get(self.blocks, f"block(s) {self.blocks}")
        if self.variant == "covariance":
            return f"covariance, lambda={self.weight:g}, {where}"
        if self.variant == "hinge":
            return f"hinge, lambda={self.weight:g}, margin={self.margin:g}, {where}"
        return f"{self.variant}, lambda={self.weight:g}, tau={self.tau:g}, {where}"


BASELINE = Arm("baseline", disp=False)
DISPERSIVE = Arm("dispersive", disp=True)  # the release's default: InfoNCE-L2, lambda 0.25, tau 1, last block
# The demo's recipe (disploss.training.presets.demo): InfoNCE with cosine distance, lambda 0.25, tau 0.5.
DISPERSIVE_COSINE = Arm("dispersive_cosine", disp=True, variant="infonce_cosine", weight=0.25, tau=0.5)


# -- MeanFlow arms and the NFE sweep (issue 12) -----------------------------------------------------------------
MEANFLOW = Arm("meanflow", disp=False, objective="meanflow")
MEANFLOW_DISPERSIVE = Arm("meanflow_dispersive", disp=True, variant="infonce_cosine", weight=0.25, tau=0.5,
                          objective="meanflow")  # fmt: skip
NAMED_ARMS = {a.name: a for a in (BASELINE, DISPERSIVE, DISPERSIVE_COSINE, MEANFLOW, MEANFLOW_DISPERSIVE)}


@dataclass(frozen=True)
class SamplerSpec:
    """How a checkpoint is sampled: euler or heun (a flow model's fixed-step ODE) or meanflow, with `nfe` model
    calls per image (heun: even)."""

    kind: str
    nfe: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.nfe}"


NFE_SWEEP = {
    "flow": tuple(SamplerSpec("euler", n) for n in (1, 2, 4, 8)) + (SamplerSpec("heun", 20),),
    "meanflow": (SamplerSpec("meanflow", 1), SamplerSpec("meanflow", 2)),
}


def primary_spec(arm: Arm) -> SamplerSpec | None:
    """The sampler of an arm's every checkpoint: None = the experiment's Heun (--sample-steps); MeanFlow: 1 call."""
    return SamplerSpec("meanflow", 1) if arm.objective == "meanflow" else None


# ---------------------------------------------------------------------------------------------------------------
def grid_arms(lambdas: tuple[float, ...], taus: tuple[float, ...]) -> list[Arm]:
    """The arms --grid adds: the other three variants at the default lambda / tau, then InfoNCE-L2 over
    lambdas x taus (the default pair, which is the `dispersive` arm, left out)."""
    arms = [Arm(f"disp-{v}", disp=True, variant=v) for v in VARIANTS if v != DISPERSIVE.variant]
    for lam in lambdas:
        for tau in taus:
            if (lam, tau) != (DISPERSIVE.weight, DISPERSIVE.tau):
                arms.append(Arm(f"disp-l2-lam{lam:g}-tau{tau:g}", disp=True, weight=lam, tau=tau))
    return arms


def screen_arms(depth: int) -> list[Arm]:
    """The first pass of the screen (experiments/digits/README.md): InfoNCE-L2 over tau on the last block, the
    paper's JAX setting (lambda 0.5, tau 0.5, the block at depth // 4, i.e. index depth // 4 - 1), the middle
    block, all blocks, the paper's other variants at its settings, and InfoNCE-L2 on layer-normalised features.
    The second pass adds lambda in {0.05, 1} at the best tau (`lambda_arms`)."""
    jax_block, mid_block = max(depth // 4 - 1, 0), depth // 2 - 1
    specs = [
        "infonce_l2+tau=0.25", "infonce_l2", "infonce_l2+tau=4", "infonce_l2+tau=16",
        f"infonce_l2+lam=0.5+tau=0.5+blocks={jax_block}", f"infonce_l2+blocks={mid_block}", "infonce_l2+blocks=all",
        "infonce_cosine+tau=0.5", "hinge", "covariance", "infonce_l2_ln",
    ]  # fmt: skip
    return [Arm.from_spec(s) for s in specs]


def lambda_arms(tau: float) -> list[Arm]:
    """The screen's second pass: InfoNCE-L2, last block, lambda 0.05 and 1 at `tau` (0.25 ran in the first)."""
    return [Arm.from_spec(f"infonce_l2+lam={lam:g}+tau={tau:g}") for lam in (0.05, 1.0)]


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
    model: str = option("SiT-T/2", "model preset (SiT-T/2: the demo's; SiT-S/2 or B/2 on a GPU)")
    arms: tuple[str, ...] | None = option(
        None, "arms to run, comma-separated specs: baseline, dispersive, dispersive_cosine, or a variant with "
        "+key=value settings, e.g. infonce_l2+tau=4+blocks=all (keys lam, tau, blocks with / for ',', margin) "
        "(default: baseline,dispersive,dispersive_cosine)", parse=lambda text: tuple(text.split(",")),
    )  # fmt: skip
    screen: bool = option(False, "run the screen: the baseline, screen_arms, then lambda 0.05 and 1 at the best tau")
    grid: bool = option(False, "also run the other dispersive variants and an InfoNCE-L2 lambda x tau grid")
    grid_lambdas: tuple[float, ...] = option((0.25, 0.5, 1.0), "lambdas of the --grid (InfoNCE-L2)", parse=float_list)
    grid_taus: tuple[float, ...] = option((0.5, 1.0, 2.0), "taus of the --grid (InfoNCE-L2)", parse=float_list)
    device: str = option("cpu", "cpu or cuda", choices=DEVICES)
    threads: int | None = option(
        None, "torch CPU threads (default: torch's choice); 1 is much faster than 2 on a machine shared with other "
        "jobs (threads of an oversubscribed pool wait for each other)", check=at_least(1),
    )  # fmt: skip
    shard: str | None = option(
        None, "K/N: train and sample only the K-th of N shares of the runs (run N such processes side by side, then the "
        "same command without --shard to score and report)", metavar="K/N",
    )  # fmt: skip
    quick: bool = option(False, "a smoke run in about a minute: 40 steps, seed 0 only, 100 samples, 3-epoch classifier")
    meanflow: bool = option(False, "also train MeanFlow arms (without and with the dispersive term) and score the "
                            "final checkpoints against the number of model calls (see the module docstring)")  # fmt: skip
    classifier: ClassifierConfig = option(default_factory=ClassifierConfig, cli=False)

    def __post_init__(self):
        check_options(self)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if self.steps % self.evals:
            raise ConfigError(f"--steps {self.steps} must be a multiple of --evals {self.evals} (checkpoint spacing)")
        if self.image_size % 2:
            raise ConfigError(f"--image-size must be even (the demo model's patch size is 2), got {self.image_size}")
        self.arm_list()  # every --arms spec parses
        if self.shard is not None:
            self.shard_index()
        if self.classifier.image_size != self.image_size:
            raise ConfigError(
                f"the classifier reads {self.classifier.image_size} px images but the samples are {self.image_size} px"
            )

    def arm_list(self) -> list[Arm]:
        """--arms (the baseline first), else baseline, dispersive, dispersive_cosine; the grid's arms with --grid,
        the screen's first pass with --screen, the MeanFlow arms with --meanflow."""
        arms = [Arm.from_spec(s) for s in self.arms] if self.arms else [BASELINE, DISPERSIVE, DISPERSIVE_COSINE]
        if self.grid:
            arms += grid_arms(self.grid_lambdas, self.grid_taus)
        if self.screen:
            from disploss.models import parse_model_name

            arms += screen_arms(parse_model_name(self.model)[0])
        if self.meanflow:
            arms += [MEANFLOW, MEANFLOW_DISPERSIVE]
        unique: dict[str, Arm] = {}
        for arm in [BASELINE, *arms]:  # one arm per recipe: 'dispersive' and 'infonce_l2' are the same runs
            unique.setdefault(arm.spec(), arm)
        return list(unique.values())

    def shard_index(self) -> tuple[int, int]:
        """(K, N) of --shard K/N."""
        k, _, n = (self.shard or "").partition("/")
        if not (k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
            raise ConfigError(f"--shard {self.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2")
        return int(k), int(n)

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

    Its results_dir holds a hash of the settings that shape the run, so a changed setting never resumes another
    run's checkpoints.
    """
    from disploss.training import presets

    base = presets.demo("", cfg.steps, disp=arm.disp, seed=seed, device=cfg.device)
    tc = dataclasses.replace(
        base, image_size=cfg.image_size, global_batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
        ckpt_every=cfg.steps // cfg.evals, sample_every=0, log_every=max(1, min(100, cfg.steps // 10)),
        disp_variant=arm.variant, disp_weight=arm.weight, disp_tau=arm.tau, disp_block=arm.blocks,
        disp_margin=arm.margin, model=cfg.model,
    )  # fmt: skip
    if arm.objective == "meanflow":  # guidance folded into the target at the experiment's scale
        tc = dataclasses.replace(
            tc, objective="meanflow", meanflow=dataclasses.replace(tc.meanflow, omega=cfg.cfg_scale)
        )
    # The key: the flags that define the experiment (disploss.training.config.EXPERIMENT_FIELDS) and the budget, so a
    # new TrainConfig field (a logging or retention option) does not orphan the runs already made; a flow run's key
    # leaves out the MeanFlow settings it does not use.
    fields = [f for f in EXPERIMENT_FIELDS if arm.objective == "meanflow" or f not in ("objective", "meanflow")]
    settings = {k: str(getattr(tc, k)) for k in (*fields, "max_steps", "ckpt_every")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    results_dir = cfg.resolved_runs_dir() / arm.spec() / f"seed{seed}-{key}"
    return dataclasses.replace(tc, results_dir=str(results_dir), ckpt="latest")
