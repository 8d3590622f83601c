"""Training configuration: the presets, the phases of the twofold preset, and `TrainConfig`."""
import dataclasses

from .errors import NptwofoldError
from .twofold import TwofoldConfig

PRESETS = {
    # the embedded sample: a few minutes on 2 cores, a smoke test of the whole pipeline
    "quick": dict(data="sample", epochs=15, batch_size=128, lr=0.1, schedule="cosine",
                  warmup_epochs=1, weight_decay=5e-4, nesterov=True),
    # full CIFAR-10 in 10 epochs: one warm-up epoch, then cosine to zero
    "short": dict(data="cifar10", epochs=10, batch_size=128, lr=0.1, schedule="cosine",
                  warmup_epochs=1, weight_decay=5e-4, nesterov=True),
    # He et al. 2016: 182 epochs (64k steps), lr 0.1 divided by 10 at epochs 91 and 136
    "paper": dict(data="cifar10", epochs=182, batch_size=128, lr=0.1, schedule="step",
                  milestones=[91, 136], weight_decay=1e-4, nesterov=False),
}


# The `twofold` preset: baseline -> twofold training from it -> post-training (SPEC 3), each a
# run of its own in OUT/<phase>, started from the previous phase's last.h5.
TWOFOLD_PHASES = (
    ("baseline", "short", {}),
    # one epoch: Reg_Bit keeps shrinking a layer as long as it runs (README, Reg_Bit probe)
    ("twofold", "short", dict(epochs=1, lr=0.01, warmup_epochs=0)),
    # the fine-tune trains the kept bits again, so it needs a real learning rate
    ("post", "short", dict(epochs=1, lr=0.01, warmup_epochs=0, post_training=True)),
)



@dataclasses.dataclass
class TrainConfig:
    preset: str = "quick"
    data: str = "sample"          # "sample", "cifar10" (default folder or download), or a path
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"      # "cosine" (linear warm-up, cosine to 0) or "step"
    warmup_epochs: float = 1.0
    milestones: list = dataclasses.field(default_factory=lambda: [91, 136])
    lr_decay: float = 0.1         # factor applied at each milestone of the step schedule
    seed: int = 0
    eval_batch_size: int = 128    # the default training batch: eval reuses its workspaces
    init: str = None              # checkpoint whose model state the run starts from
    twofold: dict = None          # TwofoldConfig fields: train under bit representation
    post_training: bool = False   # hard-prune + re-binarize at the start, then fine-tune

    @classmethod
    def from_dict(cls, saved):
        """The config a checkpoint stored (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    @classmethod
    def from_preset(cls, preset, **overrides):
        if preset not in PRESETS:
            raise NptwofoldError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        return cls(preset=preset, **{**PRESETS[preset], **overrides}).validated()

    def validated(self):
        if self.twofold is not None:
            TwofoldConfig(**self.twofold).validated()
        if self.post_training and self.twofold is None:
            raise NptwofoldError("bad training config: post-training needs a twofold config")
        # post-training may run 0 fine-tune epochs: it then only prunes and re-binarizes
        checks = [(self.epochs >= (0 if self.post_training else 1), "epochs must be >= 1"),
                  (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.lr > 0, "learning rate must be > 0"),
                  (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
                  (self.weight_decay >= 0, "weight decay must be >= 0"),
                  (self.schedule in ("cosine", "step"), "schedule must be 'cosine' or 'step'"),
                  (0 <= self.warmup_epochs < max(self.epochs, 1),
                   "warm-up must be shorter than training"),
                  (self.seed >= 0, "seed must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise NptwofoldError(f"bad training config: {message}")
        return self
