"""Cell energy of integer weight levels, and the energy regularizer on them (issue 13).

e(q): the pJ that weight level q costs each time its word line is driven, i.e. the summed
energy of the states of the cells the chosen encoding stores for q on one row (`cim.device`
is the one home of the layout; this module reads the states from `encoded_columns`):
- twos_complement: the M = b/2 code cells of q mod 2^b plus the sign column's cell (01 if q < 0);
- offset_binary: the M code cells of q + 2^(b-1) (the tile's shared reference column does not
  depend on q and is left out);
- sign_magnitude: the M cells of |q| in the positive or negative group and M idle 00 cells.

Energy regularizer of one layer (weights W, levels q = Round(W / s * qmax) on the layer's grid
of step s_q = 2^dropped, clipped to +-qmax_k):
    R_E = strength * sum_i a_i e(q_i),      strength = lambda / E_ref,
a_i the driven count of weight i's row per image (see `nptwofold.twofold`). Its gradient is
taken straight through the rounding, by the central difference over the grid step
    dR_E/dW_i = strength * a_i * (e(q_i + s_q) - e(q_i - s_q)) / (2 s_q) * qmax / s,
with e held at its edge value beyond +-qmax_k. This is the symmetric derivative of the
piecewise-linear interpolation of e through the grid levels (the smoothed cell energy), so
the gradient is that of a continuous energy of the weight itself, not of the relaxed bits.
Sums run in float64; the gradient comes back in the weights' dtype.

Energy-aware rounding (post-training re-binarization): a real level q~, clipped to +-qmax_k,
lies between two grid levels, lower = s_q floor(q~ / s_q) and upper = lower + s_q. Its candidate
is the one of lower energy e when that one lies within `radius` grid steps of q~ (radius in
[0.5, 1)), else the nearest (round half to even, as plain rounding); equal energies take the
nearest. So no weight moves further than radius * s_q from q~. Which candidates are taken is
the caller's choice: all of them, or (`budgeted_moves`) those that save the most energy per
predicted loss increase, up to a loss budget; the fine-tune that follows recovers accuracy.
"""
import numba
import numpy as np

from ..errors import NptwofoldError
from ..cim.device import N_CELL_STATES, columns_per_output, encoded_columns
from .quant import check_bits, check_dropped_planes, check_float_array, level_dtype, max_level


def level_energy_table(bits, encoding, cell_energy_pj):
    """(2 qmax + 1,) float64: e(q) in pJ for q = -qmax..qmax (index q + qmax)."""
    bits = check_bits(bits)
    columns_per_output(encoding, bits)  # rejects an unknown encoding
    cell_energy_pj = np.asarray(cell_energy_pj, np.float64)
    if cell_energy_pj.shape != (N_CELL_STATES,) or not np.all(np.isfinite(cell_energy_pj)):
        raise NptwofoldError(f"cell energies need {N_CELL_STATES} finite values, got "
                             f"{cell_energy_pj.tolist()}")
    qmax = max_level(bits)
    levels = np.arange(-qmax, qmax + 1, dtype=np.int64)[:, None]  # one output channel
    states = encoded_columns(levels, encoding, bits)[0][0]  # (columns, levels)
    return cell_energy_pj[states].sum(axis=0)


def level_cell_energy_pj(levels, bits, encoding, cell_energy_pj):
    """e(q) in pJ of every level in `levels` (any shape), float64."""
    levels = np.asarray(levels)
    qmax = max_level(bits)
    if not np.issubdtype(levels.dtype, np.integer):
        raise NptwofoldError(f"levels must be integers, got {levels.dtype}")
    if levels.size and np.abs(levels.astype(np.int64)).max() > qmax:
        raise NptwofoldError(f"levels must lie in -{qmax}..{qmax} for {bits}-bit weights")
    return level_energy_table(bits, encoding, cell_energy_pj)[levels.astype(np.int64) + qmax]


@numba.njit(cache=True)
def _energy_regularizer_kernel(levels, rates, table, qmax, top, step, strength, scale,
                               grad_weights):
    total = 0.0
    to_weight = qmax / scale  # dq~/dW
    for i in range(levels.size):
        q = np.int64(levels[i])
        rate = np.float64(rates[i])
        total += rate * table[q + qmax]
        up = min(q + step, top)
        down = max(q - step, -top)
        slope = (table[up + qmax] - table[down + qmax]) / (2.0 * step)
        grad_weights[i] = strength * rate * slope * to_weight
    return strength * total


@numba.njit(cache=True)
def _energy_rounding_kernel(real, table, qmax, top, step, radius, nearest_levels,
                            cheaper_levels):
    for i in range(real.size):
        q = min(max(real[i], -top), top)
        nearest = step * np.rint(q / step)
        lower = step * np.floor(q / step)
        upper = min(lower + step, top)
        lower_energy = table[np.int64(lower) + qmax]
        upper_energy = table[np.int64(upper) + qmax]
        cheaper = nearest
        if lower_energy < upper_energy:
            cheaper = lower
        elif upper_energy < lower_energy:
            cheaper = upper
        nearest_levels[i] = np.int64(nearest)
        cheaper_levels[i] = np.int64(cheaper if abs(cheaper - q) <= radius * step else nearest)


def energy_rounding_candidates(real, table, dropped, radius):
    """(nearest, cheaper): the plainly rounded levels of real levels q~ and their energy-aware
    candidates (module docstring).

    real: q~ (any shape, float); table: `level_energy_table` of the layer's bits and encoding;
    dropped: the layer's dropped planes (grid step 2^dropped); radius in [0.5, 1). Both come in
    the dtype of the table's bit width (`quant.level_dtype`).
    """
    real = np.asarray(real, np.float64)
    table = np.asarray(table, np.float64)
    qmax = (table.size - 1) // 2
    bits = qmax.bit_length() + 1
    step = check_dropped_planes(dropped, bits)
    if not 0.5 <= radius < 1:
        raise NptwofoldError(f"energy rounding radius must be in [0.5, 1), got {radius}")
    if not np.all(np.isfinite(real)):
        raise NptwofoldError("real levels contain NaN or inf")
    nearest = np.empty(real.shape, level_dtype(bits))
    cheaper = np.empty_like(nearest)
    _energy_rounding_kernel(np.ascontiguousarray(real).ravel(), table, qmax,
                            float(step * (qmax // step)), float(step), float(radius),
                            nearest.reshape(-1), cheaper.reshape(-1))
    return nearest, cheaper


def budgeted_moves(gain, cost, budget):
    """Which moves to take: those of largest gain per cost first, as long as their summed cost
    stays within `budget`.

    gain, cost: float arrays of one shape (energy saved, predicted loss increase, both >= 0);
    a move of no cost and positive gain is always taken, one of no gain never. The order is
    gain / cost descending, ties by position; the longest prefix within the budget is taken.
    Returns a boolean array of the inputs' shape.
    """
    gain = np.asarray(gain, np.float64)
    cost = np.asarray(cost, np.float64)
    if gain.shape != cost.shape:
        raise NptwofoldError(f"gain shape {gain.shape} does not match cost shape {cost.shape}")
    if not (np.all(np.isfinite(gain)) and np.all(np.isfinite(cost))
            and (gain >= 0).all() and (cost >= 0).all()):
        raise NptwofoldError("gains and costs must be finite and >= 0")
    if not budget >= 0:
        raise NptwofoldError(f"loss budget must be >= 0, got {budget}")
    useful = np.flatnonzero(gain > 0)
    with np.errstate(divide="ignore"):
        ratio = gain.ravel()[useful] / cost.ravel()[useful]  # inf for a free move
    order = useful[np.argsort(-ratio, kind="stable")]
    taken_count = int(np.searchsorted(np.cumsum(cost.ravel()[order]), budget, side="right"))
    taken = np.zeros(gain.size, bool)
    taken[order[:taken_count]] = True
    return taken.reshape(gain.shape)


def energy_regularizer(levels, rates, table, scale, dropped, strength, dtype=np.float32):
    """(R_E, dR_E/dW) of one layer (module docstring).

    levels: the layer's integer levels (multiples of 2^dropped); rates: a_i, float, same shape;
    table: `level_energy_table` of the layer's bits and encoding; scale: s of W = s q / qmax;
    strength: lambda / E_ref. The gradient has the levels' shape and `dtype`.
    """
    levels = np.asarray(levels)
    rates = check_float_array("activity rates", rates)
    table = np.asarray(table, np.float64)
    qmax = (table.size - 1) // 2
    bits = qmax.bit_length() + 1
    if table.ndim != 1 or table.size != 2 * max_level(bits) + 1:
        raise NptwofoldError(f"energy table has {table.size} entries, not 2 qmax + 1")
    if rates.shape != levels.shape:
        raise NptwofoldError(f"activity rates shape {rates.shape} does not match the levels "
                             f"{levels.shape}")
    step = check_dropped_planes(dropped, bits)
    if levels.size and np.abs(levels.astype(np.int64)).max() > qmax:
        raise NptwofoldError(f"levels must lie in -{qmax}..{qmax} for {bits}-bit weights")
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(strength) and strength >= 0):
        raise NptwofoldError(f"scale {scale} must be > 0 and strength {strength} >= 0")
    grad = np.empty(levels.shape, dtype)
    value = _energy_regularizer_kernel(
        np.ascontiguousarray(levels).ravel(), np.ascontiguousarray(rates).ravel(), table,
        qmax, step * (qmax // step), step, float(strength), float(scale), grad.reshape(-1))
    return float(value), grad
