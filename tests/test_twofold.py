"""Twofold Sparsity on the model: masks, bit-plane layers, regularizer hooks, post-training,
checkpoints of twofold runs and their mask check."""
import dataclasses
import json

import h5py
import numpy as np
import pytest

from nptwofold.checkpoint import load_checkpoint
from nptwofold.errors import NptwofoldError
from nptwofold.kernels.lfsr import kept_per_column
from nptwofold.kernels.quant import ENCODINGS, compose, max_level
from nptwofold.kernels.regularizers import reg_bit, reg_net
from nptwofold.model import ResNet20
from nptwofold.build import build_model, load_model
from nptwofold.config import TrainConfig
from nptwofold.train import Trainer
from nptwofold.twofold import TwofoldConfig, plane_check_loss

from helpers import state_of, twofold_of


def twofold_model(seed=0, **settings):
    model = ResNet20(np.random.default_rng(seed))
    return model, twofold_of(model, seed, **settings)


def test_every_conv_and_the_fc_are_mapped_with_exact_kept_counts():
    model, method = twofold_model(sparsity=0.7)
    assert len(method.layers) == 20  # 19 convs + fc
    for name, layer in method.layers.items():
        bits = layer.params["weight_bits"]
        assert bits.shape[0] == 8 and "weight" not in layer.params
        keep = method.keep_mask(name)
        assert keep.shape == bits.shape[1:]
        rows = int(np.prod(keep.shape[1:]))
        per_column = keep.reshape(keep.shape[0], -1).sum(axis=1)
        assert (per_column == kept_per_column(rows, 0.7)).all(), name


def test_bit_layers_start_from_the_quantized_float_weights():
    float_model = ResNet20(np.random.default_rng(3))
    weights = {name: value.copy() for name, value in float_model.state_arrays()}
    model, method = twofold_model(seed=3)
    for name, layer in method.layers.items():
        w = weights[f"{name}.weight"]
        scale = np.abs(w).max()
        want = np.rint(w / scale * 127) * scale / 127
        np.testing.assert_allclose(layer.effective_weight(), want, rtol=1e-6, atol=1e-7)


def test_masks_follow_the_seed():
    _, first = twofold_model(seed=1)
    _, again = twofold_model(seed=1)
    _, other = twofold_model(seed=2)
    _, explicit = twofold_model(seed=1, lfsr_seed=77)
    name = "layer2.1.conv1"
    assert np.array_equal(first.keep_mask(name), again.keep_mask(name))
    assert not np.array_equal(first.keep_mask(name), other.keep_mask(name))
    assert not np.array_equal(first.keep_mask(name), explicit.keep_mask(name))


def test_regularize_adds_exactly_the_kernel_gradients(sample):
    model, method = twofold_model(sparsity=0.5, lambda_net=0.3, beta_bit=2.0)
    images = sample.train_images[:8].astype(np.float32) / 255
    dlogits = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    model.forward(images)
    model.backward(dlogits)
    before = {name: layer.grads["weight_bits"].copy() for name, layer in method.layers.items()}
    values = method.regularize()
    want_net = want_bit = 0.0
    for name, layer in method.layers.items():
        bits = layer.params["weight_bits"]
        scale = layer.buffers["weight_scale"][0]
        net_value, dweight = reg_net(layer.weight, method.keep_mask(name), 0.3)
        bit_value, dbits = reg_bit(bits, 2.0, method.param_share[name])
        want_net += net_value
        want_bit += bit_value
        # the Reg_Net gradient reaches bit n through s/qmax * (+-2^n) where the clip is inactive
        signs = np.array([2.0 ** n for n in range(7)] + [-128.0]).reshape(8, *[1] * dweight.ndim)
        via_bits = dweight[None] * scale / max_level(8) * signs
        np.testing.assert_allclose(layer.grads["weight_bits"] - before[name], via_bits + dbits,
                                   rtol=1e-4, atol=1e-7)
    assert values["reg_net"] == pytest.approx(want_net)
    assert values["reg_bit"] == pytest.approx(want_bit)


def test_planes_are_dropped_while_the_check_loss_stays_within_tolerance():
    """A stand-in loss that grows with each layer's dropped planes: the round-robin stops a
    layer at its first refused drop and keeps the total within the tolerance."""
    _, method = twofold_model(plane_drop_tolerance=1.0)
    cost = {name: 0.3 if name.startswith("layer3") else 0.01 for name in method.layers}

    def check_loss():
        return 2.0 + sum(cost[name] * layer.dropped_planes for name, layer in method.layers.items())

    dropping = method.drop_planes(check_loss)
    method.rebinarize()
    dropped = {name: layer.dropped_planes for name, layer in method.layers.items()}
    assert dropping["planes_dropped"] == sum(dropped.values())
    assert dropping["check_loss_before"] == 2.0 and dropping["check_loss_after"] == check_loss()
    total = sum(cost[name] * k for name, k in dropped.items())
    assert total <= 1.0 + 1e-9
    cheap = [k for name, k in dropped.items() if cost[name] < 0.3]
    assert min(cheap) >= 2 and max(cheap) - min(cheap) <= 1  # round-robin: turns in order
    assert 0 < sum(k for name, k in dropped.items() if cost[name] == 0.3) <= 3
    # nothing more fits: any further drop would break the budget
    assert all(k == 6 or total + cost[name] > 1.0 + 1e-9 for name, k in dropped.items())
    for name, layer in method.layers.items():
        levels = method.levels(name)
        assert (levels % 2 ** layer.dropped_planes == 0).all()
        assert (layer.params["weight_bits"][:layer.dropped_planes] == 0).all()
        assert set(np.unique(layer.params["weight_bits"])) <= {0.0, 1.0}
    report = {row["layer"]: row for row in method.layer_report()}
    assert all(report[name]["dropped_planes"] == k for name, k in dropped.items())


def test_dropping_rounds_to_the_nearest_coarser_level_and_stays_dropped():
    _, method = twofold_model(plane_drop_tolerance=0.5)
    layer = method.layers["fc"]
    real = compose(layer.params["weight_bits"].astype(np.uint8)).astype(np.int64)
    layer.dropped_planes = 2
    levels = method.levels("fc").astype(np.int64)
    want = np.clip(4 * np.rint(real / 4), -124, 124)
    np.testing.assert_array_equal(levels, want)
    method.rebinarize()
    layer.params["weight_bits"][:2] += 0.7  # as an optimizer step might
    method.after_step()
    assert (layer.params["weight_bits"][:2] == 0).all()


@pytest.fixture(scope="module")
def dropping_run(pipeline, tiny_dataset, tmp_path_factory):
    """Post-training with the precision adjustment, from the pipeline's twofold phase."""
    root, _ = pipeline
    out = tmp_path_factory.mktemp("dropping")
    config = TrainConfig.from_preset(
        "quick", epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4, lr=0.001,
        twofold=dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0, plane_drop_tolerance=0.5,
                     plane_drop_images=10),
        post_training=True, init=str(root / "twofold/last.h5"))
    post = Trainer(config, tiny_dataset, out, progress=False)
    post.run()
    return out, post


def test_post_training_drops_planes_on_the_pruned_model_and_fixes_them(dropping_run):
    out, post = dropping_run
    info = post.state["post_training"]
    dropped = {name: layer.dropped_planes for name, layer in post.method.layers.items()}
    assert info["planes_dropped"] == sum(dropped.values()) > 0
    assert info["check_loss_after"] <= info["check_loss_before"] + 0.5
    for name, layer in post.method.layers.items():  # after the fine-tune: still dropped, pruned
        assert (post.method.levels(name) % 2 ** layer.dropped_planes == 0).all()
        assert (post.method.levels(name)[post.method.keep_mask(name) == 0] == 0).all()
    # re-binarizing again (the fine-tune's last epoch did it once) drops nothing more
    post.method.end_epoch(1, last=True)
    assert {name: layer.dropped_planes for name, layer in post.method.layers.items()} == dropped


def test_plane_check_uses_batch_statistics_and_leaves_running_ones(dropping_run):
    from nptwofold.kernels.augment import to_float
    from nptwofold.kernels.loss import softmax_cross_entropy

    _, post = dropping_run
    before = state_of(post.model)
    count = post.method.config.plane_drop_images
    loss = plane_check_loss(post.model, post.data.train_images[:count],
                            post.data.train_labels[:count])
    assert all(np.array_equal(value, before[name]) for name, value in state_of(post.model).items())
    images = post.data.train_images[:10]
    logits = post.model.train().forward(to_float(images))  # batch statistics: the oracle
    assert loss == softmax_cross_entropy(logits, post.data.train_labels[:10])[0]
    eval_loss = softmax_cross_entropy(post.model.eval().forward(to_float(images)),
                                      post.data.train_labels[:10])[0]
    assert loss != eval_loss  # it is not the running-statistics loss
    for name, value in post.model.state_arrays():  # the oracle's train-mode pass moved them
        value[...] = before[name]


def test_no_planes_are_dropped_without_tolerance(pipeline):
    _, post = pipeline  # its twofold config has no plane_drop_tolerance
    assert "planes_dropped" not in post.state["post_training"]
    assert all(layer.dropped_planes == 0 for layer in post.method.layers.values())


def test_dropped_planes_survive_a_checkpoint(dropping_run, tiny_dataset):
    out, post = dropping_run
    dropped = {name: layer.dropped_planes for name, layer in post.method.layers.items()}
    model, method, _ = load_model(out / "last.h5")
    assert {name: layer.dropped_planes for name, layer in method.layers.items()} == dropped
    images = tiny_dataset.test_images[:6].astype(np.float32) / 255
    assert np.array_equal(model.eval().forward(images), post.model.eval().forward(images))
    with h5py.File(out / "last.h5", "r") as f:
        assert {name: int(f["twofold"][name].attrs["dropped_planes"]) for name in dropped} == dropped
    summary = json.loads((out / "summary.json").read_text())
    assert summary["post_training"]["planes_dropped"] == sum(dropped.values())


def test_after_step_clamps_bits_to_unit_interval():
    _, method = twofold_model()
    layer = method.layers["fc"]
    layer.params["weight_bits"][0, 0, 0] = 1.7
    layer.params["weight_bits"][1, 0, 0] = -0.4
    method.after_step()
    assert layer.params["weight_bits"].min() >= 0 and layer.params["weight_bits"].max() <= 1
    assert layer.params["weight_bits"][0, 0, 0] == 1.0 and layer.params["weight_bits"][1, 0, 0] == 0.0


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_hard_prune_zeroes_exactly_the_masked_weights(encoding):
    _, method = twofold_model(sparsity=0.6, weight_encoding=encoding)
    before = {name: method.levels(name).copy() for name in method.layers}
    method.hard_prune()
    for name in method.layers:
        keep = method.keep_mask(name).astype(bool)
        after = method.levels(name)
        assert (after[~keep] == 0).all()
        assert np.array_equal(after[keep], before[name][keep])
        assert (before[name][~keep] != 0).any()  # the test would notice a no-op prune


def reference_cells(levels, encoding):
    """Cell states of 8-bit levels, one row per stored column, from the encoding's definition."""
    def cells_of(codes):
        return [(codes >> (2 * m)) & 3 for m in range(4)]
    levels = levels.astype(np.int64)
    if encoding == "twos_complement":
        return np.array(cells_of(levels & 0xFF) + [(levels < 0).astype(np.int64)])
    if encoding == "offset_binary":
        return np.array(cells_of(levels + 128))
    return np.array(cells_of(np.where(levels > 0, levels, 0))
                    + cells_of(np.where(levels < 0, -levels, 0)))


def reference_planes(levels, encoding):
    levels = levels.astype(np.int64)
    codes = {"twos_complement": levels & 0xFF, "offset_binary": levels + 128,
             "sign_magnitude": np.abs(levels) + 128 * (levels < 0)}[encoding]
    return np.array([(codes >> n) & 1 for n in range(8)])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_report_counts_bits_and_cells_of_kept_weights(encoding):
    _, method = twofold_model(sparsity=0.5, weight_encoding=encoding)
    rows = method.layer_report()
    assert [row["layer"] for row in rows[:-1]] == list(method.layers) and rows[-1]["layer"] == "total"
    fc = rows[-2]
    levels = method.levels("fc")[method.keep_mask("fc").astype(bool)]
    zero_bits = (reference_planes(levels, encoding) == 0).mean()
    cells = reference_cells(levels, encoding)
    assert fc["kept"] == levels.size and fc["zero_bit_share"] == pytest.approx(zero_bits)
    for state, label in enumerate(("00", "01", "10", "11")):
        assert fc[f"cells_{label}"] == pytest.approx((cells == state).mean())
    assert rows[-1]["kept"] == sum(row["kept"] for row in rows[:-1])
    assert rows[-1]["network_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("settings,message", [
    (dict(sparsity=1.0), "--sparsity must be in [0, 1) (got 1.0)"),
    (dict(sparsity=-0.1), "--sparsity must be in [0, 1) (got -0.1)"),
    (dict(sparsity=float("nan")), "--sparsity must be a finite number (got nan)"),
    (dict(lambda_net=-1.0), "--lambda-net must be >= 0 (got -1.0)"),
    (dict(reg_bit_form="l1"), "--reg-bit-form must be one of poster, plane_lasso (got 'l1')"),
    (dict(mask_group=-1), "--mask-group must be >= 0 (got -1)"),
    (dict(plane_drop_tolerance=-0.1), "--plane-drop-tolerance must be >= 0 (got -0.1)"),
    (dict(plane_drop_images=0), "--plane-drop-images must be >= 1 (got 0)"),
    (dict(rebinarize_epochs=[0]), "--rebinarize-epochs must be >= 1 (got 0)"),
])
def test_bad_twofold_values_are_clear_errors(settings, message):
    with pytest.raises(NptwofoldError) as error:
        TwofoldConfig(**settings).validated()
    assert str(error.value).startswith(message)


@pytest.fixture(scope="module")
def pipeline(tiny_dataset, tmp_path_factory):
    """A tiny baseline -> twofold -> post-training run, as the twofold preset chains them."""
    root = tmp_path_factory.mktemp("pipeline")
    common = dict(epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4)
    Trainer(TrainConfig.from_preset("quick", **common), tiny_dataset, root / "base",
            progress=False).run()
    twofold = dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0, rebinarize_epochs=[1])
    Trainer(TrainConfig.from_preset("quick", **common, lr=0.01, init=str(root / "base/last.h5"),
                                    twofold=twofold), tiny_dataset, root / "twofold",
            progress=False).run()
    post = Trainer(TrainConfig.from_preset("quick", **common, lr=0.001, twofold=twofold,
                                           post_training=True, init=str(root / "twofold/last.h5")),
                   tiny_dataset, root / "post", progress=False)
    post.run()
    return root, post


def test_post_training_stores_consistent_bits_levels_and_weights(pipeline):
    root, post = pipeline
    assert set(post.state["post_training"]) == {"accuracy_before", "accuracy_after_prune"}
    with h5py.File(root / "post/last.h5", "r") as f:
        for name in post.method.layers:
            group = f["twofold"][name]
            levels, planes = group["levels"][()], group["bit_planes"][()]
            assert levels.dtype == np.int8 and planes.dtype == np.uint8
            assert np.array_equal(compose(planes), levels)
            scale = group.attrs["scale"]
            assert np.array_equal(group["weight"][()], (scale * levels / 127).astype(np.float32))
            trained_bits = f["model"][f"{name}.weight_bits"][()]
            assert np.array_equal(trained_bits, planes.astype(np.float32))  # re-binarized: exact bits
            assert (levels[group["keep_mask"][()] == 0] == 0).all()


def test_post_training_fine_tune_trains_kept_bits_and_keeps_masks(pipeline, tiny_dataset, tmp_path):
    root, _ = pipeline
    config = TrainConfig.from_preset(
        "quick", epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4, lr=0.5,
        twofold=dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0), post_training=True,
        init=str(root / "twofold/last.h5"))
    trainer = Trainer(config, tiny_dataset, None, progress=False)
    pruned = {name: trainer.method.levels(name) for name in trainer.method.layers}
    trainer.run(max_steps=3)
    changed = 0
    for name, layer in trainer.method.layers.items():
        cut = trainer.method.keep_mask(name) == 0
        assert (layer.params["weight_bits"][:, cut] == 0).all()
        changed += int((trainer.method.levels(name) != pruned[name]).sum())
    assert changed > 0  # the kept bits are trained, not frozen


def test_twofold_run_checkpoint_round_trip_and_mask_check(pipeline, tmp_path):
    root, post = pipeline
    model, method, content = load_model(root / "post/last.h5")
    assert all(np.array_equal(a, b) for a, b in zip(state_of(model).values(),
                                                     state_of(post.model).values()))
    images = post.data.test_images[:6].astype(np.float32) / 255
    assert np.array_equal(model.eval().forward(images), post.model.eval().forward(images))
    config = TrainConfig.from_dict(content["config"])
    tampered = tmp_path / "tampered.h5"
    tampered.write_bytes((root / "post/last.h5").read_bytes())
    with h5py.File(tampered, "r+") as f:
        mask = f["twofold/layer1.0.conv1/keep_mask"]
        mask[0, 0, 0, 0] = 1 - mask[0, 0, 0, 0]
    config.init = str(tampered)
    with pytest.raises(NptwofoldError, match="/twofold/layer1.0.conv1: the stored keep-mask"):
        build_model(config, load_checkpoint(tampered))


@pytest.mark.parametrize("lambda_energy", [0.0, 2.0])
def test_twofold_resume_is_exact(tiny_dataset, tmp_path, lambda_energy):
    """Stopped inside the second epoch: with the energy regularizer, the resumed run must weigh
    it with the activity measured at the first epoch's end, not re-measure it mid-epoch."""
    config = TrainConfig.from_preset("quick", epochs=3, batch_size=16, eval_batch_size=10,
                                     warmup_epochs=0, lr=0.02,
                                     twofold=dict(sparsity=0.3, lambda_net=0.2, beta_bit=3.0,
                                                  lambda_energy=lambda_energy))
    straight = Trainer(config, tiny_dataset, tmp_path / "a", progress=False)
    straight.run()
    half = Trainer(dataclasses.replace(config), tiny_dataset, tmp_path / "b", progress=False)
    half.run(max_steps=4)
    resumed = Trainer.resume(tmp_path / "b/last.h5", tiny_dataset, tmp_path / "b", progress=False)
    resumed.run()
    want, got = state_of(straight.model), state_of(resumed.model)
    assert all(np.array_equal(want[name], got[name]) for name in want)


def test_a_checkpoint_without_activity_resumes_by_measuring_it(tiny_dataset, tmp_path):
    """Checkpoints written before a_i was stored still resume; a partial one is refused."""
    config = TrainConfig.from_preset("quick", epochs=2, batch_size=16, eval_batch_size=10,
                                     warmup_epochs=0, lr=0.02,
                                     twofold=dict(sparsity=0.3, lambda_energy=2.0))
    Trainer(config, tiny_dataset, tmp_path / "run", progress=False).run(max_steps=4)
    path = tmp_path / "run/last.h5"
    with h5py.File(path, "r+") as f:
        stored = {name: f["twofold"][name]["activity"][()] for name in f["twofold"]}
        del f["twofold"][next(iter(stored))]["activity"]
    with pytest.raises(NptwofoldError, match="/activity is missing while other layers"):
        Trainer.resume(path, tiny_dataset, tmp_path / "run", progress=False)
    with h5py.File(path, "r+") as f:
        for name in stored:
            f["twofold"].get(name).pop("activity", None)
    resumed = Trainer.resume(path, tiny_dataset, tmp_path / "run", progress=False)
    assert resumed.method.activity is None
    resumed.run()
    assert resumed.state["epoch"] == 2 and resumed.method.activity is not None


def test_bits_are_rebinarized_after_the_last_twofold_epoch(pipeline):
    root, _ = pipeline
    with h5py.File(root / "twofold/last.h5", "r") as f:
        for name in f["twofold"]:
            bits = f["model"][f"{name}.weight_bits"][()]
            assert np.isin(bits, (0.0, 1.0)).all(), name
            assert np.array_equal(bits, f["twofold"][name]["bit_planes"][()].astype(np.float32))


@pytest.mark.parametrize("encoding", ["offset_binary", "sign_magnitude"])
def test_planes_cells_and_checkpoint_follow_the_weight_encoding(pipeline, tiny_dataset, tmp_path,
                                                                encoding):
    """Trained, pruned, re-binarized and stored in the encoding: the stored planes and cells are
    those of the levels by the encoding's definition, and the model's bits are those planes."""
    root, _ = pipeline
    common = dict(epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4)
    twofold = dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0)
    common["hardware"] = dict(weight_encoding=encoding)
    Trainer(TrainConfig.from_preset("quick", **common, lr=0.01, init=str(root / "base/last.h5"),
                                    twofold=twofold), tiny_dataset, tmp_path / "twofold",
            progress=False).run()
    post = Trainer(TrainConfig.from_preset("quick", **common, lr=0.001, twofold=twofold,
                                           post_training=True,
                                           init=str(tmp_path / "twofold/last.h5")),
                   tiny_dataset, tmp_path / "post", progress=False)
    post.run()
    with h5py.File(tmp_path / "post/last.h5", "r") as f:
        for name in post.method.layers:
            group = f["twofold"][name]
            levels, keep = group["levels"][()], group["keep_mask"][()].astype(bool)
            assert group.attrs["encoding"] == encoding
            assert (levels[~keep] == 0).all() and (levels[keep] != 0).any()
            planes = group["bit_planes"][()].reshape(8, -1)
            assert np.array_equal(planes, reference_planes(levels.ravel(), encoding))
            cells = group["cells"][()].reshape(len(reference_cells(levels[:1], encoding)), -1)
            assert np.array_equal(cells, reference_cells(levels.ravel(), encoding))
            assert np.array_equal(f["model"][f"{name}.weight_bits"][()],
                                  group["bit_planes"][()].astype(np.float32))
    model, method, _ = load_model(tmp_path / "post/last.h5")
    images = tiny_dataset.test_images[:6].astype(np.float32) / 255
    assert np.array_equal(model.eval().forward(images), post.model.eval().forward(images))
    other = dict(common, hardware=dict(weight_encoding="twos_complement"))
    with pytest.raises(NptwofoldError, match=f"/twofold/conv1/@encoding is {encoding}, the "
                                             "hardware config says twos_complement"):
        Trainer(TrainConfig.from_preset("quick", **other, twofold=twofold, post_training=True,
                                        init=str(tmp_path / "post/last.h5")),
                tiny_dataset, None, progress=False)


def test_reg_bit_leaves_the_sign_magnitude_sign_plane_out():
    _, method = twofold_model(sparsity=0.5, beta_bit=3.0, weight_encoding="sign_magnitude")
    bits = method.layers["fc"].params["weight_bits"]
    value, dbits = method.reg_bit("fc")
    counted = bits.copy()
    counted[7] = 0.0
    want_value, want_grad = reg_bit(counted, 3.0, method.param_share["fc"])
    assert value == pytest.approx(want_value) and (dbits[7] == 0).all()
    np.testing.assert_array_equal(dbits[:7], want_grad[:7])
    assert bits[7].any()  # some weights are negative: the test would notice a counted sign


def unsettle_bits(method, seed):
    """Moves every bit plane off {0, 1} by up to 0.3, so q~ lies between grid levels."""
    rng = np.random.default_rng(seed)
    for layer in method.layers.values():
        bits = layer.params["weight_bits"]
        bits[...] = np.clip(bits + rng.uniform(-0.3, 0.3, bits.shape), 0, 1)


def test_post_training_rebinarization_rounds_energy_aware():
    """Before hard pruning the rounding is plain; after it, energy-aware (`energy_rounding`),
    and the cut weights stay 0."""
    from nptwofold.kernels.energy import energy_rounding_candidates
    from nptwofold.kernels.quant import real_levels
    _, method = twofold_model(sparsity=0.5, weight_encoding="sign_magnitude",
                              energy_rounding=0.9)
    unsettle_bits(method, seed=5)
    plain = {name: method.levels(name).copy() for name in method.layers}
    saved = {name: layer.params["weight_bits"].copy() for name, layer in method.layers.items()}
    method.rebinarize()
    assert all(np.array_equal(method.levels(name), plain[name]) for name in method.layers)
    for name, layer in method.layers.items():
        layer.params["weight_bits"][...] = saved[name]
    method.hard_prune()
    real = {name: real_levels(layer.params["weight_bits"], "sign_magnitude")
            for name, layer in method.layers.items()}
    method.rebinarize()
    moved = 0
    for name in method.layers:
        want = energy_rounding_candidates(real[name], method.energy_table, 0, 0.9)[1]
        got = method.levels(name)
        assert np.array_equal(got, want) and (got[method.keep_mask(name) == 0] == 0).all()
        moved += int((got != plain[name])[method.keep_mask(name) == 1].sum())
    assert moved > 0


def test_the_last_rounding_takes_its_own_radius():
    """`energy_rounding_last` replaces the radius only after the last epoch; 0 there rounds
    plainly."""
    from nptwofold.kernels.energy import energy_rounding_candidates
    from nptwofold.kernels.quant import real_levels
    for last_radius, moves in ((0.0, False), (0.6, True)):
        _, method = twofold_model(sparsity=0.5, weight_encoding="sign_magnitude",
                                  energy_rounding=0.9, energy_rounding_last=last_radius)
        unsettle_bits(method, seed=5)
        method.hard_prune()
        saved = {name: layer.params["weight_bits"].copy() for name, layer in method.layers.items()}
        real = {name: real_levels(bits, "sign_magnitude") for name, bits in saved.items()}
        method.end_epoch(1, last=False)  # a re-binarization only after the last epoch
        assert all(np.array_equal(layer.params["weight_bits"], saved[name])
                   for name, layer in method.layers.items())
        method.end_epoch(2, last=True)
        for name in method.layers:
            nearest, cheaper = energy_rounding_candidates(real[name], method.energy_table, 0,
                                                          last_radius or 0.9)
            np.testing.assert_array_equal(method.levels(name), cheaper if moves else nearest)
        for name, layer in method.layers.items():
            layer.params["weight_bits"][...] = saved[name]
        method.rebinarize()  # not the last: the main radius
        for name in method.layers:
            cheaper = energy_rounding_candidates(real[name], method.energy_table, 0, 0.9)[1]
            np.testing.assert_array_equal(method.levels(name), cheaper)


def test_energy_rounding_below_half_a_step_is_refused():
    with pytest.raises(NptwofoldError, match="--energy-rounding 0.3: is below 0.5"):
        TwofoldConfig(energy_rounding=0.3).validated()
    with pytest.raises(NptwofoldError, match="--energy-rounding-budget needs --energy-rounding"):
        TwofoldConfig(energy_rounding_budget=0.01).validated()


def fisher_model(sample, **settings):
    model, method = twofold_model(sparsity=0.5, weight_encoding="sign_magnitude",
                                  plane_drop_images=100, **settings)
    method.activity_images = sample.train_images[:100]
    method.check_labels = sample.train_labels[:100]
    return model, method


def test_weight_fisher_is_batch_size_times_the_mean_squared_batch_gradient(sample):
    """Two batches of FISHER_BATCH images: F = B (g_1^2 + g_2^2) / 2, with each batch gradient
    from its own forward and backward on BN batch statistics; the running statistics and the
    model's mode are left as they were."""
    from nptwofold.kernels.augment import to_float
    from nptwofold.kernels.loss import softmax_cross_entropy
    from nptwofold.twofold.fisher import FISHER_BATCH, weight_fisher
    model, method = fisher_model(sample)
    model.eval()
    bn_before = {name: value.copy() for name, value in model.state_arrays() if "running" in name}
    fisher = weight_fisher(method)
    assert not model.training
    for name, value in model.state_arrays():
        if name in bn_before:
            np.testing.assert_array_equal(value, bn_before[name])
    squares = {name: [] for name in method.layers}
    for start in (0, FISHER_BATCH):
        model.train()
        images = to_float(sample.train_images[start:start + FISHER_BATCH])
        model.backward(softmax_cross_entropy(
            model.forward(images), sample.train_labels[start:start + FISHER_BATCH])[1])
        for name, layer in method.layers.items():
            squares[name].append(np.square(layer.weight_grad.astype(np.float64)))
    for name in method.layers:
        np.testing.assert_allclose(fisher[name], FISHER_BATCH * np.mean(squares[name], axis=0),
                                   rtol=1e-6, atol=1e-30)
    assert all(value.any() for value in fisher.values())


def test_budgeted_energy_rounding_takes_the_best_moves_within_the_budget(sample):
    """With a loss budget only some candidate moves are taken, those whose energy saved per
    predicted loss (1/2 F dW^2) is highest, and their predicted loss is within the budget; the
    rest round to the nearest level."""
    from nptwofold.kernels.energy import budgeted_moves, energy_rounding_candidates
    from nptwofold.kernels.quant import real_levels
    from nptwofold.twofold.fisher import weight_fisher
    budget = 2e-4
    _, method = fisher_model(sample, energy_rounding=0.9, energy_rounding_budget=budget)
    unsettle_bits(method, seed=7)
    method.hard_prune()
    real = {name: real_levels(layer.params["weight_bits"], "sign_magnitude")
            for name, layer in method.layers.items()}
    fisher = weight_fisher(method)
    method.measure_activity()
    figures = method.rebinarize()
    assert 0 < figures["rounding_moved"] < figures["rounding_candidates"]
    assert 0 < figures["rounding_predicted_loss"] <= budget
    gains, costs, chosen = [], [], []
    for name, layer in method.layers.items():
        nearest, cheaper = energy_rounding_candidates(real[name], method.energy_table, 0, 0.9)
        got = method.levels(name)
        assert ((got == nearest) | (got == cheaper)).all()
        energy = method.energy_table
        gains.append(method.activity[name] * (energy[nearest.astype(int) + 127]
                                              - energy[cheaper.astype(int) + 127]))
        moved = (cheaper.astype(np.float64) - nearest) * layer.buffers["weight_scale"][0] / 127
        costs.append(0.5 * fisher[name] * moved ** 2)
        chosen.append((got == cheaper) & (cheaper != nearest))
    gain = np.concatenate([g.ravel() for g in gains])
    cost = np.concatenate([c.ravel() for c in costs])
    taken = np.concatenate([c.ravel() for c in chosen])
    np.testing.assert_array_equal(taken, budgeted_moves(gain, cost, budget))
    assert cost[taken].sum() == pytest.approx(figures["rounding_predicted_loss"])


def test_logged_accuracy_is_that_of_the_energy_rounded_checkpoint(pipeline, tiny_dataset,
                                                                  tmp_path):
    """The last epoch's energy-aware re-binarization changes levels; the logged test accuracy
    and loss are those of the model the checkpoint stores."""
    from nptwofold.steps import evaluate
    root, _ = pipeline
    common = dict(epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4)
    twofold = dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0, energy_rounding=0.95)
    post = Trainer(TrainConfig.from_preset("quick", **common, lr=0.5, twofold=twofold,
                                           post_training=True, init=str(root / "twofold/last.h5")),
                   tiny_dataset, tmp_path, progress=False)
    post.run()
    model, _, _ = load_model(tmp_path / "last.h5")
    loss, accuracy = evaluate(model, tiny_dataset.test_images, tiny_dataset.test_labels, 10)
    record = post.state["history"][-1]
    assert (record["test_loss"], record["test_acc"]) == (loss, accuracy)
