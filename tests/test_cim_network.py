"""A whole network on the simulated CIM array (SPEC 6 and 7): the CIM forward against the
fake-quant forward and the integer matmul for every encoding, each layer's exact matmul against
its float matmul, the energy of a run against a direct simulation, the calibration cache, and
scripts/cim_eval.py end to end."""
import dataclasses
import json

import h5py
import numpy as np
import pytest

from nptwofold.checkpoint import save_checkpoint
from nptwofold.cim_network import CimNetwork
from nptwofold.config import TrainConfig
from nptwofold.errors import NptwofoldError
from nptwofold.kernels import cim
from nptwofold.model import ResNet20
from nptwofold.twofold import Twofold, TwofoldConfig

from helpers import REPO, run

N_IMAGES = 3
PROBED = "layer2.0.conv1"  # a strided conv in the middle of the network
ENCODINGS = cim.ENCODINGS


def assert_same_counts(actual, expected):
    np.testing.assert_array_equal(actual.cell_state_counts, expected.cell_state_counts)
    assert actual[1:] == expected[1:]


def twofold_model(group=1):
    model = ResNet20(np.random.default_rng(0))
    return model, Twofold(model, TwofoldConfig(sparsity=0.5, mask_group=group), 0)


@pytest.fixture(scope="module")
def images(sample):
    return sample.test_images[:N_IMAGES]


@pytest.fixture(scope="module")
def network(sample):
    """A fresh twofold ResNet-20 (sparsity 0.5, groups of 4), calibrated on 6 images."""
    network = CimNetwork(*twofold_model(group=4))
    network.calibrate(sample.train_images[:6])
    return network


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_ideal_cim_forward_equals_fake_quant_and_counted_energy(network, images, encoding):
    from nptwofold.hardware import HardwareConfig

    variant = network.with_hardware(HardwareConfig(weight_encoding=encoding))
    trace = {}
    logits = variant.cim_logits(images, trace)
    np.testing.assert_array_equal(logits, variant.fake_quant_logits(images))  # bit for bit
    inputs, y = trace[PROBED]
    layer = variant.layers[PROBED]
    np.testing.assert_array_equal(y, inputs @ cim.layer_matrix(layer.kept_levels))
    # the run's energy is the simulation's, event for event, and the counting path's
    simulated_y, simulated = cim.cim_matmul(layer.crossbar, inputs, variant.activation_bits)
    np.testing.assert_array_equal(simulated_y, y)
    assert_same_counts(variant.ledger.design[PROBED], simulated)
    counted = network.with_hardware(HardwareConfig(weight_encoding=encoding))
    counted.fake_quant_logits(images, count_energy=True)
    assert counted.energy_report() == variant.energy_report()
    # without a trace the exact-ADC convs skip the array kernels: same logits, same events
    untraced = network.with_hardware(HardwareConfig(weight_encoding=encoding))
    np.testing.assert_array_equal(untraced.cim_logits(images), logits)
    assert untraced.energy_report() == variant.energy_report()


def test_each_layers_exact_matmul_is_its_float_matmul(network, images):
    """Same quantized inputs: the float dequantized matmul and the exact integer matmul, scaled,
    agree within float rounding, layer by layer."""
    bits = network.activation_bits
    checked = []

    def compare(module, x):
        layer = network._by_module[id(module)]
        inputs = layer.input_levels(x, bits)
        exact = layer.float_output(inputs @ layer.exact_matrix, x, bits)
        step = x.dtype.type(layer.clip / ((1 << bits) - 1))
        x_quantized = np.rint(np.clip(x, 0, layer.clip) / layer.clip * ((1 << bits) - 1)) * step
        dequantized = network.dequantized_layer(layer, x_quantized.astype(x.dtype))
        np.testing.assert_allclose(dequantized, exact, rtol=1e-4,
                                   atol=1e-5 * np.abs(exact).max())
        checked.append(layer.name)
        return exact

    network._run(images, compare)
    assert checked == list(network.layers)


def test_finite_adc_changes_outputs_and_energy_follows(sample, network, images):
    from nptwofold.hardware import HardwareConfig

    hardware = HardwareConfig(weight_encoding="sign_magnitude", adc_range="calibrated",
                              adc_bits=3)
    coarse = network.with_hardware(hardware)
    with pytest.raises(NptwofoldError, match="ADC ranges"):
        coarse.cim_logits(images)
    coarse.calibrate_adc(sample.train_images[:4])
    trace = {}
    logits = coarse.cim_logits(images, trace)
    assert not np.array_equal(logits, coarse.fake_quant_logits(images))
    inputs, y = trace[PROBED]
    layer = coarse.layers[PROBED]
    adc = hardware.adc_for(layer.crossbar, layer.full_scale(hardware.adc_percentile))
    simulated_y, simulated = cim.cim_matmul(layer.crossbar, inputs, 8, adc)
    np.testing.assert_array_equal(simulated_y, y)
    assert_same_counts(coarse.ledger.design[PROBED], simulated)
    report = coarse.energy_report()["total"]
    assert report["adc_pj"] == pytest.approx(report["adc_conversions"] * 0.208 / 32)


def test_group_of_one_tile_stores_only_the_kept_rows():
    from nptwofold.hardware import HardwareConfig

    hardware = HardwareConfig(weight_encoding="sign_magnitude")
    per_tile = hardware.outputs_per_tile(8)
    grouped = CimNetwork(*twofold_model(group=per_tile), hardware)
    scattered = CimNetwork(*twofold_model(group=1), hardware)
    for name in grouped.layers:
        kept = grouped.layers[name].mask.kept
        assert grouped.layers[name].crossbar.kept_rows_per_tile.max() == kept
        assert scattered.layers[name].crossbar.kept_rows_per_tile.max() > kept


def test_calibration_is_cached_and_read_only_checkpoints_still_evaluate(sample, tmp_path,
                                                                        monkeypatch):
    model, method = twofold_model()
    path = tmp_path / "twofold.h5"
    config = TrainConfig(twofold=dataclasses.asdict(TwofoldConfig(sparsity=0.5)))
    save_checkpoint(path, model, config=dataclasses.asdict(config),
                    extra_groups={"twofold": method.write_h5})
    first, content = CimNetwork.from_checkpoint(path)
    assert first.calibrate_checkpoint(path, content, sample.train_images[:4]) == (True, True)
    second, content = CimNetwork.from_checkpoint(path)
    assert second.calibrate_checkpoint(path, content, sample.train_images[:4]) == (False, False)
    assert [layer.clip for layer in second.layers.values()] == [
        layer.clip for layer in first.layers.values()]
    for name, layer in second.layers.items():
        np.testing.assert_array_equal(layer.adc_histogram, first.layers[name].adc_histogram)

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("nptwofold.cim_network.store_group", read_only)
    third, content = CimNetwork.from_checkpoint(path)
    assert third.calibrate_checkpoint(path, content, sample.train_images[:3]) == (True, False)


def test_cim_eval_script(tmp_path):
    model, method = twofold_model()
    config = TrainConfig(twofold=dataclasses.asdict(TwofoldConfig(sparsity=0.5)))
    checkpoint = tmp_path / "twofold.h5"
    save_checkpoint(checkpoint, model, config=dataclasses.asdict(config),
                    extra_groups={"twofold": method.write_h5})
    out = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 2,
              "--calib-images", 3, "--adc-bits", 0, 4, "--encoding", "sign_magnitude",
              "offset_binary", "--adc-range", "calibrated", "--json", tmp_path / "r.json",
              "--csv", tmp_path / "r.csv", "--no-progress").stdout
    assert "fake-quant" in out and "layer3.2.conv2" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [(r["encoding"], r["adc_bits"]) for r in result["runs"]] == [
        ("sign_magnitude", 0), ("sign_magnitude", 4), ("offset_binary", 0), ("offset_binary", 4)]
    assert result["runs"][0]["fake_quant_agreement"] == 1.0
    assert "stored in the checkpoint" in result["calibration"]
    with h5py.File(checkpoint, "r") as f:
        assert "adc_histogram.sign_magnitude.128x128" in f["cim"]["fc"]

    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    failed = run(REPO / "scripts/cim_eval.py", checkpoint, "--json", not_a_folder / "r.json",
                 check=False)  # refused before any work
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode and lines == [lines[-1]] and "r.json" in lines[-1]

    for args, message in [((tmp_path / "missing.h5",), "checkpoint not found"),
                          ((checkpoint, "--data", "sample", "--adc-bits", "-1"), "adc_bits"),
                          ((checkpoint, "--hw", "bogus=1"), "unknown hardware config keys"),
                          ((checkpoint, "--hw", "adc_bits=six"), "not a JSON value")]:
        failed = run(REPO / "scripts/cim_eval.py", *args, check=False)
        lines = [line for line in failed.stderr.splitlines() if line.strip()]
        assert failed.returncode and lines == [lines[-1]] and message in lines[-1], failed.stderr


def test_mask_group_script_stores_the_union_of_a_tiles_masks(tmp_path):
    """Sign-magnitude tiles hold 16 channels: masks of 16 columns store only the kept rows;
    per-column masks at p = 0.5 store (nearly) every row, saving no crossbar."""
    checkpoint = tmp_path / "float.h5"
    save_checkpoint(checkpoint, ResNet20(np.random.default_rng(1)),
                    config=dataclasses.asdict(TrainConfig(data="sample")))
    out = tmp_path / "groups.json"
    run("scripts/cim_mask_groups.py", checkpoint, "--groups", 1, 16, "--images", 2,
        "--calib-images", 2, "--json", out)
    per_column, per_tile = json.loads(out.read_text())["rows"]
    assert per_tile["stored_rows_share"] == per_tile["kept_rows_share"]
    assert per_column["kept_rows_share"] == pytest.approx(0.5, abs=1e-3)
    assert per_column["stored_rows_share"] > 0.95
    assert per_tile["energy_ratio"] > per_column["energy_ratio"]
