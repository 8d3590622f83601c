"""The device model (`cim.variation`): a chip of the ideal device is today's array bit for bit;
a chip's partial sums have the mean and variance the model predicts; stuck-at rates are
realised; a finite ADC on a varied chip against a row-by-row reference; read noise independent
of the thread count and of the batches; bad device settings refused in one line."""
import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nptwofold.checkpoint import save_checkpoint
from nptwofold.cim import adc as cim_adc, mapping, variation
from nptwofold.cim.network import CimNetwork
from nptwofold.cim.variation import Chip, ChipCrossbar
from nptwofold.config import TrainConfig
from nptwofold.errors import NptwofoldError
from nptwofold.hardware import HardwareConfig
from nptwofold.kernels import cim_bitserial, cim_packed
from nptwofold.kernels.lfsr import lfsr_keep_mask_for_kept, weight_mask
from nptwofold.kernels.quant import ENCODINGS
from nptwofold.model import ResNet20

from helpers import REPO, as_from_a_terminal, assert_one_line_error, run, twofold_of

Z = 5.0  # standard errors allowed between a sample statistic and the model's value


def random_layer(rng, n_rows, n_outputs, bits, kept, group):
    """(R, C) levels and a keep-mask of `kept` rows per group of `group` columns."""
    qmax = 2 ** (bits - 1) - 1
    levels = rng.integers(-qmax, qmax + 1, size=(n_rows, n_outputs))
    mask = lfsr_keep_mask_for_kept(n_rows, n_outputs, kept, seed=3, group=group)
    return levels, weight_mask(mask.mask, (n_outputs, n_rows)).T.astype(bool)


def random_inputs(rng, n_positions, n_rows, activation_bits, density):
    x = rng.integers(0, 2 ** activation_bits, size=(n_positions, n_rows))
    return x * (rng.random(x.shape) < density)


def uniform_adc(crossbar, step, top):
    return cim_adc.AdcSteps(np.full(crossbar.n_columns, float(step)),
                            np.full(crossbar.n_columns, top, np.int64))


def chip_output(crossbar, hardware, x, activation_bits, adc, seed=(0, 0)):
    chip = ChipCrossbar(crossbar, hardware, seed)
    return chip, cim_bitserial.combine(crossbar, chip.codes(x, activation_bits, adc, 0, len(x)),
                                       adc)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("case", [(8, 40, 7, 17, 1, 8, 20, 8), (4, 30, 6, 12, 3, 16, 16, 5),
                                  (8, 300, 4, 280, 1, 128, 20, 6)])
def test_a_chip_of_the_nominal_array_is_the_packed_kernel_bit_for_bit(encoding, case):
    """The analog path with conductances G_off + s (G_off 0 and 0.5: the periphery subtracts
    the off-current) and no spread gives the integer simulation's output exactly."""
    bits, n_rows, n_outputs, kept, group, rows_per_tile, cols, activation_bits = case
    rng = np.random.default_rng(n_rows)
    levels, keep = random_layer(rng, n_rows, n_outputs, bits, kept, group)
    crossbar = mapping.map_layer(levels, bits, rows_per_tile, cols, encoding, keep)
    x = random_inputs(rng, 10, n_rows, activation_bits, 0.6)
    for g_off in (0.0, 0.5):
        hardware = HardwareConfig(cell_conductance=[g_off + s for s in range(4)])
        for adc in (cim_adc.ideal_adc(crossbar), uniform_adc(crossbar, 1, 5),
                    uniform_adc(crossbar, 2, 7), uniform_adc(crossbar, 1.5, 3)):
            expected = cim_packed.cim_matmul_packed(crossbar, x, activation_bits, adc)[0]
            np.testing.assert_array_equal(
                chip_output(crossbar, hardware, x, activation_bits, adc)[1], expected)


def reference_codes(chip, x, activation_bits, adc, g_off):
    """Row by row: Q[p, k] = sum_j 2^j sum_t code(sum of (G - G_off) over the driven stored
    rows of row tile t of column k's tile), code clipped to 0..top."""
    crossbar = chip.crossbar
    codes = np.zeros((len(x), crossbar.n_columns))
    for k in range(crossbar.n_columns):
        stored = np.flatnonzero(crossbar.stored[crossbar.column_tile[k]])
        tiles = [stored[i:i + crossbar.rows_per_tile]
                 for i in range(0, stored.size, crossbar.rows_per_tile)]
        for p in range(len(x)):
            for j in range(activation_bits):
                for rows in tiles:
                    partial_sum = sum(chip.conductance[k, r] - g_off for r in rows
                                      if (x[p, r] >> j) & 1)
                    code = min(max(round(partial_sum / adc.step[k]), 0), adc.top[k])
                    codes[p, k] += code * 2 ** j
    return codes


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_varied_chip_through_a_finite_adc_against_the_row_by_row_reference(encoding):
    rng = np.random.default_rng(5)
    levels, keep = random_layer(rng, 40, 6, 8, 17, 1)
    crossbar = mapping.map_layer(levels, 8, 8, 20, encoding, keep)
    x = random_inputs(rng, 6, 40, 4, 0.6)
    hardware = HardwareConfig(cell_conductance=[0.3, 1.2, 2.1, 3.4],
                              conductance_sigma=[0.3, 0.1, 0.2, 0.05], stuck_low_rate=0.05,
                              stuck_high_rate=0.05)
    adc = uniform_adc(crossbar, 1.5, 6)
    chip = ChipCrossbar(crossbar, hardware, (4, 2))
    found = chip.codes(x, 4, adc, 0, len(x))
    np.testing.assert_array_equal(found, reference_codes(chip, x, 4, adc, 0.3))
    nominal = cim_packed.PackedCrossbar(crossbar)._exact_codes(x, 4)  # the varied chip differs
    assert not np.array_equal(found, np.minimum(nominal, 6))


def model_moments(states, hardware):
    """Per cell of nominal state s: E[G] and E[G^2] under stuck-at faults and the lognormal
    spread (mean 1, E[L^2] = exp(sigma^2))."""
    conductance = np.asarray(hardware.cell_conductance)
    sigma = np.broadcast_to(np.asarray(hardware.conductance_sigma), 4)
    low, high = hardware.stuck_low_rate, hardware.stuck_high_rate
    first = (1 - low - high) * conductance[states] + low * conductance[0] + high * conductance[3]
    second = ((1 - low - high) * (conductance[states] * np.exp(sigma[states] ** 2 / 2)) ** 2
              + low * (conductance[0] * np.exp(sigma[0] ** 2 / 2)) ** 2
              + high * (conductance[3] * np.exp(sigma[3] ** 2 / 2)) ** 2)
    return first, second


def test_partial_sums_have_the_models_mean_and_variance():
    """One driven input bit, one row tile, an ideal ADC: a column's reading over many chips
    (one read each) is sum over driven cells of (G - G_off) + read noise, with mean
    sum (E[G] - G_off) and variance sum (Var G + rho^2 E[G^2]). The bounds are Z standard
    errors of the sample mean and variance at this sample size."""
    rng = np.random.default_rng(8)
    levels, keep = random_layer(rng, 50, 3, 8, 50, 1)
    crossbar = mapping.map_layer(levels, 8, 64, 128, "sign_magnitude", keep)
    x = (rng.random((1, 50)) < 0.5).astype(np.int64)
    hardware = HardwareConfig(cell_conductance=[0.2, 1.1, 2.3, 3.2],
                              conductance_sigma=[0.4, 0.1, 0.15, 0.2], read_noise=0.3,
                              stuck_low_rate=0.02, stuck_high_rate=0.03)
    n_chips = 3000
    adc = cim_adc.ideal_adc(crossbar)
    readings = np.array([ChipCrossbar(crossbar, hardware, (chip, 0)).codes(x, 1, adc, 0, 1)[0]
                         for chip in range(n_chips)])  # (chips, K)
    first, second = model_moments(crossbar.cells, hardware)
    driven = x[0].astype(bool)
    mean = (first - hardware.cell_conductance[0])[:, driven].sum(axis=1)
    chip_variance = (second - first ** 2)[:, driven].sum(axis=1)
    variance = chip_variance + hardware.read_noise ** 2 * second[:, driven].sum(axis=1)
    sample_mean, sample_variance = readings.mean(axis=0), readings.var(axis=0, ddof=1)
    assert np.all(np.abs(sample_mean - mean) <= Z * np.sqrt(variance / n_chips))
    fourth = ((readings - sample_mean) ** 4).mean(axis=0)
    bound = Z * np.sqrt((fourth - sample_variance ** 2) / n_chips)
    assert np.all(np.abs(sample_variance - variance) <= bound)
    # the bound is tight enough to see the read noise: without it the variance is off
    assert np.any(np.abs(sample_variance - chip_variance) > bound)


def read_weights(chip, g_off):
    """(C, R) the weights a chip's column reads hold, loop by loop: per output channel and row,
    sum over its columns (and its tile's reference column) of coefficient x (G - G_off)."""
    crossbar = chip.crossbar
    weights = np.zeros((crossbar.n_outputs, crossbar.n_rows))
    for output in range(crossbar.n_outputs):
        tile = output // crossbar.outputs_per_tile
        for column in range(crossbar.n_columns):
            if crossbar.output_of[column] == output or (
                    crossbar.output_of[column] == -1 and crossbar.column_tile[column] == tile):
                for row in range(crossbar.n_rows):
                    if crossbar.stored[tile, row]:
                        weights[output, row] += crossbar.coefficient[column] * (
                            chip.conductance[column, row] - g_off)
    return weights


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("hardware", [
    HardwareConfig(cell_conductance=[0.05, 1.1, 2.3, 3.2], conductance_sigma=[0.4, 0.1, 0.15, 0.2],
                   stuck_low_rate=0.02, stuck_high_rate=0.03),
    HardwareConfig(cell_conductance=[0.05, 1.4, 2.1, 3.05]),  # a systematic error only
    HardwareConfig(stuck_high_rate=0.3)], ids=["spread", "levels", "stuck"])
def test_the_expected_weight_error_is_what_the_chips_read(encoding, hardware):
    """relative_weight_error^2 x sum q^2 is the mean over chips of the summed squared error of
    the weights they read, within Z standard errors of that mean."""
    rng = np.random.default_rng(11)
    levels, keep = random_layer(rng, 24, 5, 8, 14, 2)
    crossbar = mapping.map_layer(levels, 8, 10, 11, encoding, keep)
    stored = (levels * keep).T
    g_off = hardware.cell_conductance[0]
    errors = np.array([((read_weights(ChipCrossbar(crossbar, hardware, (chip, 0)), g_off)
                         - stored) ** 2).sum() for chip in range(600)])
    expected = variation.relative_weight_error([crossbar], hardware) ** 2 * (stored ** 2).sum()
    assert abs(errors.mean() - expected) <= max(Z * errors.std(ddof=1) / np.sqrt(errors.size),
                                                1e-9 * expected)
    assert variation.relative_weight_error([crossbar], HardwareConfig()) == 0
    np.testing.assert_array_equal(
        read_weights(ChipCrossbar(crossbar, HardwareConfig(), (0, 0)), 0.0), stored)


def test_stuck_at_rates_are_realised_within_binomial_bounds():
    rng = np.random.default_rng(2)
    # magnitude cells 01 and 10 only (85 = 01010101, 102 = 01100110), idle columns 00
    levels = rng.choice([-85, 85, -102, 102], size=(400, 60))
    crossbar = mapping.map_layer(levels, 8, 128, 128, "sign_magnitude")
    low, high = 0.01, 0.03
    chip = ChipCrossbar(crossbar, HardwareConfig(stuck_low_rate=low, stuck_high_rate=high),
                        (1, 0))
    middle = (crossbar.cells == 1) | (crossbar.cells == 2)
    off = crossbar.cells == 0  # the idle columns' cells: stuck high shows, stuck low does not
    for cells, state, rate in ((middle, 0, low), (middle, 3, high), (off, 3, high)):
        realised = (chip.states[cells] == state).mean()
        assert abs(realised - rate) <= Z * np.sqrt(rate * (1 - rate) / cells.sum())
    unchanged = chip.states[middle] == crossbar.cells[middle]
    assert abs(unchanged.mean() - (1 - low - high)) <= Z * np.sqrt(
        (low + high) * (1 - low - high) / middle.sum())


def test_read_noise_depends_neither_on_threads_nor_on_batches(monkeypatch):
    rng = np.random.default_rng(4)
    levels, keep = random_layer(rng, 150, 20, 8, 150, 1)
    crossbar = mapping.map_layer(levels, 8, 64, 128, "sign_magnitude", keep)
    n_images, per_image = 20, 9
    x = random_inputs(rng, n_images * per_image, 150, 8, 0.5)
    hardware = HardwareConfig(conductance_sigma=[0.1], read_noise=0.05,
                              cell_conductance=[0.1, 1.1, 2.1, 3.1])
    chip = ChipCrossbar(crossbar, hardware, (3, 1))
    for adc in (cim_adc.ideal_adc(crossbar), uniform_adc(crossbar, 4.0, 31)):
        results = []
        for threads in (1, 3):
            monkeypatch.setenv("NPTWOFOLD_THREADS", str(threads))
            results.append(chip.codes(x, 8, adc, 0, n_images))
        split = 11  # two batches, the second starting at image 11 of the run
        results.append(np.concatenate([
            chip.codes(x[:split * per_image], 8, adc, 0, split),
            chip.codes(x[split * per_image:], 8, adc, split, n_images - split)]))
        for found in results[1:]:
            np.testing.assert_array_equal(found, results[0])
        assert not np.array_equal(chip.codes(x, 8, adc, 1, n_images), results[0])  # noise


@pytest.fixture(scope="module")
def network(sample):
    model = ResNet20(np.random.default_rng(0))
    network = CimNetwork(model, twofold_of(model, 0, sparsity=0.5, mask_group=4))
    network.calibrate(sample.train_images[:4])
    return network


def test_a_network_with_the_default_device_is_todays_array_bit_for_bit(network, sample):
    images = sample.test_images[:2]
    variant = network.with_hardware(HardwareConfig(adc_bits=5))
    expected = variant.cim_logits(images)
    variant.draw_chip(7)  # the ideal device: every chip is the nominal array
    assert variant.chip is None
    np.testing.assert_array_equal(variant.cim_logits(images), expected)
    # the analog path on a chip of the ideal device gives the same logits
    variant.chip = Chip({name: layer.crossbar for name, layer in variant.layers.items()},
                        variant.hardware, 7)
    np.testing.assert_array_equal(variant.cim_logits(images), expected)
    varied = network.with_hardware(HardwareConfig(adc_bits=5,
                                                  conductance_sigma=[0.3]))
    varied.draw_chip(7)
    varied_logits = varied.cim_logits(images)
    assert not np.array_equal(varied_logits, expected)
    again = network.with_hardware(varied.hardware)
    again.draw_chip(7)  # one seed, one chip
    np.testing.assert_array_equal(again.cim_logits(images), varied_logits)


@pytest.mark.parametrize("overrides, message", [
    (dict(conductance_sigma=[-0.1]), "conductance_sigma must be >= 0"),
    (dict(conductance_sigma=[0.1, 0.2]), "needs 1 sigma"),
    (dict(read_noise=-0.01), "read_noise must be >= 0"),
    (dict(stuck_low_rate=1.5), "stuck_low_rate must be in [0, 1]"),
    (dict(stuck_high_rate=-0.1), "stuck_high_rate must be in [0, 1]"),
    (dict(stuck_low_rate=0.6, stuck_high_rate=0.5), "stuck_low_rate + stuck_high_rate"),
    (dict(cell_conductance=[0, 1, 1, 3]), "must increase"),
    (dict(cell_conductance=[0, 1, 2]), "needs 4 conductances"),
    (dict(cell_conductance=[-0.1, 1, 2, 3]), "cell_conductance must be >= 0"),
])
def test_bad_device_settings_raise(overrides, message):
    with pytest.raises(NptwofoldError, match=message.replace("[", r"\[").replace("+", r"\+")):
        HardwareConfig.from_json(json.loads(json.dumps(overrides)))


def test_cim_eval_runs_several_chips_and_refuses_bad_devices(tmp_path):
    checkpoint = tmp_path / "float.h5"
    save_checkpoint(checkpoint, ResNet20(np.random.default_rng(1)),
                    config=dataclasses.asdict(TrainConfig(data="sample")))
    out = run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 3,
              "--calib-images", 3, "--chips", 3, "--hw", "conductance_sigma=[0.3]",
              "--json", tmp_path / "r.json", "--no-progress").stdout
    result = json.loads((tmp_path / "r.json").read_text())
    (only,) = result["runs"]
    assert len(only["chip_accuracies"]) == len(only["chip_seconds"]) == 3
    assert only["accuracy"] == pytest.approx(np.mean(only["chip_accuracies"]))
    assert only["accuracy_worst"] == min(only["chip_accuracies"])
    assert "3 chips per run" in out and "device: sigma 30 %" in out
    for args, message in ((("--hw", "conductance_sigma=[-0.1]"), "conductance_sigma must be >= 0"),
                          (("--chips", "2"), "the device model is ideal")):
        assert_one_line_error(run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample",
                                  *args, check=False), message)


def test_robustness_script_writes_a_point_per_knob_and_value(tmp_path):
    checkpoint = tmp_path / "float.h5"
    save_checkpoint(checkpoint, ResNet20(np.random.default_rng(1)),
                    config=dataclasses.asdict(TrainConfig(data="sample")))
    out = tmp_path / "study"
    run(REPO / "scripts/robustness.py", checkpoint, "--data", "sample", "--images", 3,
        "--calib-images", 3, "--chips", 2, "--sigmas", 0, 0.2, "--stuck-rates", 0, 0.05,
        "--weight-encoding", "twos_complement", "sign_magnitude", "--adc-bits", 5,
        "--encoding-adc", "twos_complement=8", "--out", out, "--no-progress")
    rows = json.loads((out / "robustness.json").read_text())
    assert [(row["encoding"], row["adc_bits"], row["knob"], row["value"], row["chips"])
            for row in rows] == [
        (encoding, bits, knob, value, 2 if value else 1)
        for encoding, bits in (("twos_complement", 8), ("sign_magnitude", 5))
        for knob, values in (("sigma", (0, 0.2)), ("stuck", (0, 0.05))) for value in values]
    for row in rows:
        assert row["images"] == 3 and row["accuracy_worst"] <= row["accuracy_mean"]
        assert (row["weight_error"] > 0) == (row["value"] > 0)
    assert (out / "robustness.csv").read_text().count("\n") == len(rows) + 1
    for flag, values, message in (("--sigmas", ("-0.1",), "conductance_sigma must be >= 0"),
                                  ("--stuck-rates", ("1.5",), "stuck_low_rate + "
                                                              "stuck_high_rate must be <= 1"),
                                  ("--encoding-adc", ("sign_magnitude=x",), "ENCODING=BITS")):
        failed = run(REPO / "scripts/robustness.py", checkpoint, "--data", "sample", flag,
                     *values, "--out", out, check=False)
        assert_one_line_error(failed, message)


def test_ctrl_c_during_a_point_keeps_the_points_before_it_and_says_so(tmp_path):
    checkpoint = tmp_path / "float.h5"
    save_checkpoint(checkpoint, ResNet20(np.random.default_rng(3)),
                    config=dataclasses.asdict(TrainConfig(data="sample")))
    out = tmp_path / "study"
    argv = [REPO / "scripts/robustness.py", checkpoint, "--data", "sample", "--images",
            "100", "--calib-images", "3", "--chips", "20", "--sigmas", "0", "0.1",
            "--stuck-rates", "0", "--adc-bits", "5", "--out", out, "--no-progress"]
    study = subprocess.Popen(as_from_a_terminal(argv), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "robustness.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    first = json.loads((out / "robustness.json").read_text())  # sigma 0, written atomically
    study.send_signal(signal.SIGINT)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 130, stderr
    assert stderr.strip() == ("interrupted: the points measured so far are in robustness.json "
                              "under --out; the same command continues the study")
    assert [row["value"] for row in first] == [0]
    assert json.loads((out / "robustness.json").read_text()) == first


def test_a_robustness_study_resumes_and_refuses_other_settings(tmp_path):
    checkpoint = tmp_path / "float.h5"
    save_checkpoint(checkpoint, ResNet20(np.random.default_rng(2)),
                    config=dataclasses.asdict(TrainConfig(data="sample")))
    out = tmp_path / "study"
    study = (REPO / "scripts/robustness.py", checkpoint, "--data", "sample", "--images", 3,
             "--calib-images", 3, "--chips", 2, "--sigmas", 0, 0.3, "--stuck-rates", 0, 0.05,
             "--adc-bits", 5, "--out", out, "--no-progress")
    run(*study)
    full = json.loads((out / "robustness.json").read_text())
    # a study stopped after its first two points: the rest is run, the two are kept
    (out / "robustness.json").write_text(json.dumps(full[:2]))
    resumed = run(*study).stdout
    assert resumed.count("(earlier run)") == 2
    again = json.loads((out / "robustness.json").read_text())
    assert again[:2] == full[:2] and len(again) == len(full)

    def without_time(row):
        return {key: value for key, value in row.items() if key != "seconds_per_chip"}
    assert list(map(without_time, again)) == list(map(without_time, full))
    assert run(*study).stdout.count("(earlier run)") == len(full)
    # a study written before the weight error was kept gets it, the same as a new one's
    (out / "robustness.json").write_text(json.dumps(
        [{key: value for key, value in row.items() if key != "weight_error"} for row in again]))
    assert run(*study).stdout.count("(earlier run)") == len(full)
    assert json.loads((out / "robustness.json").read_text()) == again
    other = run(*study[:5], 4, *study[6:], check=False)  # --images 4
    assert_one_line_error(other, "float.h5, twos_complement, sigma 0 with other settings")
    (out / "robustness.json").write_text("{}")
    assert_one_line_error(run(*study, check=False), "is not a robustness study")
