"""LFSR keep-masks (docs/method.md): which rows of a layer matrix each output column keeps.

A layer is an R x C matrix (R = Cin*kh*kw input rows, C = Cout output columns). A maximal-length
Fibonacci LFSR of width n walks the states 1..2^n-1; state v names row v-1, and states naming no
row (v-1 >= R) are rejected but still cost a step. Columns are taken in groups of `group`; group
j keeps the in-range rows number j*k .. j*k+k-1 of the layer's one continuous sequence, so the
mask is fully regenerated from (n, taps, seed, k, R, C, group).

Conventions:
- State bit i-1 holds register stage Q_i (taps are numbered 1..n as in the table). One step
  shifts Q_i into Q_{i+1}, drops Q_n and feeds the XOR of the tapped stages into Q_1.
- Steps: the seed is the first state visited, and visiting T states costs T steps, whether
  the state is kept or rejected.
- Rounding: k = R - floor(p*R + 0.5) in float64 (halves round up, not to even).
"""

import math
from typing import NamedTuple

import numba
import numpy as np

from ..errors import NptwofoldError

# Maximal-length taps, Xilinx XAPP052 (P. Alfke, "Efficient Shift Registers, LFSR Counters, and
# Long Pseudo-Random Sequence Generators", 1996), Table 3, taps numbered 1..n. The table is
# given for XNOR feedback (lock-up state all ones); we use XOR feedback (lock-up state all
# zeros), which is maximal-length with the same taps. Table 3 starts at n = 3; n = 2 uses
# x^2 + x + 1, the only primitive polynomial of degree 2.
LFSR_TAPS = {
    2: (2, 1), 3: (3, 2), 4: (4, 3), 5: (5, 3), 6: (6, 5), 7: (7, 6), 8: (8, 6, 5, 4),
    9: (9, 5), 10: (10, 7), 11: (11, 9), 12: (12, 6, 4, 1), 13: (13, 4, 3, 1),
    14: (14, 5, 3, 1), 15: (15, 14), 16: (16, 15, 13, 4), 17: (17, 14), 18: (18, 11),
    19: (19, 6, 2, 1), 20: (20, 17), 21: (21, 19), 22: (22, 21), 23: (23, 18),
    24: (24, 23, 22, 17), 25: (25, 22), 26: (26, 6, 2, 1), 27: (27, 5, 2, 1), 28: (28, 25),
    29: (29, 27), 30: (30, 6, 4, 1), 31: (31, 28), 32: (32, 22, 2, 1),
}
MIN_WIDTH, MAX_WIDTH = min(LFSR_TAPS), max(LFSR_TAPS)


def feedback_mask(taps):
    """Bitmask of the tapped stages: tap t (1..n) is bit t-1."""
    return sum(1 << (t - 1) for t in set(taps))


@numba.njit(cache=True)
def lfsr_step(state, width, feedback):
    """One Fibonacci step of `state` (1..2^width-1) with tap bitmask `feedback`."""
    tapped = state & feedback
    # Fold the tapped bits down to their parity; states have at most 32 bits.
    tapped ^= tapped >> 16
    tapped ^= tapped >> 8
    tapped ^= tapped >> 4
    tapped ^= tapped >> 2
    tapped ^= tapped >> 1
    return ((state << 1) | (tapped & 1)) & ((1 << width) - 1)


@numba.njit(cache=True)
def lfsr_in_range_rows(seed, width, feedback, n_rows, count):
    """First `count` in-range rows (state v names row v-1 < n_rows) of the walk from `seed`.

    Returns (rows, steps): rows is an int64 array of length `count`; steps is the number of
    states visited, the seed and rejected states included, up to and including the state that
    gave the last row. Needs a maximal-length `feedback`, else the walk may never end.
    """
    rows = np.empty(count, np.int64)
    state = seed
    found = 0
    steps = 0
    while found < count:
        steps += 1
        if state - 1 < n_rows:
            rows[found] = state - 1
            found += 1
        state = lfsr_step(state, width, feedback)
    return rows, steps


def lfsr_width_for_rows(n_rows):
    """Smallest width n >= 2 with 2^n - 1 >= n_rows."""
    if n_rows < 1:
        raise NptwofoldError(f"LFSR needs at least 1 row, got {n_rows}")
    width = max(MIN_WIDTH, int(n_rows).bit_length())
    if width > MAX_WIDTH:
        raise NptwofoldError(f"{n_rows} rows need an LFSR wider than {MAX_WIDTH} bits")
    return width


def kept_per_column(n_rows, sparsity):
    """k = R - round(p*R), with round(x) = floor(x + 0.5) so halves round up."""
    if not 0.0 <= sparsity < 1.0:  # also rejects NaN
        raise NptwofoldError(f"sparsity must be in [0, 1), got {sparsity}")
    kept = n_rows - math.floor(sparsity * n_rows + 0.5)
    if kept < 1:
        raise NptwofoldError(
            f"sparsity {sparsity} keeps no row of a {n_rows}-row layer; lower the sparsity")
    return kept


def _mulmod_gf2(a, b, poly, degree):
    """a*b mod poly over GF(2); polynomials are ints, bit i = coefficient of x^i."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a >> degree & 1:
            a ^= poly
    return product


def _x_power_mod(exponent, poly, degree):
    result, square = 1, 2
    while exponent:
        if exponent & 1:
            result = _mulmod_gf2(result, square, poly, degree)
        square = _mulmod_gf2(square, square, poly, degree)
        exponent >>= 1
    return result


def _prime_factors(value):
    factors, divisor = set(), 2
    while divisor * divisor <= value:
        while value % divisor == 0:
            factors.add(divisor)
            value //= divisor
        divisor += 1
    if value > 1:
        factors.add(value)
    return factors


def is_maximal_length(width, taps):
    """Whether feedback polynomial 1 + sum x^t (t in taps) is primitive, i.e. period 2^n - 1.

    Primitive iff x has order exactly 2^n - 1 modulo the polynomial.
    """
    poly = 1 | feedback_mask(taps) << 1
    period = (1 << width) - 1
    return (_x_power_mod(period, poly, width) == 1
            and all(_x_power_mod(period // f, poly, width) != 1 for f in _prime_factors(period)))


def _checked_taps(width, taps):
    if taps is None:
        return LFSR_TAPS[width]
    taps = tuple(sorted({int(t) for t in taps}, reverse=True))
    if not all(1 <= t <= width for t in taps):
        raise NptwofoldError(f"LFSR taps {taps} must lie in 1..{width}")
    if not taps or taps[0] != width:
        raise NptwofoldError(f"LFSR taps {taps} must include the width {width}")
    if not is_maximal_length(width, taps):
        raise NptwofoldError(f"LFSR taps {taps} are not maximal-length for width {width}")
    return taps


class LfsrKeepMask(NamedTuple):
    """A layer's keep-mask and everything needed to regenerate it."""
    mask: np.ndarray       # (R, C) uint8, 1 = kept
    kept_rows: np.ndarray  # (n_groups, k) int64: rows kept by each group, in LFSR order
    steps: int             # LFSR steps to produce every group's rows, rejections included
    kept: int              # k, rows kept per column
    seed: int
    group: int
    width: int
    taps: tuple


def _check_layer_shape(n_rows, n_cols):
    if n_rows < 1 or n_cols < 1:
        raise NptwofoldError(f"layer matrix must have at least 1 row and column, got "
                             f"{n_rows} x {n_cols}")


def lfsr_keep_mask_for_kept(n_rows, n_cols, kept, seed, group=1, width=None, taps=None):
    """Keep-mask from the stored parameters (R, C, k, seed, group, n, taps).

    `width` defaults to the smallest fitting one and `taps` to the XAPP052 entry for it.
    """
    _check_layer_shape(n_rows, n_cols)
    if not 1 <= kept <= n_rows:
        raise NptwofoldError(f"rows kept per column must be in 1..{n_rows}, got {kept}")
    if group < 1:
        raise NptwofoldError(f"mask group must be at least 1 column, got {group}")
    if width is None:
        width = lfsr_width_for_rows(n_rows)
    if width not in LFSR_TAPS:
        raise NptwofoldError(f"LFSR width must be in {MIN_WIDTH}..{MAX_WIDTH}, got {width}")
    if (1 << width) - 1 < n_rows:
        raise NptwofoldError(f"LFSR width {width} is too small for {n_rows} rows")
    if not 1 <= seed < 1 << width:
        raise NptwofoldError(f"LFSR seed must be in 1..{(1 << width) - 1}, got {seed}")
    taps = _checked_taps(width, taps)

    n_groups = -(-n_cols // group)
    rows, steps = lfsr_in_range_rows(int(seed), int(width), feedback_mask(taps), int(n_rows),
                                     n_groups * kept)
    kept_rows = rows.reshape(n_groups, kept)
    mask = np.zeros((n_rows, n_cols), np.uint8)
    columns = np.arange(n_cols)
    mask[kept_rows[columns // group], columns[:, None]] = 1
    return LfsrKeepMask(mask, kept_rows, int(steps), int(kept), int(seed), int(group),
                        int(width), taps)


def lfsr_keep_mask(n_rows, n_cols, sparsity, seed, group=1, width=None, taps=None):
    """Keep-mask of an R x C layer at network sparsity p: each column keeps k = R - round(p*R)."""
    _check_layer_shape(n_rows, n_cols)  # before k, whose own error would hide a bad shape
    return lfsr_keep_mask_for_kept(n_rows, n_cols, kept_per_column(n_rows, sparsity), seed,
                                   group, width, taps)


def weight_mask(mask, weight_shape):
    """(R, C) layer mask as a weight mask: OIHW for convs, (out, in) for FC.

    Row r is the flattened (I, kh, kw) index in PyTorch order and column c is output channel c.
    """
    return mask.T.reshape(weight_shape)
