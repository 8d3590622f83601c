"""The cell energy of levels per encoding and the energy regularizer (kernels.energy), against
plain-NumPy references; the surrogate gradient against float64 finite differences of the
piecewise-linear (smoothed) cell energy."""
import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.hardware import HardwareConfig
from nptwofold.kernels.quant import ENCODINGS
from nptwofold.kernels.energy import (energy_regularizer, budgeted_moves, energy_rounding_candidates,
                                      level_cell_energy_pj, level_energy_table)
from nptwofold.kernels.quant import max_level

CELL_PJ = HardwareConfig().cell_energy_pj


def reference_energy(q, bits, encoding, cell_pj):
    """e(q) from the encodings' definitions, one level at a time."""
    cells = bits // 2

    def code_cells(code):
        return [(code >> (2 * m)) & 3 for m in range(cells)]

    if encoding == "twos_complement":
        states = code_cells(q % (1 << bits)) + [1 if q < 0 else 0]
    elif encoding == "offset_binary":
        states = code_cells(q + (1 << (bits - 1)))
    else:
        states = code_cells(abs(q)) + [0] * cells
    return sum(cell_pj[s] for s in states)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_level_energy_matches_reference(encoding, bits):
    qmax = max_level(bits)
    levels = np.arange(-qmax, qmax + 1).reshape(-1, 1).astype(np.int8)
    got = level_cell_energy_pj(levels, bits, encoding, CELL_PJ)
    expected = [reference_energy(int(q), bits, encoding, CELL_PJ) for q in levels.ravel()]
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-12)


def test_sign_magnitude_energy_is_monotone_in_magnitude_and_twos_complement_is_not():
    table_sm = level_energy_table(8, "sign_magnitude", CELL_PJ)
    table_tc = level_energy_table(8, "twos_complement", CELL_PJ)
    zero = 127
    assert table_sm[zero] == table_sm.min()
    assert table_tc[zero - 1] > table_tc[zero - 128 + 1]  # -1 costs more than -127


def test_level_energy_refuses_bad_input():
    with pytest.raises(NptwofoldError, match="must lie in"):
        level_cell_energy_pj(np.array([128]), 8, "sign_magnitude", CELL_PJ)
    with pytest.raises(NptwofoldError, match="unknown weight encoding"):
        level_energy_table(8, "gray", CELL_PJ)
    with pytest.raises(NptwofoldError, match="cell energies"):
        level_energy_table(8, "sign_magnitude", CELL_PJ[:3])


def reference_regularizer(levels, rates, table, scale, dropped, strength):
    qmax = (table.size - 1) // 2
    step = 2 ** dropped
    top = step * (qmax // step)
    value, grad = 0.0, np.zeros(levels.shape)
    for index in np.ndindex(levels.shape):
        q = int(levels[index])
        value += rates[index] * table[q + qmax]
        up, down = min(q + step, top), max(q - step, -top)
        grad[index] = (rates[index] * (table[up + qmax] - table[down + qmax]) / (2 * step)
                       * qmax / scale)
    return strength * value, strength * grad


def random_layer(rng, bits, dropped, shape=(4, 3, 3, 3)):
    qmax = max_level(bits)
    step = 2 ** dropped
    top = qmax // step
    levels = (rng.integers(-top, top + 1, shape) * step).astype(np.int16)
    levels.flat[:2] = [top * step, -top * step]  # both clip edges
    rates = rng.uniform(0, 50, shape).astype(np.float32)
    return levels, rates


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dropped", [0, 2])
def test_energy_regularizer_matches_reference(encoding, dropped):
    rng = np.random.default_rng(3)
    levels, rates = random_layer(rng, 8, dropped)
    table = level_energy_table(8, encoding, CELL_PJ)
    value, grad = energy_regularizer(levels, rates, table, 0.7, dropped, 0.01, np.float64)
    ref_value, ref_grad = reference_regularizer(levels, rates.astype(np.float64), table, 0.7,
                                                dropped, 0.01)
    assert value == pytest.approx(ref_value, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dropped", [0, 1])
def test_surrogate_gradient_is_finite_difference_of_smoothed_energy(encoding, dropped):
    """float64 central differences (h a thousandth of the grid step) of the piecewise-linear
    interpolation of e through the layer's grid, as a function of W: at a grid level they give
    the mean of the two adjacent slopes, which is the surrogate's definition."""
    rng = np.random.default_rng(5)
    bits, scale, strength = 6, 0.3, 0.02
    levels, rates = random_layer(rng, bits, dropped, shape=(40,))
    rates = rates.astype(np.float64)
    table = level_energy_table(bits, encoding, CELL_PJ)
    qmax, step = max_level(bits), 2 ** dropped
    grid = np.arange(-(qmax // step), qmax // step + 1) * step

    def smoothed_total(weights):
        return strength * np.sum(rates * np.interp(weights / scale * qmax, grid,
                                                   table[grid + qmax]))

    weights = levels.astype(np.float64) * scale / qmax
    h = 1e-3 * step * scale / qmax  # well inside one linear piece either side
    numeric = np.empty_like(weights)
    for i in range(weights.size):
        up, down = weights.copy(), weights.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (smoothed_total(up) - smoothed_total(down)) / (2 * h)
    _, grad = energy_regularizer(levels, rates, table, scale, dropped, strength, np.float64)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9 * np.abs(numeric).max())


def test_energy_regularizer_refuses_bad_input():
    table = level_energy_table(4, "sign_magnitude", CELL_PJ)
    levels = np.zeros((3, 2), np.int8)
    with pytest.raises(NptwofoldError, match="activity rates shape"):
        energy_regularizer(levels, np.zeros((2, 3), np.float32), table, 1.0, 0, 1.0)
    with pytest.raises(NptwofoldError, match="scale"):
        energy_regularizer(levels, np.zeros((3, 2), np.float32), table, 0.0, 0, 1.0)
    with pytest.raises(NptwofoldError, match="dropped"):
        energy_regularizer(levels, np.zeros((3, 2), np.float32), table, 1.0, 3, 1.0)


def reference_energy_rounding(real, table, step, radius):
    """Energy-aware rounding of one q~ at a time, from its definition."""
    qmax = (len(table) - 1) // 2
    top = step * (qmax // step)
    levels = []
    for q in np.ravel(real):
        q = min(max(q, -top), top)
        nearest = step * round(q / step)  # Python's round: half to even, like np.rint
        lower = step * np.floor(q / step)
        upper = min(lower + step, top)
        energies = {lower: table[int(lower) + qmax], upper: table[int(upper) + qmax]}
        cheaper = min(energies, key=energies.get) if len(set(energies.values())) > 1 else nearest
        levels.append(cheaper if abs(cheaper - q) <= radius * step else nearest)
    return np.array(levels).reshape(np.shape(real))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dropped", [0, 2])
@pytest.mark.parametrize("radius", [0.5, 0.7, 0.95])
def test_energy_rounding_matches_reference(encoding, dropped, radius):
    rng = np.random.default_rng(dropped)
    table = level_energy_table(8, encoding, CELL_PJ)
    real = rng.uniform(-140, 140, (30, 7))
    real[0, :4] = [0.0, 2.5, 4.0, 127.0]  # on the grid, a tie, clipped
    nearest, got = energy_rounding_candidates(real, table, dropped, radius)
    want = reference_energy_rounding(real, table, 2**dropped, radius)
    np.testing.assert_array_equal(got, want)
    step = 2**dropped
    clipped = np.clip(real, -(127 // step) * step, (127 // step) * step)
    plain = step * np.rint(clipped / step)
    np.testing.assert_array_equal(nearest, plain)
    assert (table[got.astype(int) + 127] <= table[plain.astype(int) + 127]).all()
    assert (np.abs(got - clipped) <= radius * step + 1e-9).all()
    if radius > 0.5:
        assert (got != plain).any()  # the rounding does move some weights
    with pytest.raises(NptwofoldError, match="radius must be in"):
        energy_rounding_candidates(real, table, dropped, 1.0)


def reference_budgeted_moves(gain, cost, budget):
    """Take moves one at a time, best gain per cost first, until the next would overrun."""
    def ratio(i):
        return gain[i] / cost[i] if cost[i] else np.inf
    order = sorted((i for i in range(len(gain)) if gain[i] > 0), key=lambda i: -ratio(i))
    taken, spent = np.zeros(len(gain), bool), 0.0
    for i in order:
        if spent + cost[i] > budget:
            break
        taken[i], spent = True, spent + cost[i]
    return taken


@pytest.mark.parametrize("budget", [0.0, 0.3, 2.0, 1e9])
def test_budgeted_moves_take_the_best_gain_per_cost_within_the_budget(budget):
    rng = np.random.default_rng(int(budget * 10) % 7)
    gain = rng.uniform(0, 2, 200)
    cost = rng.uniform(0, 0.1, 200)
    gain[:5] = 0.0  # no gain: never taken
    cost[5:10] = 0.0  # free: always taken
    taken = budgeted_moves(gain, cost, budget)
    np.testing.assert_array_equal(taken, reference_budgeted_moves(gain, cost, budget))
    assert not taken[:5].any() and taken[5:10].all()
    assert cost[taken].sum() <= budget
    if budget == 1e9:
        assert taken[5:].all()
    elif budget == 0.3:
        assert 10 < taken.sum() < 195


def test_budgeted_moves_reject_bad_input():
    with pytest.raises(NptwofoldError, match="does not match"):
        budgeted_moves(np.ones(3), np.ones(4), 1.0)
    with pytest.raises(NptwofoldError, match="finite and >= 0"):
        budgeted_moves(np.ones(3), -np.ones(3), 1.0)
    with pytest.raises(NptwofoldError, match="loss budget"):
        budgeted_moves(np.ones(3), np.ones(3), -1.0)
