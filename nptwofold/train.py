"""Training: learning-rate schedules, the epoch loop, logs and resumable checkpoints.

Every random choice derives from one seed: the initial weights from stream (seed, 0), and the
data order, crop offsets and flips of epoch e from stream (seed, 1, e). The position inside
training is just (epoch, step), so a checkpoint taken anywhere resumes bit for bit.

Interruptions: Ctrl-C takes effect at the next step boundary (a step half done has already
moved the BN statistics), saving last.h5 there. After a kill at any moment, --resume rebuilds
best.h5, the logs and the summary from the checkpoint's history and removes stale temporary
files. A non-finite loss or weight stops training before anything is saved.
"""
import dataclasses
import math
import shutil
import signal
import time
import weakref
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .build import build_model, load_model, restore_state
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .config import TrainConfig, dataset_name
from .errors import NptwofoldError
from .files import (RunLock, atomic_write, check_output_dir, stale_temporaries, write_csv,
                    write_json)
from .kernels.augment import CROP_PAD, crop_flip_to_float
from .optim import SGD
from .steps import Teacher, evaluate, train_step
from .twofold import start_post_training

EPOCH_STREAM = 1  # random stream (seed, 1, epoch) draws an epoch's order and augmentation
OUTPUT_FILES = ("last.h5", "best.h5", "log.csv", "log.json", "summary.json",
                "twofold_report.json", "twofold_report.csv")

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


def extended_config(config, position, epochs, path):
    """The config of float run `path` (at /train `position`) trained to `epochs` in all.

    A float run's schedule is a function of the step and the total: the step schedule does not
    depend on the total, so the extended run is exactly the run trained for `epochs` from the
    start; the cosine schedule is recomputed for the new total from the next step on (the
    learning rate rises again from where it was), which differs from a run planned that long.
    A Twofold run is not extended: its last epoch re-binarizes the bits for good."""
    done = position["epoch"] + (position["step"] > 0)
    if config.twofold is not None:
        raise NptwofoldError(f"{path} is a Twofold run, whose last epoch re-binarizes the bits "
                             f"for good, so --epochs cannot extend it; start a new run from "
                             f"it with --init {path}")
    if epochs < done:
        raise NptwofoldError(f"--epochs {epochs} is fewer than the {done} epochs {path} has "
                             "begun")
    return dataclasses.replace(config, epochs=epochs).validated()


class DeferredInterrupt:
    """While active, a first Ctrl-C only sets `requested`, which the trainer checks between
    steps; a second one interrupts at once (then nothing is saved, and last.h5 stays at its
    previous, consistent position)."""

    def __enter__(self):
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread, which alone receives Ctrl-C
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupt: stopping after this step (Ctrl-C again to stop at once, "
                   "without saving)")

    def __exit__(self, *exc_info):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Trainer:
    """Owns model, optimizer and position; `run` trains to the end, saving every epoch."""

    def __init__(self, config, dataset, out_dir=None, progress=True, _resuming=False):
        self.config = config
        self.data = dataset
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.lock = None  # the run folder's RunLock, held from here to the end of `run`
        if self.out_dir is not None:
            check_output_dir(self.out_dir)
            self.lock = RunLock(self.out_dir).acquire()
            weakref.finalize(self, self.lock.release)  # a trainer dropped before `run` ends
        try:
            self._build(_resuming)
        except BaseException:
            self.release()
            raise

    def _build(self, resuming):
        config = self.config
        self.interrupt = None  # a DeferredInterrupt while `run` trains
        self.pace_start = None  # (time, steps to go) after `run`'s first step, for the ETA
        init_content = load_checkpoint(config.init) if config.init and not resuming else None
        self.model, self.method = build_model(config, init_content)
        self.teacher = None
        if config.teacher:
            self.teacher = Teacher(load_model(config.teacher)[0], config.distill_temperature,
                                   config.distill_weight)
        if self.method is not None:
            self.method.activity_images = self.data.train_images
            self.method.check_labels = self.data.train_labels
        bit_names = self.method.bit_parameter_names() if self.method else set()
        self.optimizer = SGD(self.model, config.momentum, config.weight_decay, config.nesterov,
                             no_decay=bit_names)
        self.state = dict(epoch=0, step=0, global_step=0, epoch_loss_sum=0.0, epoch_correct=0,
                          epoch_seen=0, epoch_seconds=0.0, epoch_reg_net=0.0, epoch_reg_bit=0.0,
                          best_accuracy=-1.0, best_epoch=-1, history=[], post_training={},
                          twofold_reports=[])
        if config.post_training and not resuming:
            self.state["post_training"] = start_post_training(
                self.method, self.model, self.data, config.eval_batch_size)
            self.report(epoch=0)

    def release(self):
        """Lets another process write the run folder (`run` ends with this)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def steps_per_epoch(self):
        return math.ceil(len(self.data.train_labels) / self.config.batch_size)

    @classmethod
    def resume(cls, path, dataset, out_dir=None, progress=True, epochs=None):
        """Continues the run `path` holds; `epochs` trains a float run to that many epochs in
        all instead of its own number (`extended_config`)."""
        content = load_checkpoint(path)
        if content["compact"]:
            raise NptwofoldError(f"{path} is a compact checkpoint, with no optimizer or training "
                                 "state, so it cannot be resumed; fine-tune from it with --init")
        if content["train"] is None:
            raise NptwofoldError(f"{path} holds no training state, so it cannot be resumed")
        config = TrainConfig.from_dict(content["config"])
        if epochs is not None and epochs != config.epochs:
            config = extended_config(config, content["train"], epochs, path)
        trainer = cls(config, dataset, out_dir, progress, _resuming=True)
        try:
            trainer._restore(content, path)
        except BaseException:
            trainer.release()
            raise
        return trainer

    def _restore(self, content, path):
        """The model, optimizer and position of checkpoint `content`, checked against this run;
        then the outputs repaired."""
        state, config = self.state, self.config
        restore_state(self.model, self.method, content, path)
        if self.method is not None:
            self.method.restore_activity(content["twofold"], path)
        restore_optimizer(self.optimizer, content, path)
        state.update(content["train"])
        if not (state["epoch"] <= config.epochs and state["step"] < self.steps_per_epoch
                and (state["step"] == 0 or state["epoch"] < config.epochs)
                and len(state["history"]) == state["epoch"]):
            raise NptwofoldError(
                f"{path}: /train position epoch {state['epoch']}, step {state['step']} with "
                f"{len(state['history'])} history rows does not fit a run of {config.epochs} "
                f"epochs of {self.steps_per_epoch} steps on this data")
        if config.post_training:
            self.method.hard_prune()  # a no-op on the stored bits; re-arms the mask per step
        if self.out_dir is not None:
            self.repair_outputs(path)

    def repair_outputs(self, resumed_from):
        """Makes best.h5, the logs and the summary agree with the resumed position, whatever
        moment a kill struck, and removes the temporary files a kill leaves."""
        for name in OUTPUT_FILES:
            for stale in stale_temporaries(self.out_dir, name):
                stale.unlink(missing_ok=True)
        best_epoch, best = self.state["best_epoch"], self.out_dir / "best.h5"
        if best_epoch >= 1 and _stored_epoch(best) != best_epoch:
            if (self.state["epoch"], self.state["step"]) != (best_epoch, 0):
                raise NptwofoldError(f"{best} does not hold epoch {best_epoch}, the best one, "
                                     f"and {resumed_from} cannot rebuild it (it is at a later "
                                     "position)")
            # the kill came between the two checkpoint writes of the best epoch's end, so the
            # checkpoint resumed from holds exactly the model best.h5 should
            atomic_write(best, lambda tmp: shutil.copyfile(resumed_from, tmp))
            tqdm.write(f"rebuilt {best} (epoch {best_epoch}) from {resumed_from}")
        self.write_logs()

    def save(self, path):
        # the dataset by name: a checkpoint holds no path of the machine that wrote it
        config = dict(dataclasses.asdict(self.config), data=dataset_name(self.config.data))
        save_checkpoint(path, self.model, self.optimizer, self.state, config,
                        extra_groups={"twofold": self.method.write_h5} if self.method else None)

    def run(self, max_steps=None):
        """Trains until the last epoch ends, or `max_steps` steps (then saves last.h5)."""
        if self.lock is not None:
            self.lock.acquire()
        try:
            return self._run(max_steps)
        finally:
            self.release()

    def _run(self, max_steps):
        steps_left = math.inf if max_steps is None else max_steps
        self.pace_start = None  # the first step may compile kernels: the pace starts after it
        with DeferredInterrupt() as self.interrupt:
            while self.state["epoch"] < self.config.epochs and not self.interrupt.requested:
                steps_left -= self._train_epoch(steps_left)
                if self.state["step"] < self.steps_per_epoch:
                    break  # stopped inside the epoch
                self._end_epoch()
            if self.interrupt.requested:
                if self.out_dir is not None:
                    self.save(self.out_dir / "last.h5")
                    tqdm.write(f"interrupted; position saved to {self.out_dir / 'last.h5'}, "
                               "continue with --resume")
                raise KeyboardInterrupt
        stopped_early = self.state["epoch"] < self.config.epochs
        no_epochs = self.config.epochs == 0  # post-training without a fine-tune
        if self.out_dir is not None and (stopped_early or no_epochs):
            self.save(self.out_dir / "last.h5")
            if no_epochs:
                self.write_logs()
        return self.state

    def steps_to_go(self):
        state = self.state
        return (self.config.epochs - state["epoch"]) * self.steps_per_epoch - state["step"]

    def time_to_go(self):
        """The rest of the whole run as text ("1:02:03"), at this session's pace since its
        first step (evaluations included once an epoch has ended); "?" until it is known."""
        if self.pace_start is None:
            self.pace_start = (time.perf_counter(), self.steps_to_go())
        started, steps_then = self.pace_start
        done, to_go = steps_then - self.steps_to_go(), self.steps_to_go()
        if done <= 0:
            return "?"
        return tqdm.format_interval((time.perf_counter() - started) / done * to_go)

    def _train_epoch(self, steps_left):
        config, state = self.config, self.state
        images, labels = self.data.train_images, self.data.train_labels
        order, offsets, flips = epoch_plan(config.seed, state["epoch"], len(labels))
        bar = tqdm(total=self.steps_per_epoch, initial=state["step"], disable=not self.progress,
                   desc=f"epoch {state['epoch'] + 1}/{config.epochs}", unit="step")
        done = 0
        started = time.perf_counter() - state["epoch_seconds"]
        while (state["step"] < self.steps_per_epoch and done < steps_left
               and not self.interrupt.requested):
            batch = slice(state["step"] * config.batch_size, (state["step"] + 1) * config.batch_size)
            index = order[batch]
            inputs = crop_flip_to_float(images[index], offsets[0, batch], offsets[1, batch], flips[batch])
            lr = learning_rate(config, state["global_step"], self.steps_per_epoch)
            loss, correct, regularizers = train_step(
                self.model, self.optimizer, inputs, labels[index], lr, self.method,
                self.teacher)
            self._check_finite(loss, bar)
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
                            lr=f"{lr:.4f}", run_left=self.time_to_go())
        bar.close()
        return done

    def _check_finite(self, loss, bar):
        """Stops a diverged run before it saves: last.h5 and best.h5 keep the last good epoch."""
        bad = None if math.isfinite(loss) else f"the loss is {loss}"
        for name, value in self.model.state_arrays():
            if bad is None and not np.isfinite(value).all():
                bad = f"{name} has non-finite values"
        if bad is not None:
            bar.close()
            raise NptwofoldError(
                f"training diverged at epoch {self.state['epoch'] + 1}, step "
                f"{self.state['step'] + 1}: {bad} (learning rate {self.config.lr:g} too high?); "
                "the checkpoints keep the last good epoch")

    def _end_epoch(self):
        state = self.state
        epoch = state["epoch"] + 1
        if self.method is not None:
            # first, so the test accuracy is that of the model the checkpoint stores (an
            # energy-aware re-binarization changes the levels; a plain one does not)
            self.method.end_epoch(epoch, last=epoch == self.config.epochs)
        test_loss, test_acc = evaluate(self.model, self.data.test_images, self.data.test_labels,
                                       self.config.eval_batch_size, self.progress)
        record = dict(epoch=epoch,
                      train_loss=state["epoch_loss_sum"] / state["epoch_seen"],
                      train_acc=state["epoch_correct"] / state["epoch_seen"],
                      test_loss=test_loss, test_acc=test_acc,
                      lr=learning_rate(self.config, state["global_step"] - 1, self.steps_per_epoch),
                      seconds=state["epoch_seconds"],
                      img_per_s=state["epoch_seen"] / state["epoch_seconds"])
        if self.method is not None:
            steps = state["step"]
            record.update(reg_net=state["epoch_reg_net"] / steps, reg_bit=state["epoch_reg_bit"] / steps)
        state["history"].append(record)
        improved = test_acc > state["best_accuracy"]
        if improved:
            state["best_accuracy"], state["best_epoch"] = test_acc, record["epoch"]
        state.update(epoch=state["epoch"] + 1, step=0, epoch_loss_sum=0.0, epoch_correct=0,
                     epoch_seen=0, epoch_seconds=0.0, epoch_reg_net=0.0, epoch_reg_bit=0.0)
        tqdm.write(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc "
                   f"{record['train_acc']:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f}"
                   f" | {record['img_per_s']:.0f} img/s"
                   + (f" | run: {self.time_to_go()} to go" if self.steps_to_go() else ""))
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
        if self.out_dir is not None:
            self._write_reports()

    def _write_reports(self):
        reports = self.state["twofold_reports"]
        flat = [dict(epoch=r["epoch"], **row) for r in reports for row in r["layers"]]
        write_json(self.out_dir / "twofold_report.json", reports)
        write_csv(self.out_dir / "twofold_report.csv", flat)

    def write_logs(self):
        """log.csv and log.json (one row per epoch), the twofold reports and summary.json, each
        written atomically."""
        history = self.state["history"]
        summary = dict(preset=self.config.preset, epochs_done=len(history),
                       post_training=self.state["post_training"] or None,
                       final_test_acc=(history[-1]["test_acc"] if history else
                                       self.state["post_training"].get("accuracy_after_prune")),
                       best_test_acc=self.state["best_accuracy"], best_epoch=self.state["best_epoch"],
                       config=dataclasses.asdict(self.config))

        if history:
            write_csv(self.out_dir / "log.csv", history)
            write_json(self.out_dir / "log.json", history)
        if self.state["twofold_reports"]:
            self._write_reports()
        write_json(self.out_dir / "summary.json", summary)


def _stored_epoch(path):
    """The epoch of the training position a checkpoint holds; None if it is absent or
    unreadable."""
    try:
        train = load_checkpoint(path)["train"]
    except NptwofoldError:
        return None
    return train["epoch"] if train else None
