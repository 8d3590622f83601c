"""Training configuration: the presets, the phases of the twofold preset, and `TrainConfig`
(with the `HardwareConfig` of the array the model is made for nested in it)."""
import dataclasses
import textwrap

from .errors import NptwofoldError
from .hardware import HardwareConfig
from .options import (MAX_BATCH_SIZE, MAX_EVAL_BATCH_SIZE, above, at_least, between,
                      check_fields, flag_name, known_fields, option, shown_value)
from .twofold import TwofoldConfig

PRESETS = {
    # the embedded sample: a few minutes on 2 cores, a smoke test of the whole pipeline
    "quick": dict(data="sample", epochs=15, batch_size=128, lr=0.1, schedule="cosine",
                  warmup_epochs=1, weight_decay=5e-4, nesterov=True),
    # full CIFAR-10 in 10 epochs: one warm-up epoch, then cosine to zero
    "short": dict(data="cifar10", epochs=10, batch_size=128, lr=0.1, schedule="cosine",
                  warmup_epochs=1, weight_decay=5e-4, nesterov=True),
    # the baseline every Twofold result starts from: the cosine schedule of `short`, run long
    # enough to converge on the development copy (results/README.md has its curve)
    "long": dict(data="cifar10", epochs=150, batch_size=128, lr=0.1, schedule="cosine",
                 warmup_epochs=1, weight_decay=5e-4, nesterov=True),
    # He et al. 2016: 182 epochs (64k steps), lr 0.1 divided by 10 at epochs 91 and 136
    "paper": dict(data="cifar10", epochs=182, batch_size=128, lr=0.1, schedule="step",
                  milestones=[91, 136], weight_decay=1e-4, nesterov=False),
}


# The `twofold` preset: baseline -> twofold training from it -> post-training, each a
# run of its own in OUT/<phase>, started from the previous phase's last.h5.
TWOFOLD_PHASES = (
    ("baseline", "short", {}),
    # their epochs and peak learning rate are PipelineConfig's
    ("twofold", "short", dict(warmup_epochs=0)),
    ("post", "short", dict(warmup_epochs=0, post_training=True)),
)


# fields of the array that the twofold config held before `TrainConfig.hardware` existed
OLD_TWOFOLD_HARDWARE = dict(bits="weight_bits", weight_encoding="weight_encoding",
                            activation_bits="activation_bits")
DATASET_NAMES = ("sample", "cifar10")


def upgraded(saved):
    """A stored config dict in the current layout. Checkpoints written before the config had
    a "hardware" entry kept the array's facts elsewhere: a twofold run in its twofold config
    (bits, weight_encoding, activation_bits), an ADC-aware fine-tune in its "adc_finetune"
    entry; these become its hardware config (a float run's is the default one). Some stored
    the path of their data on the machine that wrote them: it becomes the dataset's name."""
    if not isinstance(saved, dict):
        raise NptwofoldError("the config is not a JSON object")
    saved = dict(saved)
    if isinstance(saved.get("data"), str):
        saved["data"] = dataset_name(saved["data"])
    twofold = saved.get("twofold")
    if isinstance(twofold, dict) and any(key in twofold for key in OLD_TWOFOLD_HARDWARE):
        saved["twofold"] = {key: value for key, value in twofold.items()
                            if key not in OLD_TWOFOLD_HARDWARE}
        if "hardware" not in saved:
            saved["hardware"] = {new: twofold[old] for old, new in OLD_TWOFOLD_HARDWARE.items()
                                 if old in twofold}
    finetune = saved.get("adc_finetune")
    if "hardware" not in saved and isinstance(finetune, dict) and isinstance(
            finetune.get("hardware"), dict):
        saved["hardware"] = finetune["hardware"]
    return saved


def dataset_name(data):
    """The dataset a --data value names, as a checkpoint stores it: never a machine's path."""
    return data if data in DATASET_NAMES else "cifar10"


def _check_milestones(milestones):
    if milestones != sorted(milestones):
        raise NptwofoldError("milestones must be in increasing order")


@dataclasses.dataclass
class TrainConfig:
    """A run's settings. Each field is declared once, with its help and range: the CLI flags,
    their checks and the checkpoint's JSON config follow from it (`options`). The defaults are
    the quick preset's; a preset sets several of them at once."""
    preset: str = option("quick", "preset the run started from", flag=False)
    data: str = option("sample", "CIFAR-10 tarball or folder (binary or python version); "
                       "'sample' = embedded slice, 'cifar10' = datasets/ or download")
    epochs: int = option(15, "training epochs (0 only for post-training: prune, no "
                         "fine-tune)", at_least(0))
    batch_size: int = option(128, "training batch size", between(1, MAX_BATCH_SIZE))
    lr: float = option(0.1, "peak learning rate", above(0))
    momentum: float = option(0.9, "SGD momentum", between(0, 1, high_open=True))
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay (not on bit planes)", at_least(0))
    schedule: str = option("cosine", "cosine (linear warm-up, cosine to 0) or step (divide "
                           "at --milestones)", choices=("cosine", "step"))
    warmup_epochs: float = option(1.0, "linear warm-up of the cosine schedule, in epochs",
                                  at_least(0))
    milestones: list[int] = option([91, 136], "step schedule: epochs at which the learning "
                                   "rate is multiplied by --lr-decay", at_least(1),
                                   check=_check_milestones)
    lr_decay: float = option(0.1, "step schedule: factor applied at each milestone",
                             between(0, 1, high_open=True))
    seed: int = option(0, "seed of the weights, data order and augmentation", at_least(0))
    eval_batch_size: int = option(128, "evaluation batch size",
                                  between(1, MAX_EVAL_BATCH_SIZE))
    init: str | None = option(None, "start from this checkpoint's model")
    # a pruned network relearns much of its function; the dense model's outputs carry more
    # per image than the labels (results/budget-p70: +11.8 points at p = 0.7, 3+3 epochs)
    teacher: str | None = option(None, "distil from this checkpoint's model (e.g. the dense "
                                 "baseline): its logits on each training batch are soft "
                                 "targets beside the labels")
    distill_temperature: float = option(4.0, "with --teacher: softmax temperature T of the "
                                        "soft targets", above(0))
    distill_weight: float = option(0.9, "with --teacher: weight of the soft-target term "
                                   "(T^2 KL); the labels' cross-entropy gets 1 - this",
                                   between(0, 1))
    # None = a float run; a TwofoldConfig (stored as a JSON object, {} = all defaults) = train
    # under bit representation
    twofold: TwofoldConfig | None = option(None, "Twofold Sparsity settings", flag=False)
    # the array the model is made for: a twofold model's bit planes follow it, and it is the
    # default of every tool that maps the checkpoint
    hardware: HardwareConfig = option(HardwareConfig(), "the CIM array", flag=False)
    post_training: bool = option(False, "hard-prune and re-binarize --init's twofold model, "
                                 "then fine-tune")

    def __post_init__(self):
        # dicts of overrides (a preset's, a checkpoint's JSON) become the nested configs
        if isinstance(self.twofold, dict):
            self.twofold = TwofoldConfig(**known_fields(TwofoldConfig, self.twofold))
        if isinstance(self.hardware, dict):
            self.hardware = HardwareConfig(**known_fields(HardwareConfig, self.hardware))

    @classmethod
    def from_dict(cls, saved):
        """The config a checkpoint stored (in the current layout, `upgraded`), checked (keys
        this version does not know are ignored)."""
        saved = upgraded(saved)
        for name in ("twofold", "hardware"):
            value = saved.get(name)
            if value is not None and not isinstance(value, dict):
                raise NptwofoldError(f"{name} must be a JSON object or null (got {value!r})")
        return cls(**known_fields(cls, saved)).validated()

    @classmethod
    def from_preset(cls, preset, **overrides):
        if preset not in PRESETS:
            raise NptwofoldError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        from_preset = set(PRESETS[preset]) - set(overrides)
        return cls(preset=preset, **{**PRESETS[preset], **overrides}).validated(from_preset)

    def validated(self, from_preset=()):
        """Checks every field, then the ones that depend on each other. `from_preset` names
        the fields the preset set, so that a message can say where a value came from."""
        check_fields(self)
        if self.twofold is not None:
            self.twofold.validated()
        if self.post_training and self.twofold is None:
            raise NptwofoldError("--post-training needs a twofold config: give the Twofold "
                                 "flags (e.g. --sparsity) of the --init checkpoint's run")
        if self.teacher is None and (self.distill_temperature, self.distill_weight) != (
                TrainConfig.distill_temperature, TrainConfig.distill_weight):
            raise NptwofoldError("--distill-temperature and --distill-weight need --teacher")
        # post-training may run 0 fine-tune epochs: it then only prunes and re-binarizes
        if self.epochs < 1 and not self.post_training:
            raise NptwofoldError(f"--epochs must be >= 1 (got {self.epochs}); 0 is only for "
                                 "--post-training")
        if self.schedule == "cosine" and self.warmup_epochs >= max(self.epochs, 1):
            if "warmup_epochs" in from_preset:
                raise NptwofoldError(
                    f"--epochs {self.epochs} is too short for the {self.preset} preset's "
                    f"--warmup-epochs {self.warmup_epochs:g}: warm-up must be shorter than "
                    "training (lower --warmup-epochs too)")
            raise NptwofoldError(f"--warmup-epochs {self.warmup_epochs:g} must be shorter "
                                 f"than --epochs {self.epochs}")
        return self


# The methods a study compares, each the settings it gives the twofold preset's phases
# ({"twofold": TwofoldConfig fields, "hardware": HardwareConfig fields, "pipeline":
# PipelineConfig fields}); a flag given beside --method overrides its value. `prune-only` and
# `energy` share the network level (the array's tile as mask group, dense stem and classifier,
# sign-magnitude cells), so they differ only in the bit-level training.
NETWORK_LEVEL_BUILDABLE = dict(mask_group=0, stem_sparsity=0.0, classifier_sparsity=0.0)
METHODS = {
    # LFSR masks, Reg_Net and hard pruning; the kept weights stay plain 8-bit levels
    "prune-only": dict(
        twofold=dict(NETWORK_LEVEL_BUILDABLE, beta_bit=0.0, lambda_energy=0.0),
        hardware=dict(weight_encoding="sign_magnitude"),
        pipeline=dict(finetune_beta_bit=0.0)),
    # the poster's: two's complement, a mask per output channel over every mapped layer,
    # Reg_Net + Reg_Bit in training and in the fine-tune
    "poster": dict(
        twofold=dict(mask_group=1, stem_sparsity=None, classifier_sparsity=None, beta_bit=20.0,
                     reg_bit_form="poster", lambda_energy=0.0),
        hardware=dict(weight_encoding="twos_complement"),
        pipeline=dict(finetune_beta_bit=None)),
    # this project's: the cell-energy regularizer on sign-magnitude planes, then the precision
    # adjustment and energy-aware rounding within a loss budget (results/README.md: the p = 0
    # settings that lost 0.25 points for 2.57x lower cell energy), checked on 5,000 images: on
    # 500 the greedy drops kept passing on noise (results/budget-p70, post-training steps)
    "energy": dict(
        twofold=dict(NETWORK_LEVEL_BUILDABLE, beta_bit=0.0, lambda_energy=16.0,
                     plane_drop_tolerance=0.002, plane_drop_images=5000, energy_rounding=0.9,
                     energy_rounding_budget=0.005, energy_rounding_last=0.6),
        hardware=dict(weight_encoding="sign_magnitude"),
        pipeline=dict(finetune_beta_bit=0.0)),
}


def method_help():
    """What each method sets, a wrapped paragraph each, for --help."""
    return "\n".join(textwrap.fill(
        f"--method {name}: " + ", ".join(f"{flag_name(key)} {shown_value(value)}"
                                         for part in settings.values()
                                         for key, value in part.items()),
        width=88, subsequent_indent="    ", break_on_hyphens=False) for name, settings in METHODS.items())


def with_method(method, twofold, hardware, pipeline):
    """(twofold, hardware, pipeline) overrides of a run: those of `method` (None: no method),
    each replaced by the value a flag gives."""
    settings = METHODS[method] if method else {}
    return tuple({**settings.get(part, {}), **given} for part, given in
                 (("twofold", twofold), ("hardware", hardware), ("pipeline", pipeline)))


@dataclasses.dataclass
class PipelineConfig:
    """Settings of the twofold preset's phases beyond its baseline's (`TWOFOLD_PHASES`)."""
    method: str | None = option(None, "twofold preset: one method's settings (listed above "
                                "the flags); a flag given beside it overrides its value",
                                choices=tuple(METHODS))
    # one epoch by default: Reg_Bit keeps shrinking a layer as long as it runs (README,
    # Reg_Bit probe)
    twofold_epochs: int = option(1, "twofold preset: epochs of the twofold phase", at_least(1))
    finetune_epochs: int = option(1, "twofold preset: epochs of the post-training fine-tune "
                                  "(0 = prune and re-binarize only)", at_least(0))
    # the fine-tune trains the kept bits again, so it needs a real learning rate
    twofold_lr: float = option(0.01, "twofold preset: peak learning rate of the twofold phase "
                               "and of the fine-tune (each a cosine, no warm-up)", above(0))
    # the fine-tune starts from a trained model, which a restart at the twofold phase's peak
    # first knocks back (results/grid/README.md)
    finetune_lr: float | None = option(
        None, "twofold preset: peak learning rate of the fine-tune (none = --twofold-lr)",
        above(0))
    finetune_beta_bit: float | None = option(
        None, "twofold preset: Reg_Bit strength of the fine-tune (none = --beta-bit; 0 lets it "
        "recover accuracy, as BSQ fine-tunes)", at_least(0))

    def validated(self):
        return check_fields(self)
