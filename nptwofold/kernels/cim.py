"""One layer on a 2-bit/cell RRAM compute-in-memory array (SPEC sections 5 and 6).

`map_layer` lays a layer's kept integer weights onto crossbar cells, `cim_matmul` simulates the
array bit by bit (output and energy events), and `count_events` counts the same events from
input popcounts alone, without partial sums. `cim_matmul_packed` gives exactly what
`cim_matmul` gives, computed on bit-packed words, fast enough for a whole network. Picojoules
are left to `nptwofold.hardware`.

Conventions
- A layer is an R x C integer matrix `levels`: row r = input, column c = output. For a conv,
  r is the PyTorch flatten of (Cin, kh, kw) (`layer_matrix`), the order of the LFSR masks.
- Column c uses the kept rows of its mask group, kept_rows[c // group], in LFSR order, compacted
  onto consecutive word lines. Row tile t holds compacted rows t*T .. t*T+T-1 (T = crossbar
  rows), so k kept rows span ceil(k / T) tiles, the last one possibly partial. Pruned weights
  are not stored, so their values in `levels` are ignored.
- Cells: a b-bit weight takes M = b/2 cells; cell m holds bits (2m+1, 2m) of the b-bit two's
  complement code as state 2*B(2m+1) + B(2m) in 0..3 (00, 01, 10, 11); the top cell holds the
  sign bit B(b-1).
- Inputs are unsigned a-bit integers applied bit-serially, j = 0..a-1: a word line is driven
  when bit j of its input is 1.

Arithmetic, per output position p, input bit j and column c:
  S[t, m] = sum of the states of cell m over the driven kept rows of tile t (analog partial sum)
  y_j     = sum_m 4^m sum_t ADC(S[t, m]) - 2^b * H
  y[p, c] = sum_j 2^j y_j
Reading every cell as unsigned gives the code U = sum_m 4^m state_m = q + 2^b B(b-1); the sign
bit weighs -2^(b-1), not +2^(b-1), so each driven negative weight needs -2^b. H is the number of
driven kept rows whose weight is negative: the top cell enters as 4^(M-1) (lo - 2 hi) =
4^(M-1) (state - 4 hi). H is counted digitally from the input bits and the stored sign bits:
exact, and free in the energy model **[assumption]**. With an ideal ADC, y = x @ q_masked.

ADC model (`adc_bits` = n): a partial sum lies in 0..3T, where T is the crossbar's row count
(the ADC is fixed in hardware and does not know how many rows a layer uses), and needs
range_bits = bit_length(3T) bits (9 for T = 128). With n = 0 or n >= range_bits the ADC is
ideal: ADC(S) = S. Otherwise step = 2^(range_bits - n) and
  ADC(S) = step * min(round_half_even(S / step), 2^n - 1),
rounding to the nearest step, ties to the even code, and clipping at the top code. Ties are
frequent (S is an integer), so rounding them up would bias every reading by step / 4 on
average; amplified by the shift-adds (4^m, 2^j) that bias alone ruined an 8-bit ADC.

Energy events (integers, so two computations of the same events agree exactly):
- activated cells per state: for every position, input bit and driven kept row, every cell of
  that row's weight in that column;
- ADC conversions: one per (position, input bit, column, cell, row tile); with
  `skip_zero_tiles` a tile with no driven row for that bit is not converted (its partial sum
  is 0, which any ADC reads as 0, so the output is unchanged);
- LFSR steps: the steps of the layer's mask sequence (rejected states included), once per
  output position; a dense layer has none.

Bit-packed evaluation (`cim_matmul_packed`): bit j of the inputs of position p is packed along
R, in the original row order, into 64-bit words X_j. For each column c, row tile t and cell m
two R-bit masks are packed once per call, set only on the kept rows of that tile: HI (the
cell's state has its high bit) and LO (its low bit). Then S[t, m] = 2 popcount(X_j & HI) +
popcount(X_j & LO), and H is the sum over tiles of popcount(X_j & HI) of the sign cell: the
same integers as the row loop, so the same outputs. An ideal ADC is linear, so there the tiles
are merged into one before summing (fewer words to visit, same sums). Its energy events come
from the counting path, which equals the simulation's.
"""
from typing import NamedTuple

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from ..errors import NptwofoldError
from .quant import check_bits, decompose

CELL_BITS = 2
N_CELL_STATES = 1 << CELL_BITS
MAX_CELL_STATE = N_CELL_STATES - 1
MAX_ACTIVATION_BITS = 16
WORD_BITS = 64  # rows per packed word of `cim_matmul_packed`
POSITIONS_PER_CHUNK = 64  # positions per parallel work item of `cim_matmul_packed`


class CrossbarLayer(NamedTuple):
    """A layer as stored on the array."""
    kept_rows: np.ndarray  # (n_groups, k) int64: each mask group's rows, in word-line order
    group: int             # columns per mask group: column c uses kept_rows[c // group]
    cells: np.ndarray      # (C, k, b/2) uint8: states of each column's kept weights, cell m
    bits: int              # b, weight bits
    n_rows: int            # R, inputs of the layer
    rows_per_tile: int     # T, crossbar rows
    lfsr_steps: int        # steps of the mask's LFSR sequence per output position, 0 if dense

    @property
    def n_tiles(self):
        return -(-self.kept_rows.shape[1] // self.rows_per_tile)


class EnergyCounts(NamedTuple):
    """Energy events of one layer over a batch of positions."""
    cell_state_counts: np.ndarray  # (4,) int64: activated cells in state 00, 01, 10, 11
    adc_conversions: int
    lfsr_steps: int


def layer_matrix(weights):
    """(R, C) view of conv OIHW or FC (out, in) weights; row r = PyTorch flatten of (I, kh, kw)."""
    weights = np.asarray(weights)
    return weights.reshape(weights.shape[0], -1).T


def adc_range_bits(rows_per_tile):
    """Bits of the largest partial sum of a tile, 3 * rows_per_tile."""
    return (MAX_CELL_STATE * rows_per_tile).bit_length()


def _check_int(name, value, minimum, maximum=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise NptwofoldError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f"..{maximum}"
        raise NptwofoldError(f"{name} must be in {minimum}{upper}, got {value}")
    return int(value)


def _check_integer_matrix(name, array):
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise NptwofoldError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
    return array


def map_layer(levels, bits, rows_per_tile, kept_rows=None, group=1, lfsr_steps=0):
    """Crossbar view of an (R, C) matrix of b-bit integer weights.

    kept_rows: (ceil(C / group), k) rows kept by each mask group (`LfsrKeepMask.kept_rows`),
    or None for a dense layer (every row, one group). lfsr_steps: `LfsrKeepMask.steps`.
    """
    levels = _check_integer_matrix("layer levels", levels)
    bits = check_bits(bits)
    rows_per_tile = _check_int("crossbar rows", rows_per_tile, 1)
    n_rows, n_cols = levels.shape
    if kept_rows is None:
        kept_rows, group = np.arange(n_rows)[None, :], n_cols
    group = _check_int("mask group", group, 1)
    kept_rows = _check_integer_matrix("kept rows", kept_rows).astype(np.int64)
    n_groups = -(-n_cols // group)
    if kept_rows.shape[0] != n_groups or kept_rows.shape[1] < 1:
        raise NptwofoldError(f"kept rows have shape {kept_rows.shape}; a {n_cols}-column layer "
                             f"with groups of {group} needs ({n_groups}, k >= 1)")
    if kept_rows.min() < 0 or kept_rows.max() >= n_rows:
        raise NptwofoldError(f"kept rows must lie in 0..{n_rows - 1}")
    if np.any(np.diff(np.sort(kept_rows, axis=1), axis=1) == 0):
        raise NptwofoldError("kept rows repeat a row within a group")
    columns = np.arange(n_cols)
    kept_levels = levels[kept_rows[columns // group], columns[:, None]]  # (C, k)
    planes = decompose(kept_levels, bits)  # (b, C, k)
    cells = planes[0::2] + 2 * planes[1::2]  # (b/2, C, k)
    return CrossbarLayer(np.ascontiguousarray(kept_rows), group,
                         np.ascontiguousarray(cells.transpose(1, 2, 0)), bits, n_rows,
                         rows_per_tile, _check_int("LFSR steps", lfsr_steps, 0))


def _check_inputs(layer, x, activation_bits):
    activation_bits = _check_int("activation bits", activation_bits, 1, MAX_ACTIVATION_BITS)
    x = _check_integer_matrix("CIM inputs", x)
    if x.shape[1] != layer.n_rows:
        raise NptwofoldError(f"CIM inputs have {x.shape[1]} rows, the layer has {layer.n_rows}")
    if x.size and (x.min() < 0 or x.max() >= 1 << activation_bits):
        raise NptwofoldError(f"CIM inputs must be unsigned {activation_bits}-bit integers "
                             f"(0..{(1 << activation_bits) - 1})")
    return np.ascontiguousarray(x, np.int64), activation_bits


def _adc_parameters(layer, adc_bits):
    """(shift, top code) of the ADC model for `_adc`; shift 0 is the ideal ADC."""
    adc_bits = _check_int("ADC bits", adc_bits, 0)
    range_bits = adc_range_bits(layer.rows_per_tile)
    adc_shift = range_bits - adc_bits if 0 < adc_bits < range_bits else 0
    return adc_shift, (1 << adc_bits) - 1 if adc_shift else 0


@numba.njit(cache=True)
def _adc(partial_sum, shift, max_code):
    if shift == 0:
        return partial_sum
    code = partial_sum >> shift
    remainder = partial_sum - (code << shift)
    half = 1 << (shift - 1)
    if remainder > half or (remainder == half and code & 1):
        code += 1
    return min(code, max_code) << shift


@numba.njit(cache=True)
def _simulate_kernel(x, kept_rows, group, cells, rows_per_tile, activation_bits, bits,
                     adc_shift, adc_max_code, skip_zero_tiles, out, cell_counts):
    """Fills `out` and `cell_counts`; returns the number of ADC conversions."""
    n_positions, n_rows = x.shape
    n_cols, kept, n_cells = cells.shape
    driven = np.empty(n_rows, np.uint8)
    partial_sums = np.empty(n_cells, np.int64)
    conversions = 0
    for p in range(n_positions):
        for j in range(activation_bits):
            for r in range(n_rows):
                driven[r] = (x[p, r] >> j) & 1
            for c in range(n_cols):
                rows = kept_rows[c // group]
                column_sum = 0
                driven_negative = 0
                for start in range(0, kept, rows_per_tile):
                    partial_sums[:] = 0
                    tile_driven = False
                    for i in range(start, min(start + rows_per_tile, kept)):
                        if driven[rows[i]]:
                            tile_driven = True
                            driven_negative += cells[c, i, n_cells - 1] >> 1
                            for m in range(n_cells):
                                state = cells[c, i, m]
                                partial_sums[m] += state
                                cell_counts[state] += 1
                    if tile_driven or not skip_zero_tiles:
                        conversions += n_cells
                    for m in range(n_cells):
                        column_sum += _adc(partial_sums[m], adc_shift, adc_max_code) << (2 * m)
                out[p, c] += (column_sum - (driven_negative << bits)) << j
    return conversions


def cim_matmul(layer, x, activation_bits, adc_bits=0, skip_zero_tiles=False):
    """Bit-serial array output of inputs x (P, R) and its energy events.

    Returns (y, counts): y is (P, C) int64, equal to x @ q_masked for an ideal ADC
    (adc_bits = 0 or >= adc_range_bits); counts is an EnergyCounts.
    """
    x, activation_bits = _check_inputs(layer, x, activation_bits)
    adc_shift, adc_max_code = _adc_parameters(layer, adc_bits)
    out = np.zeros((x.shape[0], layer.cells.shape[0]), np.int64)
    cell_counts = np.zeros(N_CELL_STATES, np.int64)
    conversions = _simulate_kernel(x, layer.kept_rows, layer.group, layer.cells,
                                   layer.rows_per_tile, activation_bits, layer.bits, adc_shift,
                                   adc_max_code, bool(skip_zero_tiles), out, cell_counts)
    return out, EnergyCounts(cell_counts, int(conversions), layer.lfsr_steps * x.shape[0])


@intrinsic
def _popcount(typingctx, value):
    """Number of 1 bits of an integer, as int64: LLVM's ctpop, one instruction on most CPUs."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, builder.ctpop(args[0]), value, types.int64)

    return types.int64(value), codegen


@numba.njit(cache=True)
def _count_kernel(x, kept_rows, group, cells, rows_per_tile, activation_bits, skip_zero_tiles,
                  cell_counts):
    """Fills `cell_counts`; returns the number of ADC conversions."""
    n_positions, n_rows = x.shape
    n_cols, kept, n_cells = cells.shape
    # A row's cells are activated once per 1-bit of its input, over all positions and bits.
    ones = np.zeros(n_rows, np.int64)
    for p in range(n_positions):
        for r in range(n_rows):
            ones[r] += _popcount(x[p, r])
    for c in range(n_cols):
        rows = kept_rows[c // group]
        for i in range(kept):
            for m in range(n_cells):
                cell_counts[cells[c, i, m]] += ones[rows[i]]
    n_tiles = (kept + rows_per_tile - 1) // rows_per_tile
    if not skip_zero_tiles:
        return n_positions * activation_bits * n_cols * n_cells * n_tiles
    # A tile is converted for bit j iff bit j of the OR of its inputs is 1; the columns of a
    # group share the tile's rows, so each group's tiles are scanned once.
    conversions = 0
    for g in range(kept_rows.shape[0]):
        group_cols = min(group, n_cols - g * group)
        rows = kept_rows[g]
        for start in range(0, kept, rows_per_tile):
            converted_bits = 0
            for p in range(n_positions):
                tile_bits = 0
                for i in range(start, min(start + rows_per_tile, kept)):
                    tile_bits |= x[p, rows[i]]
                converted_bits += _popcount(tile_bits)
            conversions += converted_bits * group_cols * n_cells
    return conversions


def count_events(layer, x, activation_bits, skip_zero_tiles=False):
    """The EnergyCounts of `cim_matmul(layer, x, ...)`, from input popcounts (no partial sums)."""
    x, activation_bits = _check_inputs(layer, x, activation_bits)
    return _count_checked_events(layer, x, activation_bits, skip_zero_tiles)


def _count_checked_events(layer, x, activation_bits, skip_zero_tiles):
    cell_counts = np.zeros(N_CELL_STATES, np.int64)
    conversions = _count_kernel(x, layer.kept_rows, layer.group, layer.cells,
                                layer.rows_per_tile, activation_bits, bool(skip_zero_tiles),
                                cell_counts)
    return EnergyCounts(cell_counts, int(conversions), layer.lfsr_steps * x.shape[0])


@numba.njit(parallel=True, cache=True)
def _pack_input_bits(x, activation_bits, n_words):
    """(P, a, W) uint64 words: bit r % 64 of word r // 64 of plane j is bit j of x[p, r]."""
    n_positions, n_rows = x.shape
    words = np.empty((n_positions, activation_bits, n_words), np.uint64)
    for p in prange(n_positions):
        for j in range(activation_bits):
            for w in range(n_words):
                word = np.uint64(0)
                # branch-free OR over the word's rows, which LLVM vectorizes
                for r in range(w * WORD_BITS, min((w + 1) * WORD_BITS, n_rows)):
                    word |= np.uint64((x[p, r] >> j) & 1) << np.uint64(r - w * WORD_BITS)
                words[p, j, w] = word
    return words


@numba.njit(cache=True)
def _pack_cell_masks(kept_rows, group, cells, tile_rows, n_words):
    """Masks (tiles, W, cells, 2, C) uint64 of the rows of each tile, cell and column whose
    state has its high bit (index 0) or low bit (1), and each tile's span of words (first,
    stop) over all groups, (tiles, 2): a dense layer's tiles are contiguous runs of rows, so a
    tile visits only its own words. Columns last: the kernel's inner loop runs over them."""
    n_cols, kept, n_cells = cells.shape
    n_tiles = (kept + tile_rows - 1) // tile_rows
    masks = np.zeros((n_tiles, n_words, n_cells, 2, n_cols), np.uint64)
    word_spans = np.empty((n_tiles, 2), np.int64)
    word_spans[:, 0] = n_words
    word_spans[:, 1] = 0
    for c in range(n_cols):
        rows = kept_rows[c // group]
        for i in range(kept):
            t = i // tile_rows
            word = rows[i] // WORD_BITS
            word_spans[t, 0] = min(word_spans[t, 0], word)
            word_spans[t, 1] = max(word_spans[t, 1], word + 1)
            row_bit = np.uint64(1) << np.uint64(rows[i] % WORD_BITS)
            for m in range(n_cells):
                state = cells[c, i, m]
                if state & 2:
                    masks[t, word, m, 0, c] |= row_bit
                if state & 1:
                    masks[t, word, m, 1, c] |= row_bit
    return masks, word_spans


@numba.njit(cache=True)
def _add_popcounts(word, masks, counts):
    """counts[i] += popcount(word & masks[i]): one contiguous loop, which LLVM vectorizes."""
    for i in range(counts.size):
        counts[i] += _popcount(word & masks[i])


@numba.njit(cache=True)
def _add_adc_readings(high, low, cell, adc_shift, adc_max_code, column_sums):
    """column_sums[c] += 4^cell ADC(2 high[c] + low[c]), over the columns in one loop."""
    for c in range(column_sums.size):
        column_sums[c] += _adc(2 * high[c] + low[c], adc_shift, adc_max_code) << (2 * cell)


@numba.njit(parallel=True, cache=True)
def _packed_kernel(input_words, cell_masks, word_spans, bits, adc_shift, adc_max_code, out):
    """Fills `out` (P, C) with the shift-and-add of `_simulate_kernel`, from popcounts."""
    n_positions = input_words.shape[0]
    n_tiles, _, n_cells, _, n_cols = cell_masks.shape
    n_chunks = (n_positions + POSITIONS_PER_CHUNK - 1) // POSITIONS_PER_CHUNK
    for chunk in prange(n_chunks):
        # driven rows of each tile, cell and column whose state has the high (index 0) or low
        # (1) bit; allocated once per chunk, not per position (thousands per call)
        counts = np.empty((n_tiles, n_cells, 2, n_cols), np.int64)
        column_sums = np.empty(n_cols, np.int64)
        for p in range(chunk * POSITIONS_PER_CHUNK,
                       min((chunk + 1) * POSITIONS_PER_CHUNK, n_positions)):
            _packed_position(input_words[p], cell_masks, word_spans, bits, adc_shift,
                             adc_max_code, counts, column_sums, out[p])


@numba.njit(cache=True)
def _packed_position(words, cell_masks, word_spans, bits, adc_shift, adc_max_code, counts,
                     column_sums, out):
    """`out` (C,) of one position from its packed input bits `words` (a, W)."""
    activation_bits = words.shape[0]
    n_tiles, _, n_cells, _, n_cols = cell_masks.shape
    sign_cell = n_cells - 1
    out[:] = 0
    for j in range(activation_bits):
        counts[:] = 0
        for t in range(n_tiles):
            # every cell's high and low masks of a word in one contiguous loop
            tile_counts = counts[t].reshape(-1)
            for w in range(word_spans[t, 0], word_spans[t, 1]):
                word = words[j, w]
                if word == 0:  # common: high input bits and ReLU zeros
                    continue
                _add_popcounts(word, cell_masks[t, w].reshape(-1), tile_counts)
        column_sums[:] = 0
        for t in range(n_tiles):
            for m in range(n_cells):
                _add_adc_readings(counts[t, m, 0], counts[t, m, 1], m, adc_shift,
                                  adc_max_code, column_sums)
            for c in range(n_cols):
                # each driven row whose sign bit is 1 weighs -2^(b-1), not +2^(b-1)
                column_sums[c] -= counts[t, sign_cell, 0, c] << bits
        for c in range(n_cols):
            out[c] += column_sums[c] << j


def cim_matmul_packed(layer, x, activation_bits, adc_bits=0, skip_zero_tiles=False):
    """`cim_matmul` computed on bit-packed words: the same (y, counts), exactly.

    Parallel over output positions (Numba threads). The energy events come from the counting
    path of `count_events`, which the tests hold equal to the simulation's.
    """
    x, activation_bits = _check_inputs(layer, x, activation_bits)
    adc_shift, adc_max_code = _adc_parameters(layer, adc_bits)
    n_words = -(-layer.n_rows // WORD_BITS)
    # An ideal ADC reads any sum exactly, so the tiles' sums may be added first: one tile.
    tile_rows = layer.rows_per_tile if adc_shift else layer.kept_rows.shape[1]
    cell_masks, word_spans = _pack_cell_masks(layer.kept_rows, layer.group, layer.cells,
                                              tile_rows, n_words)
    out = np.empty((x.shape[0], layer.cells.shape[0]), np.int64)
    _packed_kernel(_pack_input_bits(x, activation_bits, n_words), cell_masks, word_spans,
                   layer.bits, adc_shift, adc_max_code, out)
    return out, _count_checked_events(layer, x, activation_bits, skip_zero_tiles)
