"""A whole network on the simulated CIM array (SPEC 6): the bit-packed kernel against the
bit-serial simulator, the CIM forward against the fake-quant forward and the integer matmul,
its energy against a direct count, and scripts/cim_eval.py end to end."""
import csv
import dataclasses
import json

import h5py
import numpy as np
import pytest

from nptwofold.checkpoint import save_checkpoint
from nptwofold.cim_network import CimNetwork, quantize_activations
from nptwofold.errors import NptwofoldError
from nptwofold.hardware import HardwareConfig, layer_energy_report
from nptwofold.kernels import cim
from nptwofold.kernels.lfsr import kept_per_column
from nptwofold.model import ResNet20
from nptwofold.config import TrainConfig
from nptwofold.twofold import Twofold, TwofoldConfig

from test_cim import random_inputs, random_layer
from test_scripts import REPO, run

N_IMAGES = 4
PROBED = "layer2.0.conv1"  # a strided conv in the middle of the network


def assert_same_counts(actual, expected):
    np.testing.assert_array_equal(actual.cell_state_counts, expected.cell_state_counts)
    assert actual[1:] == expected[1:]


# (bits, rows, columns, kept rows or None for dense, group, rows per tile, input bits, density)
KERNEL_CASES = [
    (8, 150, 9, 100, 1, 7, 8, 0.5),     # three words, 15 tiles of 7 rows, the last of 2
    (4, 64, 5, 64, 5, 128, 3, 1.0),     # exactly one word, every row kept, one group
    (2, 200, 7, 37, 3, 16, 5, 0.2),     # sparse inputs, a partial last group
    (16, 70, 4, 70, 2, 64, 16, 0.9),    # 16-bit weights and inputs
    (8, 130, 6, None, 1, 50, 8, 0.6),   # dense: tiles are contiguous runs of words
]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_packed_kernel_equals_bit_serial_simulation(case):
    bits, n_rows, n_cols, kept, group, rows_per_tile, activation_bits, density = case
    rng = np.random.default_rng(n_rows)
    if kept is None:
        layer = cim.map_layer(rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1),
                                           (n_rows, n_cols)), bits, rows_per_tile)
    else:
        layer = random_layer(rng, n_rows, n_cols, bits, kept, group, rows_per_tile)[2]
    x = random_inputs(rng, 9, n_rows, activation_bits, density)
    range_bits = cim.adc_range_bits(rows_per_tile)
    for adc_bits in sorted({0, 1, 3, range_bits - 1, range_bits, range_bits + 3}):
        for skip_zero_tiles in (False, True):
            expected = cim.cim_matmul(layer, x, activation_bits, adc_bits, skip_zero_tiles)
            y, counts = cim.cim_matmul_packed(layer, x, activation_bits, adc_bits,
                                              skip_zero_tiles)
            np.testing.assert_array_equal(y, expected[0])
            assert_same_counts(counts, expected[1])


def twofold_model():
    """A fresh ResNet-20 with Twofold sparsity 0.5: (model, method)."""
    model = ResNet20(np.random.default_rng(0))
    return model, Twofold(model, TwofoldConfig(sparsity=0.5), 0)


def twofold_network(hardware=None):
    return CimNetwork(*twofold_model(), hardware)


@pytest.fixture(scope="module")
def images(sample):
    return sample.test_images[:N_IMAGES]


@pytest.fixture(scope="module")
def network(sample):
    """A fresh twofold ResNet-20 (sparsity 0.5), calibrated on 8 training images."""
    network = twofold_network()
    network.calibrate(sample.train_images[:8])
    return network


@pytest.fixture(scope="module")
def ideal_run(network, images):
    network.reset_energy()
    trace = {}
    logits = network.cim_logits(images, trace)
    return logits, trace


def test_ideal_cim_forward_equals_fake_quant(network, images, ideal_run):
    logits, _ = ideal_run
    fake_quant = network.fake_quant_logits(images)
    np.testing.assert_array_equal(logits, fake_quant)  # bit for bit, so equal predictions
    # and both are the float forward with dequantized weights and inputs, within float rounding
    bits = network.activation_bits

    def dequantized(layer, x):
        step = x.dtype.type(layer.clip / ((1 << bits) - 1))
        x_quantized = quantize_activations(x, layer.clip, bits) * step
        return network._float_layer(layer, x_quantized, network.quantized_weights[layer.name])

    float_forward = network._forward_with(images, dequantized)
    np.testing.assert_array_equal(float_forward.argmax(axis=1), fake_quant.argmax(axis=1))
    # A float32 rounding can carry an activation across a rounding boundary of the next
    # layer's quantizer (one level, found on numpy 2.4's BLAS), so end to end the two agree to
    # a few levels' worth, not to float rounding.
    np.testing.assert_allclose(float_forward, fake_quant, rtol=1e-3,
                               atol=1e-2 * np.abs(fake_quant).max())


def test_wide_inputs_take_the_float64_matmul_and_still_match_exactly(sample, images):
    wide = twofold_network(HardwareConfig(activation_bits=16))
    assert {w.dtype for w in wide.integer_weights.values()} == {np.dtype(np.float64)}
    assert twofold_network().integer_weights["fc"].dtype == np.float32
    wide.calibrate(sample.train_images[:4])
    np.testing.assert_array_equal(wide.cim_logits(images[:1]), wide.fake_quant_logits(images[:1]))


def test_integer_preactivations_are_the_integer_matmul(network, images, ideal_run):
    _, trace = ideal_run
    for name in (PROBED, "fc"):
        inputs, y = trace[name]
        kept_levels = cim.layer_matrix(network.layers[name].kept_levels).astype(np.int64)
        np.testing.assert_array_equal(y, inputs @ kept_levels)
    # The stem's inputs are the pixels, rows in PyTorch order (ci, ky, kx): the patch at
    # output (1, 1) of image 0 is pixels 0..2 x 0..2, every channel.
    stem_inputs = trace["conv1"][0].reshape(N_IMAGES, 32, 32, 3, 3, 3)
    np.testing.assert_array_equal(stem_inputs[0, 1, 1], images[0, :3, :3].transpose(2, 0, 1))


def test_counted_energy_equals_a_direct_count(network, ideal_run):
    _, trace = ideal_run
    inputs, y = trace[PROBED]
    crossbar = network.crossbars[PROBED]
    simulated_y, simulated = cim.cim_matmul(crossbar, inputs, network.activation_bits)
    np.testing.assert_array_equal(simulated_y, y)
    assert_same_counts(network.energy[PROBED], simulated)
    assert simulated.lfsr_steps == network.layers[PROBED].mask.steps * len(inputs)

    dense = cim.cim_matmul(network.dense_crossbars[PROBED], inputs, network.activation_bits)
    np.testing.assert_array_equal(dense[0], y)  # the baseline computes the same outputs
    assert_same_counts(network.baseline_energy[PROBED], dense[1])
    assert dense[1].lfsr_steps == 0

    report = network.energy_report()
    row = next(row for row in report["layers"] if row["layer"] == PROBED)
    direct = layer_energy_report(simulated, network.hardware)
    assert row["total_pj"] == pytest.approx(direct["total_pj"] / N_IMAGES, rel=1e-12)
    assert report["total"]["total_pj"] == pytest.approx(
        sum(row["total_pj"] for row in report["layers"]), rel=1e-12)
    assert report["total"]["baseline_ratio"] > 1  # half the rows are not stored


def test_counting_forward_gives_the_cim_runs_energy(sample, network, images, ideal_run):
    counted = twofold_network()
    counted.calibrate(sample.train_images[:8])
    logits = counted.fake_quant_logits(images, count_energy=True)
    np.testing.assert_array_equal(logits, network.fake_quant_logits(images))
    assert counted.n_images == network.n_images == N_IMAGES
    for name in network.layers:
        assert_same_counts(counted.energy[name], network.energy[name])
        assert_same_counts(counted.baseline_energy[name], network.baseline_energy[name])
    assert counted.energy_report() == network.energy_report()


def test_energy_ratio_to_a_baseline_network(sample, network, images, ideal_run):
    dense = CimNetwork(ResNet20(np.random.default_rng(1)))
    dense.calibrate(sample.train_images[:8])
    predictions = dense.count_energy(images, batch_size=3)  # two batches, 3 + 1 images
    np.testing.assert_array_equal(predictions, dense.fake_quant_logits(images).argmax(axis=1))
    assert dense.n_images == N_IMAGES
    baseline = dense.energy_report()
    report = network.energy_report(baseline)
    for row, base in zip(report["layers"] + [report["total"]],
                         baseline["layers"] + [baseline["total"]]):
        assert row["layer"] == base["layer"]
        assert row["baseline_total_pj"] == base["total_pj"]
        assert row["baseline_ratio"] == base["total_pj"] / row["total_pj"]
    with pytest.raises(NptwofoldError, match="other layers"):
        network.energy_report(dict(baseline, layers=baseline["layers"][:-1]))


def test_finite_adc_changes_the_outputs_not_the_first_layer_events(sample, images, network,
                                                                    ideal_run):
    coarse = twofold_network(HardwareConfig(adc_bits=4))
    coarse.calibrate(sample.train_images[:8])
    assert coarse.layers[PROBED].clip == network.layers[PROBED].clip
    logits = coarse.cim_logits(images)
    assert not np.allclose(logits, ideal_run[0])
    # the ADC changes values, not events; later layers see other inputs
    assert_same_counts(coarse.energy["conv1"], network.energy["conv1"])


def test_float_model_maps_dense(sample, images):
    network = CimNetwork(ResNet20(np.random.default_rng(1)), weight_bits=6)
    network.calibrate(sample.train_images[:4])
    for name, crossbar in network.crossbars.items():
        assert crossbar.kept_rows.shape[1] == crossbar.n_rows and crossbar.lfsr_steps == 0
        assert crossbar.bits == 6 and network.dense_crossbars[name] is crossbar
    logits = network.cim_logits(images[:2])
    np.testing.assert_array_equal(logits.argmax(axis=1),
                                  network.fake_quant_logits(images[:2]).argmax(axis=1))
    total = network.energy_report()["total"]
    assert total["lfsr_pj"] == 0 and total["baseline_ratio"] == 1


def test_calibration_is_stored_in_the_checkpoint_and_reused(sample, tmp_path):
    model, method = twofold_model()
    path = tmp_path / "twofold.h5"
    config = TrainConfig(twofold=dataclasses.asdict(TwofoldConfig(sparsity=0.5)))
    save_checkpoint(path, model, config=dataclasses.asdict(config),
                    extra_groups={"twofold": method.write_h5})
    first, content = CimNetwork.from_checkpoint(path)
    assert first.calibrate_checkpoint(path, content, sample.train_images[:6])
    clips = {name: layer.clip for name, layer in first.layers.items()}
    second, content = CimNetwork.from_checkpoint(path)
    assert not second.calibrate_checkpoint(path, content, sample.train_images[:6])
    assert {name: layer.clip for name, layer in second.layers.items()} == clips
    # other calibration images or other activation bits: calibrated again, not reused
    third, content = CimNetwork.from_checkpoint(path)
    assert third.calibrate_checkpoint(path, content, sample.train_images[:3])
    fourth, content = CimNetwork.from_checkpoint(path, HardwareConfig(activation_bits=6))
    assert fourth.calibrate_checkpoint(path, content, sample.train_images[:3])


def test_a_mask_keeping_every_row_maps_dense_without_lfsr():
    model = ResNet20(np.random.default_rng(0))
    network = CimNetwork(model, Twofold(model, TwofoldConfig(sparsity=0.0), 0))
    for name, crossbar in network.crossbars.items():
        assert crossbar.lfsr_steps == 0 and network.dense_crossbars[name] is crossbar
        np.testing.assert_array_equal(crossbar.kept_rows[0], np.arange(crossbar.n_rows))


def test_bad_arguments_raise(network, images):
    fresh = twofold_network()
    with pytest.raises(NptwofoldError, match="calibrate"):
        fresh.cim_logits(images)
    with pytest.raises(NptwofoldError, match="no energy counted"):
        fresh.energy_report()
    with pytest.raises(NptwofoldError, match="at least one image"):
        fresh.calibrate(images[:0])
    with pytest.raises(NptwofoldError, match="uint8"):
        network.fake_quant_logits(images / 255.0)
    with pytest.raises(NptwofoldError, match="odd"):
        CimNetwork(ResNet20(np.random.default_rng(1)), weight_bits=5)
    with pytest.raises(NptwofoldError, match="8-bit weights"):
        CimNetwork(*twofold_model(), weight_bits=6)
    with pytest.raises(NptwofoldError, match="needs 4 cells"):
        CimNetwork(*twofold_model(), HardwareConfig(crossbar_cols=3))
    layer = network.crossbars["fc"]
    with pytest.raises(NptwofoldError, match="unsigned 8-bit"):
        cim.cim_matmul_packed(layer, np.full((1, 64), 256), 8)
    with pytest.raises(NptwofoldError, match="rows"):
        cim.cim_matmul_packed(layer, np.zeros((1, 63), np.int64), 8)
    with pytest.raises(NptwofoldError, match="ADC bits"):
        cim.cim_matmul_packed(layer, np.zeros((1, 64), np.int64), 8, adc_bits=-1)


def test_cim_eval_script(tmp_path):
    model, method = twofold_model()
    config = TrainConfig(twofold=dataclasses.asdict(TwofoldConfig(sparsity=0.5)))
    checkpoint = tmp_path / "twofold.h5"
    save_checkpoint(checkpoint, model, config=dataclasses.asdict(config),
                    extra_groups={"twofold": method.write_h5})
    out = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 3,
              "--calib-images", 4, "--batch-size", 2, "--json", tmp_path / "r.json",
              "--csv", tmp_path / "r.csv", "--no-progress").stdout
    assert "fake-quant" in out and "layer3.2.conv2" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_images"] == 3 and result["cim_fake_quant_agreement"] == 1.0
    assert len(result["layers"]) == 20 and result["total"]["baseline_ratio"] > 1
    assert result["layers"][0]["kept"] == kept_per_column(27, 0.5)
    with open(tmp_path / "r.csv") as handle:
        assert [row["layer"] for row in csv.DictReader(handle)][-2:] == ["fc", "total"]

    baseline = tmp_path / "dense.h5"
    save_checkpoint(baseline, ResNet20(np.random.default_rng(1)), config=dataclasses.asdict(
        TrainConfig()))
    run(REPO / "scripts/cim_eval.py", checkpoint, "--baseline", baseline, "--data", "sample",
        "--images", 3, "--calib-images", 4, "--json", tmp_path / "b.json", "--no-progress")
    against = json.loads((tmp_path / "b.json").read_text())
    assert str(baseline) in against["baseline"]
    assert against["total"]["total_pj"] == result["total"]["total_pj"]
    assert against["total"]["baseline_total_pj"] != result["total"]["baseline_total_pj"]

    with h5py.File(checkpoint, "r") as f:  # the calibration is stored in the checkpoint
        assert f["cim"].attrs["calibration_images"] == 4
        stored_clips = [f["cim"][row["layer"]].attrs["activation_clip"] for row in result["layers"]]
    assert stored_clips == [row["clip"] for row in result["layers"]]
    assert "calibrated now" in result["clips"]
    again = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 3,
                "--calib-images", 4, "--json", tmp_path / "again.json", "--no-progress").stdout
    assert "stored in the checkpoint by an earlier calibration" in again
    assert json.loads((tmp_path / "again.json").read_text())["total"] == result["total"]

    overridden = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 2,
                     "--calib-images", 4, "--hw", "crossbar_rows=16", "--hw",
                     "cell_energy_pj=[0.1, 0.4, 0.8, 1.6]", "--json", tmp_path / "o.json",
                     "--no-progress")
    hardware = json.loads((tmp_path / "o.json").read_text())["hardware"]
    assert hardware["crossbar_rows"] == 16 and hardware["cell_energy_pj"] == [0.1, 0.4, 0.8, 1.6]
    assert "16-row crossbars" in overridden.stdout

    for args, message in [((tmp_path / "missing.h5",), "checkpoint not found"),
                          ((checkpoint, "--data", "sample", "--adc-bits", "-1"), "adc_bits"),
                          ((checkpoint, "--hw", "bogus=1"), "unknown hardware config keys"),
                          ((checkpoint, "--hw", "adc_bits"), "KEY=VALUE"),
                          ((checkpoint, "--hw", "adc_bits=six"), "not a JSON value")]:
        failed = run(REPO / "scripts/cim_eval.py", *args, check=False)
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert failed.returncode and lines == [lines[-1]] and message in lines[-1], failed.stderr
