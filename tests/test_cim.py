"""CIM array simulation, energy event counting and hardware config against SPEC 5 to 7.

References are slow plain Python written from the SPEC and from the mapping, encodings and ADC
model documented in nptwofold.cim (device, mapping, adc), not from the kernels.
"""
import json

import numba
import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.cim.ledger import layer_energy_report
from nptwofold.hardware import HardwareConfig
from nptwofold.cim import adc as cim_adc, device, mapping
from nptwofold.kernels import cim_bitserial, cim_events, cim_packed
from nptwofold.kernels.quant import ENCODINGS
from nptwofold.kernels.lfsr import lfsr_keep_mask_for_kept, weight_mask



def reference_columns(level, bits, encoding):
    """[(states of one column on this weight's row, coefficient)] of a weight, by the docs."""
    cells = bits // 2

    def states(code):
        return [(code >> (2 * m)) & 3 for m in range(cells)]

    if encoding == "twos_complement":
        code = states(level % 2**bits)
        return [(code[m], 4**m) for m in range(cells)] + [(int(level < 0), -2**bits)]
    if encoding == "offset_binary":
        code = states(level + 2 ** (bits - 1))
        return [(code[m], 4**m) for m in range(cells)]
    positive, negative = states(max(level, 0)), states(max(-level, 0))
    return ([(positive[m], 4**m) for m in range(cells)]
            + [(negative[m], -4**m) for m in range(cells)])


def reference_adc(partial_sum, step, top):
    code = min(round(partial_sum / step), top)  # Python's round: ties to even
    return code * step


def reference_simulation(levels, keep, bits, encoding, rows_per_tile, cols, x, activation_bits,
                         adc=None, skip_zero_tiles=False):
    """Word line by word line on the physical mapping: (y, cells per state, conversions).
    adc: (step, top) applied to every column, or None for ideal."""
    n_rows, n_outputs = levels.shape
    per_output = len(reference_columns(0, bits, encoding))
    shared = 1 if encoding == "offset_binary" else 0
    per_tile = (cols - shared) // per_output
    y = np.zeros((len(x), n_outputs))
    state_counts, conversions = [0, 0, 0, 0], 0
    for first in range(0, n_outputs, per_tile):
        outputs = list(range(first, min(first + per_tile, n_outputs)))
        stored = [r for r in range(n_rows) if any(keep[r, c] for c in outputs)]
        row_tiles = [stored[i:i + rows_per_tile] for i in range(0, len(stored), rows_per_tile)]
        # every column of the tile: (output or None, coefficient, state per row)
        columns = []
        for c in outputs:
            per_row = {r: reference_columns(int(levels[r, c]) if keep[r, c] else 0, bits,
                                            encoding) for r in stored}
            for k in range(per_output):
                columns.append(([c], per_row[stored[0]][k][1] if stored else 0,
                                 {r: per_row[r][k][0] for r in stored}))
        if shared:
            columns.append((outputs, -4 ** (bits // 2 - 1), {r: 2 for r in stored}))
        for p, inputs in enumerate(x.tolist()):
            for j in range(activation_bits):
                for targets, coefficient, states in columns:
                    for tile in row_tiles:
                        driven = [r for r in tile if inputs[r] >> j & 1]
                        if driven or not skip_zero_tiles:
                            conversions += 1
                        for r in driven:
                            state_counts[states[r]] += 1
                        partial_sum = sum(states[r] for r in driven)
                        reading = partial_sum if adc is None else reference_adc(partial_sum, *adc)
                        for c in targets:
                            y[p, c] += coefficient * reading * 2**j
    return y, state_counts, conversions


def reference_histograms(levels, keep, bits, encoding, rows_per_tile, cols, x,
                         activation_bits):
    """(ADC channels, 3T + 1) counts of every partial sum converted (the calibration
    histograms), one conversion at a time from the mapped cells."""
    crossbar = mapping.map_layer(levels, bits, rows_per_tile, cols, encoding, keep)
    histograms = np.zeros((len(device.adc_channels(encoding, bits)),
                           3 * rows_per_tile + 1), np.int64)
    row_tile = crossbar.row_tile
    for k in range(crossbar.n_columns):
        tile = crossbar.column_tile[k]
        for inputs in x.tolist():
            for j in range(activation_bits):
                for t in range(crossbar.n_row_tiles[tile]):
                    partial_sum = sum(int(crossbar.cells[k, r]) for r in range(len(inputs))
                                      if row_tile[tile, r] == t and inputs[r] >> j & 1)
                    histograms[crossbar.channel[k], partial_sum] += 1
    return histograms


def random_layer(rng, n_rows, n_cols, bits, kept, group):
    """Levels over the b-bit range and an LFSR keep mask (matrix (R, C) bool)."""
    qmax = 2 ** (bits - 1) - 1
    levels = rng.integers(-qmax, qmax + 1, (n_rows, n_cols))
    mask = lfsr_keep_mask_for_kept(n_rows, n_cols, kept, 5, group)
    return levels, mask.mask.astype(bool)


def random_inputs(rng, n_positions, n_rows, activation_bits, density=1.0):
    x = rng.integers(0, 2**activation_bits, (n_positions, n_rows))
    return x * (rng.random(x.shape) < density)


def uniform_adc(crossbar, step, top):
    return cim_adc.AdcSteps(np.full(crossbar.n_columns, float(step)),
                        np.full(crossbar.n_columns, top))


# (bits, rows, outputs, kept rows, group, rows per tile, crossbar columns, input bits)
CASES = [
    (8, 40, 7, 17, 1, 8, 20, 8),    # several column and row tiles, per-column masks
    (4, 30, 6, 12, 3, 16, 16, 5),   # grouped masks
    (2, 25, 5, 25, 1, 7, 12, 3),    # dense
    (8, 300, 4, 280, 1, 256, 20, 6),  # row tiles of 2 to 5 words of 64 rows
]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("case", CASES)
def test_simulation_packed_and_counting_agree_with_the_reference(encoding, case):
    bits, n_rows, n_outputs, kept, group, rows_per_tile, cols, activation_bits = case
    rng = np.random.default_rng(n_rows)
    levels, keep = random_layer(rng, n_rows, n_outputs, bits, kept, group)
    crossbar = mapping.map_layer(levels, bits, rows_per_tile, cols, encoding, keep, lfsr_steps=7)
    x = random_inputs(rng, 3, n_rows, activation_bits, 0.6)
    for adc in (None, (1.0, 5), (2.0, 7), (1.5, 3)):
        for skip_zero_tiles in (False, True):
            expected = reference_simulation(levels, keep, bits, encoding, rows_per_tile, cols, x,
                                            activation_bits, adc, skip_zero_tiles)
            steps = None if adc is None else uniform_adc(crossbar, *adc)
            y, counts = cim_bitserial.cim_matmul(crossbar, x, activation_bits, steps, skip_zero_tiles)
            np.testing.assert_allclose(y, expected[0], rtol=1e-12)
            assert counts.cell_state_counts.tolist() == expected[1]
            assert counts.adc_conversions == expected[2] and counts.lfsr_steps == 7 * len(x)
            packed = cim_packed.cim_matmul_packed(crossbar, x, activation_bits, steps, skip_zero_tiles)
            np.testing.assert_array_equal(packed[0], y)  # bit for bit
            np.testing.assert_array_equal(  # every partial sum, counted by channel
                cim_packed.PackedCrossbar(crossbar).partial_sum_histograms(x, activation_bits),
                reference_histograms(levels, keep, bits, encoding, rows_per_tile, cols, x,
                                     activation_bits))
            counted = cim_events.count_events(crossbar, x, activation_bits, skip_zero_tiles)
            found_counts = [packed[1], counted]
            if not skip_zero_tiles:  # from the 1-bits per row alone
                row_ones = sum((x >> j) & 1 for j in range(activation_bits)).sum(axis=0)
                found_counts.append(cim_events.count_events_of_row_ones(crossbar, row_ones, len(x),
                                                                 activation_bits))
            for found in found_counts:
                np.testing.assert_array_equal(found.cell_state_counts, counts.cell_state_counts)
                assert found[1:] == counts[1:]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_steps_of_one_clip_only_where_the_driven_rows_reach_the_top(encoding):
    """An ADC of steps of 1 whose top code some sums exceed (the packed path: exact sums less
    the clipped excess) against the row-by-row reference: sparse inputs whose crossbars cannot
    reach the top (skipped), dense ones whose sums clip."""
    rng = np.random.default_rng(11)
    levels, keep = random_layer(rng, 300, 9, 8, 280, 1)
    crossbar = mapping.map_layer(levels, 8, 128, 40, encoding, keep)
    x = np.concatenate([random_inputs(rng, 20, 300, 8, density) for density in (0.05, 0.45, 0.9)])
    adc = uniform_adc(crossbar, 1.0, 40)
    expected = cim_bitserial.cim_matmul(crossbar, x, 8, adc)[0]
    assert not np.array_equal(expected[20:], cim_bitserial.cim_matmul(crossbar, x[20:], 8)[0])  # clipped
    np.testing.assert_array_equal(cim_packed.cim_matmul_packed(crossbar, x, 8, adc)[0], expected)


@pytest.mark.parametrize("n_rows, activation_bits", [(1, 1), (63, 3), (64, 8), (130, 8),
                                                     (577, 5), (65, 16)])
def test_input_bit_packing_against_a_bit_by_bit_loop(n_rows, activation_bits):
    rng = np.random.default_rng(n_rows)
    x = rng.integers(0, 1 << activation_bits, (70, n_rows)) * (rng.random((70, n_rows)) < 0.6)
    n_words = -(-n_rows // 64)
    expected = np.zeros((70, activation_bits, n_words), np.uint64)
    for p in range(70):
        for r in range(n_rows):
            for j in range(activation_bits):
                if (int(x[p, r]) >> j) & 1:
                    expected[p, j, r // 64] |= np.uint64(1 << (r % 64))
    for inputs in (x, x.astype(np.float32)):
        np.testing.assert_array_equal(cim_packed._pack_input_bits(inputs, activation_bits, n_words),
                                      expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_an_adc_reading_every_reachable_sum_exactly_is_ideal(encoding):
    """Top code at each column's largest reachable partial sum: the packed kernel may merge the
    crossbars (exact); one code less and the all-ones input is clipped on some column."""
    rng = np.random.default_rng(3)
    levels, keep = random_layer(rng, 40, 7, 8, 17, 1)
    crossbar = mapping.map_layer(levels, 8, 8, 20, encoding, keep)
    largest = crossbar.largest_partial_sums
    x = np.ones((1, 40), np.int64)
    exact, _ = cim_bitserial.cim_matmul(crossbar, x, 1)
    reading_all = cim_adc.AdcSteps(np.ones(crossbar.n_columns), largest)
    assert reading_all.is_ideal(crossbar, largest)
    np.testing.assert_array_equal(cim_packed.cim_matmul_packed(crossbar, x, 1, reading_all)[0], exact)
    clipping = cim_adc.AdcSteps(np.ones(crossbar.n_columns), largest - (largest == largest.max()))
    assert not clipping.is_ideal(crossbar, largest)
    clipped = cim_packed.cim_matmul_packed(crossbar, x, 1, clipping)[0]
    np.testing.assert_array_equal(clipped, cim_bitserial.cim_matmul(crossbar, x, 1, clipping)[0])
    assert not np.array_equal(clipped, exact)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("bits", [2, 8, 16])
def test_ideal_adc_equals_integer_matmul(encoding, bits):
    rng = np.random.default_rng(bits)
    levels, keep = random_layer(rng, 150, 9, bits, 70, 2)
    crossbar = mapping.map_layer(levels, bits, 64, 128, encoding, keep)
    x = random_inputs(rng, 11, 150, 8, 0.7)
    y, _ = cim_packed.cim_matmul_packed(crossbar, x, 8)
    np.testing.assert_array_equal(y, x @ (levels * keep))
    np.testing.assert_array_equal(y, cim_bitserial.cim_matmul(crossbar, x, 8)[0])


def test_union_mapping_stores_every_row_a_tile_needs():
    levels, keep = random_layer(np.random.default_rng(0), 64, 8, 8, 32, 1)
    crossbar = mapping.map_layer(levels, 8, 128, 20, "twos_complement", keep)  # 4 outputs per tile
    for tile in range(2):
        union = keep[:, 4 * tile:4 * tile + 4].any(axis=1)
        np.testing.assert_array_equal(crossbar.stored[tile], union)
    assert crossbar.kept_rows_per_tile.tolist() == [int(keep[:, :4].any(1).sum()),
                                                    int(keep[:, 4:].any(1).sum())]
    grouped = lfsr_keep_mask_for_kept(64, 8, 32, 5, 4).mask.astype(bool)
    assert mapping.map_layer(levels, 8, 128, 20, "twos_complement",
                         grouped).kept_rows_per_tile.tolist() == [32, 32]


def test_matrix_rows_follow_the_conv_matrix():
    weight = np.arange(2 * 3 * 3 * 3).reshape(2, 3, 3, 3)
    matrix = mapping.layer_matrix(weight)
    pytorch = weight.reshape(2, -1).T  # rows (ci, ky, kx), the LFSR order
    rows = mapping.matrix_rows(np.arange(27), weight.shape)
    np.testing.assert_array_equal(matrix[rows], pytorch)
    mask = np.zeros((27, 2), np.uint8)
    mask[[4, 20], 0] = 1
    weight_mask_rows = np.nonzero(layer_matrix_of_mask(mask, weight.shape)[:, 0])[0]
    assert sorted(weight_mask_rows) == sorted(mapping.matrix_rows([4, 20], weight.shape))


def layer_matrix_of_mask(mask, shape):
    return mapping.layer_matrix(weight_mask(mask, shape))


def test_full_scale_at_percentile():
    histogram = np.array([[5, 0, 3, 2], [0, 0, 0, 10], [0, 0, 0, 0]])
    assert cim_adc.full_scale_at_percentile(histogram, 50).tolist() == [1, 3, 1]  # at least 1
    assert cim_adc.full_scale_at_percentile(histogram, 80).tolist() == [2, 3, 1]
    assert cim_adc.full_scale_at_percentile(histogram, 100).tolist() == [3, 3, 1]
    crossbar = mapping.map_layer(np.ones((4, 1), np.int64), 4, 4, 8, "sign_magnitude")
    adc = cim_adc.calibrated_adc(crossbar, 2, [30.0, 1.0, 6.0, 1.0])
    # 4 ADC channels: positive0, positive1, negative0, negative1; top code 3
    assert adc.step.tolist() == [10.0, 1.0, 2.0, 1.0] and adc.top.tolist() == [3] * 4
    assert not adc.is_ideal(crossbar) and cim_adc.ideal_adc(crossbar).is_ideal(crossbar)


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(3)
    levels, keep = random_layer(rng, 300, 20, 8, 150, 1)
    crossbar = mapping.map_layer(levels, 8, 64, 128, "sign_magnitude", keep)
    x = random_inputs(rng, 700, 300, 8, 0.5)
    adc = uniform_adc(crossbar, 3.0, 15)
    threads = numba.get_num_threads()
    try:
        results = []
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            y, events = cim_packed.cim_matmul_packed(crossbar, x, 8, adc, True)
            histogram = cim_packed.PackedCrossbar(crossbar).partial_sum_histograms(x, 8)
            results.append((y, events.cell_state_counts, events.adc_conversions, histogram))
    finally:
        numba.set_num_threads(threads)
    for found in results[1:]:
        for a, b in zip(found, results[0]):
            np.testing.assert_array_equal(a, b)


def test_bad_layers_and_inputs_raise():
    levels = np.zeros((4, 2), np.int64)
    with pytest.raises(NptwofoldError, match="keep mask"):
        mapping.map_layer(levels, 4, 2, 16, keep=np.ones((4, 3), bool))
    with pytest.raises(NptwofoldError, match="-7..7"):
        mapping.map_layer(np.full((4, 2), 8), 4, 2, 16)
    with pytest.raises(NptwofoldError, match="unknown weight encoding"):
        mapping.map_layer(levels, 4, 2, 16, "gray")
    layer = mapping.map_layer(levels, 4, 2, 16)
    with pytest.raises(NptwofoldError, match="unsigned 3-bit"):
        cim_bitserial.cim_matmul(layer, np.array([[0, 8, 0, 0]]), 3)
    with pytest.raises(NptwofoldError, match="rows"):
        cim_events.count_events(layer, np.zeros((1, 3), np.int64), 3)
    with pytest.raises(NptwofoldError, match="adc_bits must be in 0..30"):
        cim_adc.fixed_adc(layer, -1)
    with pytest.raises(NptwofoldError, match="ADC channels"):
        cim_adc.calibrated_adc(layer, 4, [1.0])


@pytest.mark.parametrize("overrides, message", [
    (dict(cell_bits=3), "odd"),
    (dict(cell_bits=4), "only 2-bit"),
    (dict(cell_bits=2.0), "must be an int"),
    (dict(cell_energy_pj=(0.0, 0.36, 0.73, 1.49)), "cell_energy_pj must be > 0"),
    (dict(cell_energy_pj=(0.079, -0.36, 0.73, 1.49)), "cell_energy_pj must be > 0"),
    (dict(cell_energy_pj=(0.079, 0.36, 0.73)), "4 energies"),
    (dict(adc_energy_pj=0), "adc_energy_pj must be > 0"),
    (dict(adc_energy_pj=float("nan")), "adc_energy_pj must be a finite number"),
    (dict(lfsr_step_energy_pj=-0.02), "lfsr_step_energy_pj must be > 0"),
    (dict(crossbar_rows=0), "crossbar_rows"),
    (dict(crossbar_cols=-1), "crossbar_cols"),
    (dict(crossbar_rows=128.0), "must be an int"),
    (dict(adc_bits=-1), "--adc-bits"),
    (dict(adc_bits=31), "--adc-bits"),
    (dict(activation_bits=17), "--activation-bits"),
    (dict(weight_bits=7), "odd"),
    (dict(skip_zero_tiles="yes"), "skip_zero_tiles"),
    (dict(weight_encoding="ones_complement"), "--weight-encoding"),
    (dict(adc_range="auto"), "--adc-range"),
    (dict(adc_percentile=0), "adc_percentile"),
    (dict(adc_energy_per_bit=0), "adc_energy_per_bit must be > 0"),
    (dict(adc_reference_bits=0), "adc_reference_bits"),
])
def test_bad_hardware_configs_raise(overrides, message):
    with pytest.raises(NptwofoldError, match=message):
        HardwareConfig(**overrides)
    with pytest.raises(NptwofoldError, match=message):
        HardwareConfig.from_json(json.loads(json.dumps(overrides)))


def test_outputs_per_tile_and_crossbar_smaller_than_one_weight():
    # 8-bit weights, 2-bit cells, 128 columns: 4 cells per magnitude
    assert HardwareConfig(weight_encoding="offset_binary").outputs_per_tile(8) == 31  # + reference
    assert HardwareConfig(weight_encoding="twos_complement").outputs_per_tile(8) == 25  # + sign
    assert HardwareConfig(weight_encoding="sign_magnitude").outputs_per_tile(8) == 16
    with pytest.raises(NptwofoldError, match="needs 5 columns"):
        HardwareConfig(crossbar_cols=4).outputs_per_tile(8)
    with pytest.raises(NptwofoldError, match="odd"):
        HardwareConfig().outputs_per_tile(5)


def test_adc_energy_doubles_per_bit_from_the_reference():
    reference = HardwareConfig(adc_bits=8).adc_conversion_energy_pj
    assert reference == 0.208 == HardwareConfig().adc_conversion_energy_pj  # ideal: reference
    assert HardwareConfig(adc_bits=5).adc_conversion_energy_pj == pytest.approx(0.208 / 8)
    assert HardwareConfig(adc_bits=4, adc_energy_per_bit=3.0, adc_reference_bits=6
                          ).adc_conversion_energy_pj == pytest.approx(0.208 / 9)
    counts = cim_events.EnergyCounts(np.zeros(4, np.int64), 10, 0)
    assert layer_energy_report(counts, HardwareConfig(adc_bits=4))["adc_pj"] == pytest.approx(
        10 * 0.208 / 16)


def test_hardware_json(tmp_path):
    config = HardwareConfig(cell_energy_pj=(0.1, 0.2, 0.4, 0.8), adc_bits=6, crossbar_rows=64,
                            skip_zero_tiles=True, lfsr_step_energy_pj=0.05)
    path = tmp_path / "hardware.json"
    config.to_json(path)
    assert HardwareConfig.from_json(path) == config
    assert HardwareConfig.from_json(str(path)) == config
    assert HardwareConfig.from_json(json.loads(config.to_json())) == config
    assert HardwareConfig.from_json({}) == HardwareConfig()
    assert HardwareConfig().to_dict()["cell_energy_pj"] == [0.079, 0.36, 0.73, 1.49]
    with pytest.raises(NptwofoldError, match="unknown hardware config keys"):
        HardwareConfig.from_json({"adc_bit": 4})
    path.write_text('{"crossbar_rows": 64, "rows": 2}')
    with pytest.raises(NptwofoldError, match="'rows'"):
        HardwareConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(NptwofoldError, match="JSON object"):
        HardwareConfig.from_json(path)
    path.write_text("{not json")
    with pytest.raises(NptwofoldError, match="cannot read"):
        HardwareConfig.from_json(path)
