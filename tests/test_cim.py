"""CIM array simulation, energy event counting and hardware config against SPEC 5 and 6.

References are slow plain Python / NumPy written from the SPEC and from the ADC model and
conventions documented in nptwofold.kernels.cim, not from the kernels.
"""
import json

import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.hardware import HardwareConfig, layer_energy_report
from nptwofold.kernels import cim
from nptwofold.kernels.lfsr import lfsr_keep_mask_for_kept

EVEN_BITS = list(range(2, 17, 2))


def reference_cell_states(level, bits):
    """States of a weight's cells, cell m = bits (2m+1, 2m) of its two's complement string."""
    plane = [int(bit) for bit in reversed(format(level & (2**bits - 1), f"0{bits}b"))]
    return [2 * plane[2 * m + 1] + plane[2 * m] for m in range(bits // 2)]


def reference_adc(partial_sum, adc_bits, rows_per_tile):
    """Documented model: range 0..3T; else round to a power-of-two step (ties to the even
    code, as Python's round does), clip at the top code."""
    range_bits = len(format(3 * rows_per_tile, "b"))
    if adc_bits == 0 or adc_bits >= range_bits:
        return partial_sum
    step = 2 ** (range_bits - adc_bits)
    code = min(round(partial_sum / step), 2**adc_bits - 1)
    return code * step


def reference_simulation(levels, kept_rows, group, bits, rows_per_tile, x, activation_bits,
                         adc_bits=0, skip_zero_tiles=False):
    """Event by event: returns (y, activated cells per state, ADC conversions)."""
    levels, kept_rows, x = levels.tolist(), kept_rows.tolist(), x.tolist()
    n_cols = len(levels[0])
    y = [[0] * n_cols for _ in x]
    state_counts, conversions = [0, 0, 0, 0], 0
    for p, inputs in enumerate(x):
        for j in range(activation_bits):
            for c in range(n_cols):
                rows = kept_rows[c // group]
                column_sum = 0
                for start in range(0, len(rows), rows_per_tile):
                    driven = [r for r in rows[start:start + rows_per_tile] if inputs[r] >> j & 1]
                    if driven or not skip_zero_tiles:
                        conversions += bits // 2
                    for m in range(bits // 2):
                        states = [reference_cell_states(levels[r][c], bits)[m] for r in driven]
                        for state in states:
                            state_counts[state] += 1
                        column_sum += 4**m * reference_adc(sum(states), adc_bits, rows_per_tile)
                # Cells read as unsigned give q + 2^b for a negative q: subtract it per driven row.
                negative = sum(1 for r in rows if inputs[r] >> j & 1 and levels[r][c] < 0)
                y[p][c] += 2**j * (column_sum - 2**bits * negative)
    return np.array(y, np.int64), state_counts, conversions


def random_layer(rng, n_rows, n_cols, bits, kept, group, rows_per_tile, seed=5):
    """Levels over the full b-bit two's complement range, an LFSR mask and the crossbar view."""
    levels = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (n_rows, n_cols))
    mask = lfsr_keep_mask_for_kept(n_rows, n_cols, kept, seed, group)
    layer = cim.map_layer(levels, bits, rows_per_tile, mask.kept_rows, group, mask.steps)
    return levels, mask, layer


def random_inputs(rng, n_positions, n_rows, activation_bits, density=1.0):
    x = rng.integers(0, 2**activation_bits, (n_positions, n_rows))
    return x * (rng.random(x.shape) < density)


@pytest.mark.parametrize("bits", EVEN_BITS)
def test_ideal_adc_equals_integer_matmul(bits):
    rng = np.random.default_rng(bits)
    n_rows, n_cols, kept = 23, 10, 17  # 17 rows: remainders 1, 2, 3 in tiles of 4, 5, 7
    # (activation bits, mask group, rows per tile); group 3 leaves a partial last group.
    for activation_bits, group, rows_per_tile in [(1, 1, 4), (3, 3, 5), (8, 2, 7), (5, 4, 128),
                                                  (16, 1, 6)]:
        levels, mask, layer = random_layer(rng, n_rows, n_cols, bits, kept, group, rows_per_tile)
        x = random_inputs(rng, 6, n_rows, activation_bits, density=0.7)
        y, _ = cim.cim_matmul(layer, x, activation_bits)
        expected = x @ (levels * mask.mask)
        assert np.any(expected != x @ levels)  # the mask matters
        np.testing.assert_array_equal(y, expected)
        # An ADC with as many bits as the partial-sum range is exact too.
        y, _ = cim.cim_matmul(layer, x, activation_bits, cim.adc_range_bits(rows_per_tile))
        np.testing.assert_array_equal(y, expected)


def test_dense_layer_and_layer_matrix():
    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (6, 3, 3, 3))  # OIHW conv: R = 27 rows, C = 6 columns
    matrix = cim.layer_matrix(weights)
    assert matrix.shape == (27, 6) and matrix[1 * 9 + 2 * 3 + 0, 4] == weights[4, 1, 2, 0]
    layer = cim.map_layer(matrix, 8, 10)
    assert layer.n_tiles == 3 and layer.lfsr_steps == 0
    x = random_inputs(rng, 5, 27, 8)
    y, counts = cim.cim_matmul(layer, x, 8)
    np.testing.assert_array_equal(y, x @ matrix)
    assert counts.lfsr_steps == 0


@pytest.mark.parametrize("skip_zero_tiles", [False, True])
@pytest.mark.parametrize("bits, group, rows_per_tile", [(4, 1, 3), (8, 4, 5), (2, 2, 13)])
def test_counted_events_equal_simulated_and_reference(skip_zero_tiles, bits, group,
                                                      rows_per_tile):
    rng = np.random.default_rng(bits + group)
    n_positions, n_rows, n_cols, kept, activation_bits = 4, 19, 7, 13, 6
    levels, mask, layer = random_layer(rng, n_rows, n_cols, bits, kept, group, rows_per_tile)
    x = random_inputs(rng, n_positions, n_rows, activation_bits, density=0.3)
    y, simulated = cim.cim_matmul(layer, x, activation_bits, skip_zero_tiles=skip_zero_tiles)
    counted = cim.count_events(layer, x, activation_bits, skip_zero_tiles)
    ref_y, ref_states, ref_conversions = reference_simulation(
        levels, mask.kept_rows, group, bits, rows_per_tile, x, activation_bits,
        skip_zero_tiles=skip_zero_tiles)

    np.testing.assert_array_equal(y, ref_y)
    for counts in (simulated, counted):
        assert counts.cell_state_counts.tolist() == ref_states
        assert counts.adc_conversions == ref_conversions
        assert counts.lfsr_steps == mask.steps * n_positions
    all_conversions = n_positions * activation_bits * n_cols * (bits // 2) * layer.n_tiles
    assert (ref_conversions < all_conversions) == skip_zero_tiles
    assert min(ref_states) > 0
    config = HardwareConfig()
    assert layer_energy_report(simulated, config) == layer_energy_report(counted, config)


def hand_worked_layer():
    """2x2 crossbar (T = 2 rows, 2 cells = one 4-bit weight per row), one output column.

    q = (-3, 5, 2, 7); row 3 is pruned (kept rows 0, 1, 2 in that order), so tile 0 holds rows
    0, 1 and tile 1 holds row 2. Two's complement, cell 1 | cell 0 (bits 3,2 | bits 1,0):
      -3 = 11|01 -> states (cell0 1, cell1 3);  5 = 01|01 -> (1, 1);  2 = 00|10 -> (2, 0).
    """
    levels = np.array([[-3], [5], [2], [7]])
    return levels, cim.map_layer(levels, 4, 2, np.array([[0, 1, 2]]), 1, lfsr_steps=4)


def test_hand_worked_crossbar_energy():
    levels, layer = hand_worked_layer()
    np.testing.assert_array_equal(layer.cells[0], [[1, 3], [1, 1], [2, 0]])
    # x = (1, 3, 2, 3) with a = 2 bits: bit 0 drives rows 0, 1 (and pruned 3); bit 1 drives
    # rows 1, 2 (and 3). y = -3*1 + 5*3 + 2*2 = 16.
    x = np.array([[1, 3, 2, 3]])
    y, counts = cim.cim_matmul(layer, x, 2)
    assert y.tolist() == [[16]]
    # Activated cells: bit 0 rows 0, 1 -> states 1, 3, 1, 1; bit 1 rows 1, 2 -> 1, 1, 2, 0.
    # 00: 1, 01: 5, 10: 1, 11: 1.
    assert counts.cell_state_counts.tolist() == [1, 5, 1, 1]
    # ADC: 1 position * 2 bits * 1 column * 2 cells * 2 tiles = 8 conversions.
    assert counts.adc_conversions == 8
    # LFSR: 4 steps per position * 1 position.
    assert counts.lfsr_steps == 4
    report = layer_energy_report(counts, HardwareConfig())
    # cells: 1*0.079 + 5*0.36 + 1*0.73 + 1*1.49 = 4.099 pJ; ADC: 8*0.208 = 1.664 pJ;
    # LFSR: 4*0.02 = 0.08 pJ; total 5.843 pJ.
    assert report["cells_pj"] == pytest.approx(4.099, rel=1e-12)
    assert report["adc_pj"] == pytest.approx(1.664, rel=1e-12)
    assert report["lfsr_pj"] == pytest.approx(0.08, rel=1e-12)
    assert report["total_pj"] == pytest.approx(5.843, rel=1e-12)
    assert report["cell_state_share"] == {"00": 0.125, "01": 0.625, "10": 0.125, "11": 0.125}
    # Skipping zero tiles: tile 1 (row 2) has no driven row for bit 0, so 2 conversions fewer:
    # 6 * 0.208 = 1.248 pJ, total 4.099 + 1.248 + 0.08 = 5.427 pJ.
    _, counts = cim.cim_matmul(layer, x, 2, skip_zero_tiles=True)
    assert counts.adc_conversions == 6
    assert layer_energy_report(counts, HardwareConfig())["total_pj"] == pytest.approx(5.427,
                                                                                      rel=1e-12)


def test_hand_worked_adc():
    levels, layer = hand_worked_layer()
    # T = 2: partial sums 0..6 need 3 bits. adc_bits = 1: step 4, top code 1 (reads 0 or 4).
    # Bit 0: tile 0 sums cell0 1+1 = 2 -> 0 (tie 0.5, to the even code 0), cell1 3+1 = 4 -> 4;
    #   tile 1 undriven; row 0 is negative, so y_0 = 0 + 4*4 - 16*1 = 0 (exact: 2).
    # Bit 1: tile 0 (row 1) cell0 1 -> 0, cell1 1 -> 0; tile 1 (row 2) cell0 2 -> 0 (tie),
    #   cell1 0; y_1 = 0 (exact: 7). y = 0 + 2*0 = 0.
    y, _ = cim.cim_matmul(layer, np.array([[1, 3, 2, 3]]), 2, adc_bits=1)
    assert y.tolist() == [[0]]
    # Clipping: b = 2, two rows of q = -1 (state 3) driven: sum 6 = 1.5 steps rounds to the even
    # code 2, clipped to code 1 -> 4, y = 4 - 4*2 = -4 (exact: -2). With 2 ADC bits (step 2,
    # top code 3) 6 is exact.
    clip_layer = cim.map_layer(np.array([[-1], [-1]]), 2, 2)
    assert cim.cim_matmul(clip_layer, np.array([[1, 1]]), 1, adc_bits=1)[0].tolist() == [[-4]]
    assert cim.cim_matmul(clip_layer, np.array([[1, 1]]), 1, adc_bits=2)[0].tolist() == [[-2]]


@pytest.mark.parametrize("rows_per_tile", [5, 8])
def test_finite_adc_follows_documented_model(rows_per_tile):
    rng = np.random.default_rng(rows_per_tile)
    bits, activation_bits = 6, 4
    levels, mask, layer = random_layer(rng, 20, 6, bits, 16, 2, rows_per_tile)
    x = random_inputs(rng, 3, 20, activation_bits)
    ideal, ideal_counts = cim.cim_matmul(layer, x, activation_bits)
    range_bits = cim.adc_range_bits(rows_per_tile)
    for adc_bits in range(1, range_bits):
        y, counts = cim.cim_matmul(layer, x, activation_bits, adc_bits)
        ref_y, _, _ = reference_simulation(levels, mask.kept_rows, 2, bits, rows_per_tile, x,
                                           activation_bits, adc_bits)
        np.testing.assert_array_equal(y, ref_y)
        assert np.any(y != ideal)
        # The ADC changes values, not events.
        np.testing.assert_array_equal(counts.cell_state_counts, ideal_counts.cell_state_counts)
        assert counts[1:] == ideal_counts[1:]


def test_bad_layers_and_inputs_raise():
    levels = np.zeros((4, 2), np.int64)
    with pytest.raises(NptwofoldError, match="0..3"):
        cim.map_layer(levels, 4, 2, np.array([[0, 4]]), 2)
    with pytest.raises(NptwofoldError, match="repeat"):
        cim.map_layer(levels, 4, 2, np.array([[1, 1]]), 2)
    with pytest.raises(NptwofoldError, match="shape"):
        cim.map_layer(levels, 4, 2, np.array([[0, 1]]), 1)
    with pytest.raises(NptwofoldError):
        cim.map_layer(np.full((4, 2), 8), 4, 2)  # 8 is outside 4-bit two's complement
    layer = cim.map_layer(levels, 4, 2)
    with pytest.raises(NptwofoldError, match="unsigned 3-bit"):
        cim.cim_matmul(layer, np.array([[0, 8, 0, 0]]), 3)
    with pytest.raises(NptwofoldError, match="rows"):
        cim.count_events(layer, np.zeros((1, 3), np.int64), 3)


@pytest.mark.parametrize("overrides, message", [
    (dict(cell_bits=3), "odd"),
    (dict(cell_bits=4), "only 2-bit"),
    (dict(cell_bits=2.0), "integer"),
    (dict(cell_energy_pj=(0.0, 0.36, 0.73, 1.49)), "positive"),
    (dict(cell_energy_pj=(0.079, -0.36, 0.73, 1.49)), "positive"),
    (dict(cell_energy_pj=(0.079, 0.36, 0.73)), "4 energies"),
    (dict(adc_energy_pj=0), "positive"),
    (dict(adc_energy_pj=float("nan")), "positive"),
    (dict(lfsr_step_energy_pj=-0.02), "positive"),
    (dict(crossbar_rows=0), "crossbar_rows"),
    (dict(crossbar_cols=-1), "crossbar_cols"),
    (dict(crossbar_rows=128.0), "integer"),
    (dict(adc_bits=-1), "adc_bits"),
    (dict(activation_bits=17), "activation_bits"),
    (dict(skip_zero_tiles="yes"), "skip_zero_tiles"),
])
def test_bad_hardware_configs_raise(overrides, message):
    with pytest.raises(NptwofoldError, match=message):
        HardwareConfig(**overrides)
    with pytest.raises(NptwofoldError, match=message):
        HardwareConfig.from_json(json.loads(json.dumps(overrides)))


def test_crossbar_smaller_than_one_weight_raises():
    config = HardwareConfig(crossbar_cols=3)
    assert config.cells_per_weight(6) == 3
    with pytest.raises(NptwofoldError, match="needs 4 cells"):
        config.cells_per_weight(8)
    with pytest.raises(NptwofoldError, match="odd"):
        config.cells_per_weight(5)


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
