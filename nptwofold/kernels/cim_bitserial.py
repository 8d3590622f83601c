"""The reference simulation of one crossbar: bit by bit, row by row (`cim_matmul`), the
slow, obviously correct model every faster path must equal.

Arithmetic, per output position p, input bit j (a word line is driven when bit j of its input
is 1) and physical column k of tile tau:
  S[t, k] = sum of the states of column k's cells on the driven stored rows of row tile t
  Q[p, k] = sum_j 2^j sum_t code_k(S[t, k])
  y[p, c] = sum over the columns k of channel c, and the reference column of its tile,
            of coefficient_k * step_k * Q[p, k]            (float64, a fixed order)
With an ideal ADC, code(S) = S, step = 1 and y = x @ q exactly (`cim.adc` for code()).
"""
import numba
import numpy as np
from numba import prange

from ..cim.adc import check_adc
from ..cim.device import N_CELL_STATES
from .cim_events import EnergyCounts, check_inputs


@numba.njit(cache=True)
def adc_code(partial_sum, step, top):
    return min(np.int64(np.rint(partial_sum / step)), top)


@numba.njit(parallel=True, cache=True)
def _combine_kernel(codes, coefficient, step, output_of, column_tile, outputs_per_tile, out):
    """out[p, c] = sum over the columns of channel c (and its tile's reference column) of
    coefficient * step * Q, in column order."""
    n_positions, n_columns = codes.shape
    n_outputs = out.shape[1]
    for p in prange(n_positions):
        out[p, :] = 0.0
        for k in range(n_columns):
            value = np.float64(coefficient[k]) * step[k] * np.float64(codes[p, k])
            if output_of[k] >= 0:
                out[p, output_of[k]] += value
            else:
                first = column_tile[k] * outputs_per_tile
                for c in range(first, min(first + outputs_per_tile, n_outputs)):
                    out[p, c] += value


@numba.njit(cache=True)
def _simulate_kernel(x, cells, stored, row_tile, n_row_tiles, column_tile, activation_bits,
                     step, top, skip_zero_tiles, codes, cell_counts):
    """Row by row: fills `codes` (P, K) and `cell_counts`; returns the ADC conversions."""
    n_positions, n_rows = x.shape
    n_columns = cells.shape[0]
    sums = np.zeros(max(n_row_tiles.max(), 1), np.int64)
    driven = np.zeros(sums.size, np.bool_)
    conversions = 0
    for p in range(n_positions):
        for j in range(activation_bits):
            for k in range(n_columns):
                tile = column_tile[k]
                sums[:] = 0
                driven[:] = False
                for r in range(n_rows):
                    if stored[tile, r] and (np.int64(x[p, r]) >> j) & 1:
                        state = cells[k, r]
                        sums[row_tile[tile, r]] += state
                        driven[row_tile[tile, r]] = True
                        cell_counts[state] += 1
                for t in range(n_row_tiles[tile]):
                    if driven[t] or not skip_zero_tiles:
                        conversions += 1
                    codes[p, k] += adc_code(sums[t], step[k], top[k]) << j
    return conversions


def cim_matmul(crossbar, x, activation_bits, adc=None, skip_zero_tiles=False):
    """Bit-serial array output of integer inputs x (P, R) and its energy events, row by row.

    Returns (y, counts): y is (P, C) float64, equal to x @ q_kept for an ideal ADC (adc None);
    counts is an EnergyCounts.
    """
    x, activation_bits = check_inputs(crossbar, x, activation_bits)
    adc = check_adc(crossbar, adc)
    codes = np.zeros((x.shape[0], crossbar.n_columns), np.int64)
    cell_counts = np.zeros(N_CELL_STATES, np.int64)
    conversions = _simulate_kernel(x, crossbar.cells, crossbar.stored, crossbar.row_tile,
                                   crossbar.n_row_tiles, crossbar.column_tile, activation_bits,
                                   adc.step, adc.top, bool(skip_zero_tiles), codes, cell_counts)
    return (combine(crossbar, codes, adc),
            EnergyCounts(cell_counts, int(conversions), crossbar.lfsr_steps * x.shape[0]))


def combine(crossbar, codes, adc):
    out = np.empty((codes.shape[0], crossbar.n_outputs))
    _combine_kernel(codes, crossbar.coefficient, adc.step, crossbar.output_of,
                    crossbar.column_tile, crossbar.outputs_per_tile, out)
    return out
