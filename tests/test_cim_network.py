"""A whole network on the simulated CIM array (SPEC 6 and 7): the CIM forward against the
fake-quant forward and the integer matmul for every encoding, each layer's exact matmul against
its float matmul, the energy of a run against a direct simulation, the array a checkpoint
stores, its calibration file, and scripts/cim_eval.py end to end."""
import dataclasses
import json
import re

import h5py
import numpy as np
import pytest

from nptwofold.build import checkpoint_hardware, load_model
from nptwofold.checkpoint import load_checkpoint, save_checkpoint
from nptwofold.cim.calibration import CalibrationCache, default_path
from nptwofold.cim.tools import open_checkpoint
from nptwofold.cim.network import CimNetwork
from nptwofold.config import TrainConfig, upgraded
from nptwofold.hardware import HardwareConfig
from nptwofold.errors import NptwofoldError
from nptwofold.cim import mapping
from nptwofold.kernels import cim_bitserial
from nptwofold.kernels.quant import ENCODINGS
from nptwofold.model import ResNet20

from helpers import REPO, run, twofold_of

N_IMAGES = 3
PROBED = "layer2.0.conv1"  # a strided conv in the middle of the network


def assert_same_counts(actual, expected):
    np.testing.assert_array_equal(actual.cell_state_counts, expected.cell_state_counts)
    assert actual[1:] == expected[1:]


def twofold_model(group=1):
    model = ResNet20(np.random.default_rng(0))
    return model, twofold_of(model, 0, sparsity=0.5, mask_group=group)


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
    np.testing.assert_array_equal(y, inputs @ mapping.layer_matrix(layer.kept_levels))
    # the run's energy is the simulation's, event for event, and the counting path's
    simulated_y, simulated = cim_bitserial.cim_matmul(layer.crossbar, inputs, variant.activation_bits)
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
    simulated_y, simulated = cim_bitserial.cim_matmul(layer.crossbar, inputs, 8, adc)
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


def save_twofold(path, encoding="twos_complement", legacy=False, edit=lambda model: None):
    """A fresh twofold checkpoint made for `encoding`, its model changed by `edit` first; with
    `legacy`, in the layout older versions wrote (the array's facts in the twofold config, a
    machine's data path)."""
    model = ResNet20(np.random.default_rng(0))
    method = twofold_of(model, 0, sparsity=0.5, weight_encoding=encoding)
    edit(model)
    config = dataclasses.asdict(TrainConfig(twofold=dataclasses.asdict(method.config),
                                            hardware=dataclasses.asdict(method.hardware)))
    if legacy:
        hardware = config.pop("hardware")
        config["twofold"].update(bits=hardware["weight_bits"], weight_encoding=encoding,
                                 activation_bits=hardware["activation_bits"])
        config["data"] = "/home/someone/cifar-10-binary.tar.gz"
    save_checkpoint(path, model, config=config, extra_groups={"twofold": method.write_h5})
    return model, method


class Args:
    """The command-line values `open_checkpoint` reads, none given."""
    hw_config, hw = None, []
    weight_encoding = weight_bits = activation_bits = adc_bits = adc_range = None


def test_the_array_comes_from_the_checkpoint_and_a_contradicting_flag_is_reported(tmp_path):
    path = tmp_path / "sm.h5"
    save_twofold(path, "sign_magnitude")
    _, method, _, hardware, notes = open_checkpoint(path, Args())
    assert hardware.weight_encoding == method.encoding == "sign_magnitude" and notes == []
    network, _ = CimNetwork.from_checkpoint(path)
    assert network.hardware.weight_encoding == "sign_magnitude"
    given = Args()
    given.weight_encoding, given.adc_bits = "twos_complement", 4
    _, _, _, hardware, notes = open_checkpoint(path, given)
    assert (hardware.weight_encoding, hardware.adc_bits) == ("twos_complement", 4)
    assert notes == ["--weight-encoding twos_complement overrides the checkpoint's "
                     "sign_magnitude", "--adc-bits 4 overrides the checkpoint's 0"]
    given = Args()
    given.weight_bits = 4  # a twofold model's levels cannot be remapped to other bits
    _, method, _, hardware, _ = open_checkpoint(path, given)
    with pytest.raises(NptwofoldError, match="8-bit weights; it cannot be mapped with 4"):
        CimNetwork(method.model, method, hardware)


def test_old_layout_checkpoints_load_with_their_array(tmp_path):
    path = tmp_path / "old.h5"
    _, method = save_twofold(path, "sign_magnitude", legacy=True)
    model, loaded, content = load_model(path)
    assert loaded.encoding == "sign_magnitude" and loaded.bits == 8
    assert content["config"]["data"] == "cifar10"  # a name, never the old machine's path
    assert checkpoint_hardware(content).weight_encoding == "sign_magnitude"
    for name in method.layers:
        np.testing.assert_array_equal(loaded.levels(name), method.levels(name))
    # the committed float baseline, written before the config had a hardware entry
    content = load_checkpoint(REPO / "results/short-seed0/last.h5")
    assert content["config"]["data"] == "cifar10"
    assert checkpoint_hardware(content) == HardwareConfig()
    # an ADC-aware fine-tune's output kept its array in its "adc_finetune" entry
    finetune = upgraded(dict(content["config"], adc_finetune=dict(hardware=dict(
        weight_encoding="sign_magnitude", adc_bits=4))))
    assert TrainConfig.from_dict(finetune).hardware == HardwareConfig(
        weight_encoding="sign_magnitude", adc_bits=4)


def test_calibration_file_is_separate_and_recalibrates_on_a_digest_mismatch(sample, tmp_path):
    path = tmp_path / "twofold.h5"
    save_twofold(path)
    before = path.read_bytes()
    calibration = default_path(path)
    images = sample.train_images[:4]

    def prepared(images, network=None, path=path):
        network = network or CimNetwork.from_checkpoint(path)[0]
        cache = CalibrationCache(calibration, images, log=lambda line: None)
        cache.prepare(network)
        cache.save(network)
        return network, cache.notes

    first, notes = prepared(images)
    assert notes == ["activation clips and ADC ranges calibrated now", f"stored in {calibration}"]
    assert path.read_bytes() == before  # the checkpoint is never written
    second, notes = prepared(images)
    assert notes == [f"read from {calibration}"]
    assert [layer.clip for layer in second.layers.values()] == [
        layer.clip for layer in first.layers.values()]
    for name, layer in second.layers.items():
        np.testing.assert_array_equal(layer.adc_histogram, first.layers[name].adc_histogram)
    _, notes = prepared(sample.train_images[1:5])
    assert notes[0] == f"{calibration} was computed from other calibration images: recalibrated"
    other, _ = CimNetwork.from_checkpoint(path)  # the same model, with one plane cleared
    next(iter(other.layers.values())).module.params["weight_bits"][0] = 0.0
    other = CimNetwork(other.model, other.method, other.hardware)
    _, notes = prepared(sample.train_images[1:5], other)  # the images the file holds now
    assert notes[0] == f"{calibration} was computed from other weights: recalibrated"


def test_a_block_switched_off_calibrates_to_clip_0_and_reads_nothing(sample, tmp_path):
    """Training can zero a block's first conv (the poster's method did at p = 0.7); with a
    negative batch-norm shift its second conv then sees only 0s, and the chip reads nothing
    there: clip 0, stored and read back, and the CIM forward still equals the fake-quant one."""
    def switch_off(model):
        block = getattr(model.layer2, "1")
        block.conv1.params["weight_bits"][...] = 0.0
        block.bn1.params["bias"][...] = -1.0

    path = tmp_path / "switched_off.h5"
    save_twofold(path, edit=switch_off)
    network = CimNetwork.from_checkpoint(path)[0]
    cache = CalibrationCache(default_path(path), sample.train_images[:4], log=lambda line: None)
    cache.prepare(network)
    cache.save(network)
    assert cache.notes[1] == ("the inputs of layer2.1.conv2 were all 0 on the calibration "
                              "images: clip 0, the array reads nothing there")
    assert [name for name, layer in network.layers.items() if layer.clip == 0] == [
        "layer2.1.conv2"]
    trace = {}
    logits = network.cim_logits(sample.test_images[:2], trace)
    np.testing.assert_array_equal(logits, network.fake_quant_logits(sample.test_images[:2]))
    inputs, y = trace["layer2.1.conv2"]
    assert not inputs.any() and not y.any()
    assert not network.ledger.design["layer2.1.conv2"].cell_state_counts.any()
    assert network.ledger.design["layer2.2.conv1"].cell_state_counts.any()
    restored = CimNetwork.from_checkpoint(path)[0]
    cache = CalibrationCache(default_path(path), sample.train_images[:4], log=lambda line: None)
    cache.prepare(restored)
    assert cache.notes == [f"read from {default_path(path)}"]
    assert restored.layers["layer2.1.conv2"].clip == 0.0


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__setitem__("format", "other"), "not an nptwofold calibration file"),
    (lambda f: f["fc"].attrs.__setitem__("activation_clip", float("nan")), "activation_clip"),
    (lambda f: f["fc"].attrs.__setitem__("activation_clip", -1.0), "activation_clip"),
    (lambda f: (f["fc"].__delitem__(KEY), f["fc"].create_dataset(
        KEY, data=np.zeros((8, 385), np.int64))), "has shape (8, 385)"),
    (lambda f: (f["fc"].__delitem__(KEY), f["fc"].create_dataset(
        KEY, data=np.zeros((5, 385), np.float64))), "not int64 counts"),
    (lambda f: (f["fc"].__delitem__(KEY), f["fc"].create_dataset(
        KEY, data=-np.ones((5, 385), np.int64))), "negative counts"),
    (lambda f: f["fc"].__setitem__("adc_histogram.bogus.1x1", np.zeros((1, 4), np.int64)),
     "known encoding"),
])
def test_damaged_calibration_files_are_refused_in_one_line(sample, tmp_path, damage, message):
    path = tmp_path / "twofold.h5"
    save_twofold(path)
    network, _ = CimNetwork.from_checkpoint(path)
    cache = CalibrationCache(default_path(path), sample.train_images[:2], log=lambda line: None)
    cache.prepare(network)
    cache.save(network)
    with h5py.File(default_path(path), "r+") as f:
        damage(f)
    with pytest.raises(NptwofoldError, match=re.escape(message)):
        CalibrationCache(default_path(path), sample.train_images[:2]).prepare(network)


KEY = "adc_histogram.twos_complement.128x128"


def test_cim_eval_script(tmp_path):
    checkpoint = tmp_path / "twofold.h5"
    save_twofold(checkpoint, "sign_magnitude")
    before = checkpoint.read_bytes()
    out = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 2,
              "--calib-images", 3, "--adc-bits", 0, 4, "--weight-encoding", "sign_magnitude",
              "offset_binary", "--adc-range", "calibrated", "--json", tmp_path / "r.json",
              "--csv", tmp_path / "r.csv", "--no-progress").stdout
    assert "fake-quant" in out and "layer3.2.conv2" in out
    assert "calibrating the activation clips and ADC ranges on 3 training images" in out
    assert ("--weight-encoding sign_magnitude offset_binary overrides the checkpoint's "
            "sign_magnitude") in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [(r["encoding"], r["adc_bits"]) for r in result["runs"]] == [
        ("sign_magnitude", 0), ("sign_magnitude", 4), ("offset_binary", 0), ("offset_binary", 4)]
    assert result["runs"][0]["fake_quant_agreement"] == 1.0
    assert f"stored in {default_path(checkpoint)}" in result["calibration"]
    assert checkpoint.read_bytes() == before
    with h5py.File(default_path(checkpoint), "r") as f:
        assert "adc_histogram.sign_magnitude.128x128" in f["fc"]
    # no encoding flag: the checkpoint's sign-magnitude, and the calibration read back
    out = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 2,
              "--calib-images", 3, "--json", tmp_path / "r.json", "--no-progress").stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["encoding"] for r in result["runs"]] == ["sign_magnitude"]
    assert result["hardware_notes"] == [] and "(the checkpoint's)" in out
    assert result["calibration"] == f"read from {default_path(checkpoint)}"

    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("")
    failed = run(REPO / "scripts/cim_eval.py", checkpoint, "--json", not_a_folder / "r.json",
                 check=False)  # refused before any work
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode and lines == [lines[-1]] and "r.json" in lines[-1]

    for args, message in [((tmp_path / "missing.h5",), "checkpoint not found"),
                          ((checkpoint, "--data", "sample", "--adc-bits", "-1"), "--adc-bits"),
                          ((checkpoint, "--hw", "bogus=1"), "unknown hardware config keys"),
                          ((checkpoint, "--hw", "adc_bits=6"), "use --adc-bits"),
                          ((checkpoint, "--hw", "crossbar_rows=six"), "not a JSON value")]:
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
        "--weight-encoding", "sign_magnitude",
        "--calib-images", 2, "--json", out)
    per_column, per_tile = json.loads(out.read_text())["rows"]
    assert per_tile["stored_rows_share"] == per_tile["kept_rows_share"]
    assert per_column["kept_rows_share"] == pytest.approx(0.5, abs=1e-3)
    assert per_column["stored_rows_share"] > 0.95
    assert per_tile["energy_ratio"] > per_column["energy_ratio"]
