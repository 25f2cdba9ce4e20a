"""Training settings: ``TrainConfig`` (every value of a run) and the named recipes that fill it.

Kept free of heavy imports so that the command line can build its options from it cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..errors import MixNetError

OPTIMIZERS = ("sgd", "adamw", "rmsproptf", "muon")
SCHEDULES = ("cosine", "linear", "step", "constant")
# The values each of these settings accepts (the command line offers them as choices).
CHOICES: Dict[str, Tuple[str, ...]] = dict(
    opt=OPTIMIZERS, sched=SCHEDULES, amp=("none", "bf16", "fp16"), device=("auto", "cpu", "cuda"),
    interpolation=("bilinear", "bicubic", "nearest"))


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are generic; recipes (``RECIPES``) set the rest."""

    # What to train on what.
    model: str = "mixnet_s"
    data: Optional[str] = None  # a folder with train/ and val/ in ImageFolder layout
    train_dir: Optional[str] = None  # or the two folders separately
    val_dir: Optional[str] = None
    output: Optional[str] = None  # the run directory
    recipe: Optional[str] = None  # the recipe that supplied the defaults (recorded for reference)
    pretrained: Optional[str] = None  # weights tag, file or hub folder to start from (new head if needed)
    model_args: Dict[str, Any] = field(default_factory=dict)  # create_model overrides, e.g. width_multiplier
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Optimisation.
    epochs: int = 10
    batch_size: int = 64  # per process
    accum_steps: int = 1
    opt: str = "adamw"  # sgd (nesterov) | adamw | rmsproptf | muon (dense convs; AdamW for the rest)
    lr: Optional[float] = None  # absolute; None: lr_base scaled by the global batch
    lr_base: float = 4e-3
    lr_base_size: int = 256
    momentum: float = 0.9
    opt_eps: float = 1e-8
    opt_beta2: float = 0.999  # AdamW's second-moment decay
    weight_decay: float = 0.05
    sched: str = "cosine"  # cosine | linear | step | constant
    sched_hold: float = 0.0  # cosine/linear: fraction of the post-warmup span held at the peak lr
    sched_per_step: bool = True  # False: the lr changes at epoch boundaries only
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    clip_grad: Optional[float] = None  # max global gradient norm
    label_smoothing: float = 0.1
    # Augmentation and resolution.
    train_size: int = 224
    # Progressive resizing: the first quarter of the run trains at this size, the middle half grows to
    # train_size, the last quarter trains at train_size (progressive_size). None: train_size throughout.
    min_train_size: Optional[int] = None
    eval_size: int = 224
    eval_crop_pct: float = 0.875
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    randaugment_ops: int = 0  # 0: no RandAugment
    randaugment_magnitude: float = 9.0  # 0..10
    randaugment_std: float = 0.0
    random_erasing: float = 0.0  # probability, per-pixel noise
    mixup: float = 0.0  # Beta(alpha, alpha); 0 disables
    cutmix: float = 0.0
    mix_prob: float = 1.0
    # Weight EMA.
    ema: bool = True
    ema_decay: float = 0.9998
    ema_warmup: bool = True
    # Precision and system.
    amp: str = "none"  # none | bf16 | fp16 (fp16: GPU only, with a gradient scaler)
    # torch.compile the model's training forward (and so its backward). For GPUs: on a 2-core CPU it was
    # no faster than eager and took over a minute to compile (benchmarks/RESULTS.md).
    compile: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    freeze_bn: bool = False  # BatchNorm in eval mode: running statistics used, not updated (tiny batches)
    workers: int = 2
    threads: Optional[int] = None  # torch threads per process; None: torch's default (all cores)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_minutes: float = 10.0  # mid-epoch checkpoint interval; 0 disables
    max_minutes: Optional[float] = None  # stop cleanly (checkpointed) after this long
    progress: bool = True

    def __post_init__(self):
        # Paths are kept as text: the run's config.json and checkpoints hold plain JSON values.
        for name in ("data", "train_dir", "val_dir", "output", "pretrained"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                setattr(self, name, str(value))
        if self.recipe is not None and self.recipe not in RECIPES:
            raise MixNetError(f"unknown recipe {self.recipe!r} (known: {', '.join(RECIPES)})")

    @classmethod
    def from_recipe(cls, recipe: Optional[str] = None, **overrides) -> "TrainConfig":
        """The recipe's values over the defaults (those that follow the run's length computed for its
        ``epochs``, see ``BUDGET_RULES``), then ``overrides`` over those."""
        values: Dict[str, Any] = {}
        if recipe is not None:
            if recipe not in RECIPES:
                raise MixNetError(f"unknown recipe {recipe!r} (known: {', '.join(RECIPES)})")
            values.update(RECIPES[recipe], recipe=recipe)
            if overrides.get("epochs", 1) < 1:
                raise MixNetError(f"epochs must be >= 1, got {overrides['epochs']}")
            if recipe in BUDGET_RULES:
                values.update(BUDGET_RULES[recipe](overrides.get("epochs", values["epochs"])))
        values.update(overrides)
        if "warmup_epochs" not in overrides:  # a short run warms up for a tenth of its length, not all of it
            values["warmup_epochs"] = min(values.get("warmup_epochs", cls.warmup_epochs),
                                          WARMUP_SHARE * values.get("epochs", cls.epochs))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise MixNetError(f"unknown training setting(s): {', '.join(unknown)}")
        config = cls(**values)
        if recipe == "finetune" and config.pretrained is None:
            config.pretrained = config.model  # the architecture's published weights
        return config

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if k in ("scale", "ratio") else v for k, v in values.items() if k in names}
        return cls(**values)


RECIPES: Dict[str, Dict[str, Any]] = {
    # The recipe of the published mixnet_xl.ra_in1k weights (timm's RandAugment EfficientNet recipe).
    "ra": dict(
        opt="rmsproptf", opt_eps=1e-3, momentum=0.9, lr_base=0.016, lr_base_size=256, weight_decay=1e-5,
        sched="step", sched_per_step=False, decay_epochs=2.4, decay_rate=0.969, warmup_epochs=5,
        warmup_lr=1e-6, min_lr=0.0, epochs=450, batch_size=128, drop_rate=0.3, drop_path_rate=0.2,
        ema=True, ema_decay=0.9999, ema_warmup=False, randaugment_ops=2, randaugment_magnitude=9.0,
        randaugment_std=0.5, random_erasing=0.3, label_smoothing=0.1, train_size=224, eval_size=224,
        scale=(0.08, 1.0), amp="none",
    ),
    # Fine-tuning published weights on a few thousand images: new head, AdamW, cosine, light augmentation.
    "finetune": dict(
        opt="adamw", lr_base=2e-3, lr_base_size=256, weight_decay=0.01, sched="cosine", warmup_epochs=1,
        min_lr=1e-6, epochs=10, batch_size=32, drop_rate=0.2, drop_path_rate=0.1, ema=True,
        ema_decay=0.999, ema_warmup=True, label_smoothing=0.1, train_size=224, eval_size=224,
        scale=(0.35, 1.0), randaugment_ops=0, random_erasing=0.0,
    ),
    # From scratch on a small dataset on CPU (e.g. Imagenette, mixnet_s): train at 112 px, evaluate at 144
    # (random-resized-crop magnifies objects, so a larger test size matches them better), AdamW + cosine
    # with warmup, EMA with warmup. No RandAugment: mixnet_s underfits 9.5k photos in a CPU budget of
    # epochs, and side-by-side 30-epoch probes learnt faster without it and with lr_base 0.03 rather than
    # 0.01; 112 px buys 1.4x the epochs of 128 px for about 2 points at equal epochs (README).
    "small-data": dict(
        opt="adamw", lr_base=0.03, lr_base_size=256, weight_decay=0.05, sched="cosine", warmup_epochs=2,
        min_lr=1e-5, epochs=50, batch_size=64, drop_rate=0.2, drop_path_rate=0.05, ema=True,
        ema_decay=0.999, ema_warmup=True, label_smoothing=0.1, train_size=112, eval_size=144,
        eval_crop_pct=0.875, scale=(0.35, 1.0), randaugment_ops=0, random_erasing=0.0, mixup=0.0,
        cutmix=0.0, amp="none", channels_last=True, workers=2,
    ),
}

# The largest share of a run its warm-up takes unless set (a recipe's 1 or 2 epochs would be all of a short run).
WARMUP_SHARE = 0.1

# small-data's settings at 5 epochs that differ from its own (those of 30 epochs and more); see
# small_data_budget. Evidence: docs/small-data.md.
SHORT_RUN, LONG_RUN = 5, 30
SHORT_RUN_SETTINGS = dict(lr_base=0.024, min_scale=0.6, sched_hold=0.5, opt_beta2=0.99)
# The weight decay of runs under LONG_RUN epochs (those Muon trains): 3x the recipe's 0.05. Most weights sit
# under batch norm, where decay raises the effective step late in a run; it ended ahead of 0.05 with each
# of four seeds at 5 epochs and two at 20, and 6x (0.3) ended 0.4-0.5 point below it at 20 epochs,
# unable to fit as well (docs/small-data.md). Not measured from 30 epochs on.
SHORT_RUN_WEIGHT_DECAY = 0.15


def small_data_budget(epochs: int) -> Dict[str, Any]:
    """The small-data settings that follow the run's length (evidence: docs/small-data.md).

    From ``LONG_RUN`` epochs on they are the recipe's own (the built-in model's first stage). A short run
    cannot afford 2 epochs of warm-up; it learns most with its peak learning rate held for longer, with
    AdamW's second moment averaged over fewer steps, and from milder crops (it underfits: every image is
    seen a few times only, and needs no dropout or drop-path); its lr_base, 0.024, is a little below the
    recipe's. Side by side on Imagenette over 5 epochs, each of these changes gained points. So warm-up
    takes a tenth of the run (at most 2 epochs; ``WARMUP_SHARE``, as in every recipe), and lr_base, the
    smallest crop area, the held fraction of the schedule, AdamW's beta2 and the dropout and drop-path
    rates go from their 5-epoch values to the recipe's at 30 epochs in proportion to log(epochs)
    (lr_base, crop area and 1 - beta2 geometrically, the others linearly, the rates from 0).
    Runs shorter than ``LONG_RUN`` train the dense convolutions with Muon (it learnt more per step at 5
    and 20 epochs) with 3x the recipe's weight decay (``SHORT_RUN_WEIGHT_DECAY``: ahead at 5 and at 20
    epochs); longer ones keep the recipe's AdamW and weight decay, with which the built-in model was trained.
    """
    recipe, short = RECIPES["small-data"], SHORT_RUN_SETTINGS
    f = min(max(math.log(epochs / SHORT_RUN) / math.log(LONG_RUN / SHORT_RUN), 0.0), 1.0)

    def between(at_short: float, at_long: float) -> float:
        return at_short ** (1 - f) * at_long ** f

    short_run = epochs < LONG_RUN
    return dict(opt="muon" if short_run else recipe["opt"],
                weight_decay=SHORT_RUN_WEIGHT_DECAY if short_run else recipe["weight_decay"],
                lr_base=round(between(short["lr_base"], recipe["lr_base"]), 6),
                scale=(round(between(short["min_scale"], recipe["scale"][0]), 3), recipe["scale"][1]),
                sched_hold=round(short["sched_hold"] * (1 - f), 3),
                drop_rate=round(recipe["drop_rate"] * f, 3),
                drop_path_rate=round(recipe["drop_path_rate"] * f, 3),
                opt_beta2=round(1 - between(1 - short["opt_beta2"], 1 - TrainConfig.opt_beta2), 5))


# Recipes some of whose settings are computed from the run's length, unless given explicitly.
BUDGET_RULES = {"small-data": small_data_budget}


def scaled_settings(recipe: str) -> set:
    """The names of the settings ``recipe`` computes from the run's length."""
    rule = BUDGET_RULES.get(recipe)
    return set(rule(RECIPES[recipe]["epochs"])) if rule else set()


# ---------------------------------------------------------------------------------------------- command line

_PARSERS = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
            "Optional[str]": str}
# Set by dedicated options of ``mixnet train`` rather than generated ones.
_NOT_OPTIONS = {"recipe", "model_args"}


def _model_arg(text: str) -> Tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


# Option groups of ``mixnet train -h``: the first field of each group, in TrainConfig's order.
_GROUPS = {"model": "model and data", "epochs": "optimisation", "train_size": "augmentation and resolution",
           "ema": "weight EMA", "amp": "precision and system"}


# What an option means, where its bare default ("none", "0") would not say.
_MEANINGS = {
    "lr": "absolute learning rate; none: --lr-base x global batch / --lr-base-size",
    "pretrained": "weights tag, file, hub folder or training run to start from (a new head if the classes "
                  "differ)",
    "checkpoint_minutes": "mid-epoch checkpoint interval (checkpoints are also written at every epoch end); "
                          "0: epoch ends only",
    "max_minutes": "stop with a checkpoint after this many minutes (exit 3; --resume continues); none or 0: "
                   "no limit",
    "momentum": "sgd's and rmsproptf's (adamw uses beta1 0.9; muon 0.95 for its dense convs, 0.9 elsewhere)",
    "opt_beta2": "adamw's and muon's second-moment decay (sgd and rmsproptf have none)",
}
# Values a recipe sets outside RECIPES (in TrainConfig.from_recipe).
_RECIPE_NOTES = {"pretrained": ["finetune: the --model's published weights"]}


def _option_help(name: str, default: Any) -> str:
    """The generic default and where a recipe differs from it, so ``-h`` shows what a recipe will use."""
    shown = "none" if default is None else default
    by_recipe = [f"{r}: {values.get(name, default)}" + (" at its default length, scaled to --epochs"
                                                        if name in scaled_settings(r) else "")
                 for r, values in RECIPES.items() if values.get(name, default) != default
                 or name in scaled_settings(r)] + _RECIPE_NOTES.get(name, [])
    limit = ", at most a tenth of --epochs" if name == "warmup_epochs" else ""
    meaning = f"{_MEANINGS[name]}; " if name in _MEANINGS else ""
    return f"{meaning}default: {shown}" + (f" ({', '.join(by_recipe)})" if by_recipe else "") + limit


def add_arguments(parser) -> None:
    """One ``--option`` per ``TrainConfig`` field (``--no-option`` for booleans), all defaulting to
    "not given", so the recipe's value stands unless overridden."""
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="named preset of every setting below")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg, default=None,
                        metavar="KEY=VALUE", help="architecture override for create_model, e.g. "
                                                  "width_multiplier=0.5 (repeatable)")
    defaults = TrainConfig()
    group = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[f.name])
        if f.name in _NOT_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        shown = _option_help(f.name, getattr(defaults, f.name))
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif f.type.startswith("Tuple"):
            group.add_argument(flag, type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help=shown)
        else:
            group.add_argument(flag, type=_PARSERS[f.type], choices=CHOICES.get(f.name), default=None, help=shown)


def overrides_from_args(args) -> Dict[str, Any]:
    """The settings given on the command line (those left out keep the recipe's values)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "model_args" in overrides:
        overrides["model_args"] = dict(overrides["model_args"])
    for k in ("scale", "ratio"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return overrides
