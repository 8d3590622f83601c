"""Training: presets, learning-rate schedules, the epoch loop, logs and resumable checkpoints.

Every random choice derives from one seed: the initial weights from stream (seed, 0), and the
data order, crop offsets and flips of epoch e from stream (seed, 1, e). The position inside
training is just (epoch, step), so a checkpoint taken anywhere resumes bit for bit.
"""
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import atomic_write, load_checkpoint, restore_model, restore_optimizer, save_checkpoint
from .errors import NptwofoldError
from .kernels.augment import CROP_PAD, crop_flip_to_float, to_float
from .kernels.loss import softmax_cross_entropy
from .model import ResNet20
from .optim import SGD
from .twofold import Twofold, TwofoldConfig

BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

INIT_STREAM, EPOCH_STREAM = 0, 1

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


def learning_rate(config, global_step, steps_per_epoch):
    """Per-step learning rate of the configured schedule."""
    if config.schedule == "step":
        epoch = global_step // steps_per_epoch
        return config.lr * config.lr_decay ** sum(epoch >= m for m in config.milestones)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if global_step < warmup:
        return config.lr * (global_step + 1) / warmup
    total = config.epochs * steps_per_epoch
    progress = (global_step - warmup) / max(total - warmup, 1)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


def epoch_plan(seed, epoch, n_images):
    """Data order, crop offsets and flips of one epoch, from the epoch's own random stream."""
    rng = np.random.default_rng([seed, EPOCH_STREAM, epoch])
    order = rng.permutation(n_images)
    offsets = rng.integers(0, 2 * CROP_PAD + 1, size=(2, n_images))
    flips = rng.random(n_images) < 0.5
    return order, offsets, flips


def build_model(config, init_content=None):
    """ResNet-20 for `config`, with its Twofold method state if the config has one.

    A float baseline given as `init_content` is loaded before the weights become bit planes
    (they are quantized from it); a twofold checkpoint is loaded after, into the bit planes.
    """
    model = ResNet20(np.random.default_rng([config.seed, INIT_STREAM]))
    init_is_twofold = bool(init_content and init_content["config"].get("twofold"))
    if init_content and not init_is_twofold:
        restore_model(model, init_content, config.init)
    if config.twofold is None:
        if init_is_twofold:
            raise NptwofoldError(f"{config.init} is a twofold checkpoint; a float run cannot "
                                 "start from it")
        return model, None
    method = Twofold(model, TwofoldConfig(**config.twofold), config.seed)
    if init_is_twofold:
        restore_state(model, method, init_content, config.init)
    return model, method


def restore_state(model, method, content, path):
    """Loads a checkpoint's model arrays; for a twofold model also its /twofold group (dropped
    planes, and the check of the stored masks)."""
    restore_model(model, content, path)
    if method is None:
        return
    if content.get("twofold") is None:
        raise NptwofoldError(f"{path} has a twofold config but no /twofold group")
    method.load_h5(content["twofold"], path)


def load_model(path):
    """(model, Twofold state or None, checkpoint content) of a checkpoint, to evaluate it."""
    content = load_checkpoint(path)
    config = dataclasses.replace(TrainConfig.from_dict(content["config"]), init=None)
    model, method = build_model(config)
    restore_state(model, method, content, path)
    return model, method, content


def train_step(model, optimizer, images, labels, lr, method=None):
    """One forward, backward and update. Returns (mean loss, correct, regularizer values).

    `method` (a Twofold) adds its regularizer gradients and clamps the bits after the update.
    """
    model.train()
    logits = model.forward(images)
    loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    model.backward(dlogits)
    regularizers = method.regularize() if method is not None else {}
    optimizer.step(lr)
    if method is not None:
        method.after_step()
    return loss, correct, regularizers


def evaluate(model, images, labels, batch_size=500, progress=False):
    """Mean loss and accuracy of `model` (inference mode) on uint8 images."""
    model.eval()
    total_loss, correct = 0.0, 0
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
        logits = model.forward(to_float(images[start:start + batch_size]))
        loss, _, hits = softmax_cross_entropy(logits, labels[start:start + batch_size])
        total_loss += loss * len(logits)
        correct += hits
    return total_loss / len(images), correct / len(images)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class Trainer:
    """Owns model, optimizer and position; `run` trains to the end, saving every epoch."""

    def __init__(self, config, dataset, out_dir=None, progress=True, _resuming=False):
        self.config = config
        self.data = dataset
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        init_content = load_checkpoint(config.init) if config.init and not _resuming else None
        self.model, self.method = build_model(config, init_content)
        bit_names = self.method.bit_parameter_names() if self.method else set()
        self.optimizer = SGD(self.model, config.momentum, config.weight_decay, config.nesterov,
                             no_decay=bit_names)
        self.state = dict(epoch=0, step=0, global_step=0, epoch_loss_sum=0.0, epoch_correct=0,
                          epoch_seen=0, epoch_seconds=0.0, epoch_reg_net=0.0, epoch_reg_bit=0.0,
                          best_accuracy=-1.0, best_epoch=-1, history=[], post_training={},
                          twofold_reports=[])
        if config.post_training and not _resuming:
            self._start_post_training()

    def _start_post_training(self):
        """Accuracy before, then hard-prune with the masks, drop the bit planes the loss can
        spare (if `plane_drop_tolerance`; checked on the pruned model) and re-binarize (SPEC 3).

        The fine-tune that follows trains the kept bits under the same objective; the masks
        stay enforced and the bits are re-binarized after its last epoch, so precision is fixed.
        """
        def test_accuracy():
            return evaluate(self.model, self.data.test_images, self.data.test_labels,
                            self.config.eval_batch_size)[1]

        before = test_accuracy()
        self.method.hard_prune()
        dropping = {}
        if self.method.config.plane_drop_tolerance:
            dropping = self.method.drop_planes(self._plane_check_loss)
            tqdm.write(f"precision adjustment: {dropping['planes_dropped']} bit planes dropped, "
                       f"check loss {dropping['check_loss_before']:.4f} -> "
                       f"{dropping['check_loss_after']:.4f}")
        self.method.rebinarize()
        after_prune = test_accuracy()
        self.state["post_training"] = dict(accuracy_before=before,
                                           accuracy_after_prune=after_prune, **dropping)
        tqdm.write(f"post-training: test accuracy {before:.4f} before, {after_prune:.4f} after "
                   "hard pruning" + (", precision adjustment" if dropping else "")
                   + " and re-binarization")
        self.report(epoch=0)

    def _plane_check_loss(self):
        """Cross-entropy on the first training images, for plane dropping, with BN on the
        images' own batch statistics: right after hard pruning the running statistics are
        stale until the fine-tune re-estimates them, and would judge the drops on a broken
        model. The running statistics are left as they were."""
        count = self.method.config.plane_drop_images
        bn_state = {name: value.copy() for name, value in self.model.state_arrays()
                    if name.rsplit(".", 1)[-1] in BN_STATISTICS}
        logits = self.model.train().forward(to_float(self.data.train_images[:count]))
        for name, value in self.model.state_arrays():
            if name in bn_state:
                value[...] = bn_state[name]
        return softmax_cross_entropy(logits, self.data.train_labels[:count])[0]

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.data.train_labels) / self.config.batch_size)

    @classmethod
    def resume(cls, path, dataset, out_dir=None, progress=True):
        content = load_checkpoint(path)
        if content["train"] is None:
            raise NptwofoldError(f"{path} holds no training state, so it cannot be resumed")
        config = TrainConfig.from_dict(content["config"])
        trainer = cls(config, dataset, out_dir, progress, _resuming=True)
        restore_state(trainer.model, trainer.method, content, path)
        restore_optimizer(trainer.optimizer, content, path)
        trainer.state.update(content["train"])
        if config.post_training:
            trainer.method.hard_prune()  # a no-op on the stored bits; re-arms the mask per step
        return trainer

    def save(self, path):
        save_checkpoint(path, self.model, self.optimizer, self.state,
                        dataclasses.asdict(self.config),
                        extra_groups={"twofold": self.method.write_h5} if self.method else None)

    def run(self, max_steps=None):
        """Trains until the last epoch ends, or `max_steps` steps (then saves last.h5)."""
        steps_left = math.inf if max_steps is None else max_steps
        try:
            while self.state["epoch"] < self.config.epochs:
                steps_left -= self._train_epoch(steps_left)
                if self.state["step"] < self.steps_per_epoch:
                    break  # stopped inside the epoch
                self._end_epoch()
        except KeyboardInterrupt:
            if self.out_dir is not None:
                self.save(self.out_dir / "last.h5")
                tqdm.write(f"interrupted; position saved to {self.out_dir / 'last.h5'}, "
                           "continue with --resume")
            raise
        stopped_early = self.state["epoch"] < self.config.epochs
        no_epochs = self.config.epochs == 0  # post-training without a fine-tune
        if self.out_dir is not None and (stopped_early or no_epochs):
            self.save(self.out_dir / "last.h5")
            if no_epochs:
                self.write_logs()
        return self.state

    def _train_epoch(self, steps_left):
        config, state = self.config, self.state
        images, labels = self.data.train_images, self.data.train_labels
        order, offsets, flips = epoch_plan(config.seed, state["epoch"], len(labels))
        bar = tqdm(total=self.steps_per_epoch, initial=state["step"], disable=not self.progress,
                   desc=f"epoch {state['epoch'] + 1}/{config.epochs}", unit="step")
        done = 0
        started = time.perf_counter() - state["epoch_seconds"]
        while state["step"] < self.steps_per_epoch and done < steps_left:
            batch = slice(state["step"] * config.batch_size, (state["step"] + 1) * config.batch_size)
            index = order[batch]
            inputs = crop_flip_to_float(images[index], offsets[0, batch], offsets[1, batch], flips[batch])
            lr = learning_rate(config, state["global_step"], self.steps_per_epoch)
            loss, correct, regularizers = train_step(
                self.model, self.optimizer, inputs, labels[index], lr, self.method)
            state["epoch_reg_net"] += regularizers.get("reg_net", 0.0)
            state["epoch_reg_bit"] += regularizers.get("reg_bit", 0.0)
            state["epoch_loss_sum"] += float(loss) * len(index)
            state["epoch_correct"] += int(correct)
            state["epoch_seen"] += len(index)
            state["step"] += 1
            state["global_step"] += 1
            state["epoch_seconds"] = time.perf_counter() - started
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{state['epoch_loss_sum'] / state['epoch_seen']:.3f}",
                            acc=f"{state['epoch_correct'] / state['epoch_seen']:.3f}",
                            img_s=f"{state['epoch_seen'] / state['epoch_seconds']:.0f}",
                            lr=f"{lr:.4f}")
        bar.close()
        return done

    def _end_epoch(self):
        state = self.state
        test_loss, test_acc = evaluate(self.model, self.data.test_images, self.data.test_labels,
                                       self.config.eval_batch_size, self.progress)
        record = dict(epoch=state["epoch"] + 1,
                      train_loss=state["epoch_loss_sum"] / state["epoch_seen"],
                      train_acc=state["epoch_correct"] / state["epoch_seen"],
                      test_loss=test_loss, test_acc=test_acc,
                      lr=learning_rate(self.config, state["global_step"] - 1, self.steps_per_epoch),
                      seconds=state["epoch_seconds"],
                      img_per_s=state["epoch_seen"] / state["epoch_seconds"])
        if self.method is not None:
            steps = state["step"]
            record.update(reg_net=state["epoch_reg_net"] / steps, reg_bit=state["epoch_reg_bit"] / steps)
            self.method.end_epoch(record["epoch"], last=record["epoch"] == self.config.epochs)
        state["history"].append(record)
        improved = test_acc > state["best_accuracy"]
        if improved:
            state["best_accuracy"], state["best_epoch"] = test_acc, record["epoch"]
        state.update(epoch=state["epoch"] + 1, step=0, epoch_loss_sum=0.0, epoch_correct=0,
                     epoch_seen=0, epoch_seconds=0.0, epoch_reg_net=0.0, epoch_reg_bit=0.0)
        tqdm.write(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc "
                   f"{record['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f}"
                   f" | {record['img_per_s']:.0f} img/s")
        if self.method is not None:
            self.report(record["epoch"])
        if self.out_dir is not None:
            self.save(self.out_dir / "last.h5")
            if improved:
                self.save(self.out_dir / "best.h5")
            self.write_logs()

    def report(self, epoch):
        """Prints the twofold per-layer table and adds it to twofold_report.json/.csv."""
        rows = self.method.layer_report()
        tqdm.write(self.method.format_report(rows))
        self.state["twofold_reports"].append(dict(epoch=epoch, layers=rows))
        if self.out_dir is None:
            return
        reports = self.state["twofold_reports"]
        flat = [dict(epoch=r["epoch"], **row) for r in reports for row in r["layers"]]
        atomic_write(self.out_dir / "twofold_report.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(reports, indent=1)))
        atomic_write(self.out_dir / "twofold_report.csv", lambda tmp: write_csv(tmp, flat))

    def write_logs(self):
        """log.csv and log.json (one row per epoch) and summary.json, each written atomically."""
        history = self.state["history"]
        summary = dict(preset=self.config.preset, epochs_done=len(history),
                       post_training=self.state["post_training"] or None,
                       final_test_acc=(history[-1]["test_acc"] if history else
                                       self.state["post_training"].get("accuracy_after_prune")),
                       best_test_acc=self.state["best_accuracy"], best_epoch=self.state["best_epoch"],
                       config=dataclasses.asdict(self.config))

        if history:
            atomic_write(self.out_dir / "log.csv", lambda tmp: write_csv(tmp, history))
            atomic_write(self.out_dir / "log.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1)))
        atomic_write(self.out_dir / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
