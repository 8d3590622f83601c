"""The bit-serial reading of analog partial sums: a chip whose cells are not the ideal states
(`cim.variation`) gives real-valued partial sums, which a finite ADC rounds to its steps.

Per output position and input bit, a crossbar group's partial sums are the sum of the rows of
its (rows, columns) conductance matrix that the bit drives: a vector add per driven row (about
a fifth of the rows per bit in a trained network), listed without a branch. The ADC then reads
each bit's sums in a loop over the columns, which LLVM vectorizes, compiled per activation
width.

code(S) = min(max(rint(S / step), 0), top), the arithmetic of `cim_bitserial.adc_code` (which
never meets a negative sum); S is the sum of the driven cells' conductances less the
off-current, plus the read noise, so it can fall below 0, which the ADC reads as code 0.
"""
import functools

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def sum_driven_rows(out, matrix, driven, n_driven):
    """out[:] = the sum of matrix[driven[d]] over d < n_driven, added in that order."""
    out[:] = 0
    d = 0
    # eight rows per pass: out is loaded and stored once per eight adds instead of once per
    # add, and each element still adds its rows one by one in order, so the sums are the same
    while d + 8 <= n_driven:
        r0, r1, r2, r3 = (matrix[driven[d]], matrix[driven[d + 1]], matrix[driven[d + 2]],
                          matrix[driven[d + 3]])
        r4, r5, r6, r7 = (matrix[driven[d + 4]], matrix[driven[d + 5]], matrix[driven[d + 6]],
                          matrix[driven[d + 7]])
        for k in range(out.size):
            out[k] = ((((((((out[k] + r0[k]) + r1[k]) + r2[k]) + r3[k]) + r4[k]) + r5[k])
                       + r6[k]) + r7[k])
        d += 8
    for d in range(d, n_driven):
        row = matrix[driven[d]]
        for k in range(out.size):
            out[k] += row[k]


@functools.cache
def analog_kernel(activation_bits):
    """The reading kernel for `activation_bits`-bit inputs, compiled once per width."""

    # error_model="numpy": Python's ZeroDivisionError check on the ADC's float division would
    # keep LLVM from vectorizing the reading loop (the steps are never 0)
    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def read_analog(x, rows, excess, squared, noise, read_noise, columns, step, top, codes):
        """codes[p, columns[k]] += sum_j 2^j code(S[p, j, k]) for integer inputs x (P, R):
        S = sum of excess[i, k] over the rows i whose input x[p, rows[i]] has bit j, and, if
        `noise` (P, a, K) is not empty, + read_noise sqrt(sum of squared[i, k] over those
        rows) noise[p, j, k]. Column k reads with step[columns[k]] and top code
        top[columns[k]]; the rows are summed in order, so any thread gives the same codes."""
        n_positions, n_rows, n_columns = x.shape[0], rows.size, columns.size
        noisy = noise.shape[0] > 0
        column_step = step[columns]
        column_top = top[columns].astype(np.float64)
        inputs = np.empty(n_rows, np.int64)
        driven = np.empty(n_rows, np.int64)
        sums = np.empty((activation_bits, n_columns), np.float32)
        variances = np.empty((activation_bits, n_columns), np.float32)
        totals = np.empty(n_columns)
        for p in range(n_positions):
            for i in range(n_rows):
                inputs[i] = x[p, rows[i]]
            for j in range(activation_bits):
                # a branch per row on random bits would mispredict more than the adds cost
                n_driven = 0
                for i in range(n_rows):
                    driven[n_driven] = i
                    n_driven += (inputs[i] >> j) & 1
                bit_sums = sums[j]
                sum_driven_rows(bit_sums, excess, driven, n_driven)
                if noisy:
                    bit_variances = variances[j]
                    sum_driven_rows(bit_variances, squared, driven, n_driven)
                    for k in range(n_columns):
                        bit_sums[k] = np.float32(bit_sums[k] + read_noise * np.sqrt(
                            np.float64(bit_variances[k])) * noise[p, j, k])
            totals[:] = 0  # sum_j 2^j code_j, exact in float64 (below 2^53)
            for j in range(activation_bits):
                bit_sums = sums[j]
                significance = np.float64(1 << j)
                for k in range(n_columns):
                    code = np.rint(np.float64(bit_sums[k]) / column_step[k])
                    totals[k] += min(max(code, 0.0), column_top[k]) * significance
            for k in range(n_columns):
                codes[p, columns[k]] += totals[k]

    return read_analog
