"""Training loop: exact resume, schedules, logs, reproducibility and config checks."""
import json
import re

import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.config import TrainConfig
from nptwofold.train import Trainer, epoch_plan, learning_rate

from helpers import REPO, state_of

TEACHER = str(REPO / "results/long-seed0/model.h5")  # the committed dense baseline


def tiny_config(**overrides):
    return TrainConfig.from_preset("quick", **{"epochs": 2, "batch_size": 16, "eval_batch_size": 8,
                                               "seed": 3, **overrides})


@pytest.mark.parametrize("teacher", [None, TEACHER])
def test_resume_mid_epoch_gives_identical_weights(tiny_dataset, tmp_path, teacher):
    config = tiny_config(teacher=teacher)
    straight = Trainer(config, tiny_dataset, tmp_path / "a", progress=False)
    straight.run()
    assert straight.state["global_step"] == 6  # 2 epochs x ceil(40 / 16)

    first_half = Trainer(config, tiny_dataset, tmp_path / "b", progress=False)
    first_half.run(max_steps=4)  # stops inside epoch 2
    assert (first_half.state["epoch"], first_half.state["step"]) == (1, 1)
    resumed = Trainer.resume(tmp_path / "b" / "last.h5", tiny_dataset, tmp_path / "b",
                             progress=False)
    resumed.run()

    want, got = state_of(straight.model), state_of(resumed.model)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    for name, velocity in straight.optimizer.velocity.items():
        assert np.array_equal(velocity, resumed.optimizer.velocity[name]), name
    untimed = [[{k: v for k, v in row.items() if k not in ("seconds", "img_per_s")}
                for row in trainer.state["history"]] for trainer in (straight, resumed)]
    assert untimed[0] == untimed[1]


def test_same_seed_same_run_other_seed_other_run(tiny_dataset):
    runs = [Trainer(tiny_config(epochs=1, warmup_epochs=0, seed=seed), tiny_dataset,
                    progress=False) for seed in (5, 5, 6)]
    for trainer in runs:
        trainer.run()
    weights = [state_of(trainer.model)["fc.weight"] for trainer in runs]
    assert np.array_equal(weights[0], weights[1])
    assert not np.array_equal(weights[0], weights[2])


def test_distillation_pulls_the_model_towards_its_teacher(tiny_dataset):
    """Trained on the soft targets alone, a model ends closer to its teacher (KL divergence
    of the softened outputs on the training images) than one trained on the labels."""
    from nptwofold.build import load_model
    from nptwofold.kernels.loss import distillation_loss
    from nptwofold.steps import predict

    images, labels = tiny_dataset.train_images, tiny_dataset.train_labels
    teacher_logits = predict(load_model(TEACHER)[0], images)
    divergence = {}
    for name, flags in (("distilled", dict(teacher=TEACHER, distill_weight=1.0)), ("plain", {})):
        trainer = Trainer(tiny_config(epochs=20, warmup_epochs=0, lr=0.02, **flags),
                          tiny_dataset, progress=False)
        trainer.run()
        divergence[name] = distillation_loss(predict(trainer.model, images), teacher_logits,
                                             labels, 4.0, 1.0)[0]
    assert divergence["distilled"] < 0.8 * divergence["plain"]


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_distillation_weight_selects_labels_or_teacher(tiny_dataset, weight):
    """Weight 0 trains exactly as without a teacher; weight 1 ignores the labels (scrambled
    labels give the same weights)."""
    def weights(dataset, **flags):
        trainer = Trainer(tiny_config(epochs=2, **flags), dataset, progress=False)
        trainer.run()
        return state_of(trainer.model)

    distilled = weights(tiny_dataset, teacher=TEACHER, distill_weight=weight)
    if weight == 0.0:
        other = weights(tiny_dataset)
    else:
        scrambled = tiny_dataset._replace(train_labels=(tiny_dataset.train_labels + 3) % 10)
        other = weights(scrambled, teacher=TEACHER, distill_weight=weight)
    for name in distilled:
        assert np.array_equal(distilled[name], other[name]), name


def test_epoch_plan_is_a_permutation_with_valid_augmentation():
    order, offsets, flips = epoch_plan(seed=1, epoch=4, n_images=100)
    assert sorted(order) == list(range(100))
    assert offsets.min() >= 0 and offsets.max() <= 8
    assert 20 < flips.sum() < 80
    again = epoch_plan(seed=1, epoch=4, n_images=100)
    assert all(np.array_equal(a, b) for a, b in zip((order, offsets, flips), again))
    assert not np.array_equal(order, epoch_plan(seed=1, epoch=5, n_images=100)[0])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig.from_preset("short")
    steps = 100
    lrs = [learning_rate(config, s, steps) for s in range(config.epochs * steps)]
    assert lrs[0] == pytest.approx(0.1 / steps)
    assert lrs[steps - 1] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:]))
    assert lrs[-1] < 1e-4


def test_step_schedule_of_the_paper_preset():
    config = TrainConfig.from_preset("paper")
    assert (config.epochs, config.weight_decay, config.batch_size) == (182, 1e-4, 128)
    steps = 391
    assert learning_rate(config, 90 * steps, steps) == pytest.approx(0.1)
    assert learning_rate(config, 91 * steps, steps) == pytest.approx(0.01)
    assert learning_rate(config, 136 * steps, steps) == pytest.approx(0.001)


def test_logs_and_checkpoints_are_written_each_epoch(tiny_dataset, tmp_path):
    Trainer(tiny_config(), tiny_dataset, tmp_path, progress=False).run()
    history = json.loads((tmp_path / "log.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"} <= set(history[0])
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert header == list(history[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_test_acc"] == history[-1]["test_acc"]
    assert summary["best_test_acc"] == max(row["test_acc"] for row in history)
    assert (tmp_path / "last.h5").exists() and (tmp_path / "best.h5").exists()


@pytest.mark.parametrize("override,message", [
    ({"epochs": 0}, "--epochs must be >= 1 (got 0)"), ({"lr": -0.1}, "--lr must be > 0 (got -0.1)"),
    ({"lr": float("inf")}, "--lr must be a finite number (got inf)"),
    ({"momentum": 1.0}, "--momentum must be in [0, 1) (got 1.0)"),
    ({"weight_decay": -1e-4}, "--weight-decay must be >= 0 (got -0.0001)"),
    ({"batch_size": 0}, "--batch-size must be in [1, 4096] (got 0)"),
    ({"batch_size": 20000}, "--batch-size must be in [1, 4096] (got 20000)"),
    ({"schedule": "linear"}, "--schedule must be one of cosine, step (got 'linear')"),
    ({"seed": -1}, "--seed must be >= 0 (got -1)"),
    ({"epochs": "3"}, "--epochs must be an int (got '3')"),
    ({"epochs": 1}, "--epochs 1 is too short for the quick preset's --warmup-epochs 1: warm-up "
                    "must be shorter than training"),
    ({"epochs": 2, "warmup_epochs": 2}, "--warmup-epochs 2 must be shorter than --epochs 2"),
    ({"post_training": True}, "--post-training needs a twofold config"),
    ({"teacher": "t.h5", "distill_weight": 1.5}, "--distill-weight must be in [0, 1] (got 1.5)"),
    ({"teacher": "t.h5", "distill_temperature": 0}, "--distill-temperature must be > 0"),
    ({"distill_weight": 0.5}, "--distill-temperature and --distill-weight need --teacher"),
])
def test_bad_config_values_are_clear_errors(override, message):
    with pytest.raises(NptwofoldError) as error:
        TrainConfig.from_preset("quick", **override)
    assert str(error.value).startswith(message)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(NptwofoldError, match="unknown preset"):
        TrainConfig.from_preset("huge")


def test_resume_with_more_epochs_extends_a_step_schedule_run_exactly(tiny_dataset, tmp_path):
    """The step schedule does not depend on --epochs: 1 epoch then extended to 3 must be the
    3-epoch run, bit for bit; the cosine schedule is recomputed for the new total."""
    config = tiny_config(epochs=3, schedule="step", milestones=[2])
    straight = Trainer(config, tiny_dataset, tmp_path / "a", progress=False)
    straight.run()
    Trainer(tiny_config(epochs=1, schedule="step", milestones=[2]), tiny_dataset,
            tmp_path / "b", progress=False).run()
    extended = Trainer.resume(tmp_path / "b/last.h5", tiny_dataset, tmp_path / "b",
                              progress=False, epochs=3)
    extended.run()
    want, got = state_of(straight.model), state_of(extended.model)
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    assert json.loads((tmp_path / "b/summary.json").read_text())["config"]["epochs"] == 3

    Trainer(tiny_config(epochs=1, warmup_epochs=0), tiny_dataset, tmp_path / "c",
            progress=False).run()
    cosine = Trainer.resume(tmp_path / "c/last.h5", tiny_dataset, progress=False, epochs=2)
    assert cosine.config.epochs == 2
    cosine.run()
    assert cosine.state["history"][1]["lr"] == learning_rate(cosine.config, 5, 3)


def test_resume_epochs_refuses_fewer_epochs_and_twofold_runs(tiny_dataset, tmp_path):
    Trainer(tiny_config(), tiny_dataset, tmp_path / "float", progress=False).run()
    with pytest.raises(NptwofoldError, match="fewer than the 2 epochs"):
        Trainer.resume(tmp_path / "float/last.h5", tiny_dataset, progress=False, epochs=1)
    Trainer(tiny_config(epochs=1, warmup_epochs=0, twofold={}), tiny_dataset,
            tmp_path / "twofold", progress=False).run()
    with pytest.raises(NptwofoldError, match="start a new run from it with --init"):
        Trainer.resume(tmp_path / "twofold/last.h5", tiny_dataset, progress=False, epochs=2)


def test_each_epoch_line_shows_the_time_left_in_the_run(tiny_dataset, capsys):
    Trainer(tiny_config(epochs=3, warmup_epochs=0), tiny_dataset, progress=False).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    assert all(re.search(r"\| run: \d+:\d\d to go$", line) for line in lines[:2]), lines
    assert "to go" not in lines[2]
