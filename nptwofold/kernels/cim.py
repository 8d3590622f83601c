"""One layer on a 2-bit/cell RRAM compute-in-memory array (SPEC sections 5 to 7).

This module is the one home of the crossbar conventions: cell states, the layer matrix and its
row order, how each signed-weight encoding lays a weight onto cells, the physical mapping of
kept rows onto word lines, the ADC model and the energy events. `map_layer` builds a
`Crossbar`; `cim_matmul` simulates it bit by bit (outputs and energy events, the reference);
`count_events` counts the same events from input popcounts; `PackedCrossbar.matmul` gives
exactly what `cim_matmul` gives, on bit-packed words, fast enough for a whole network.
Picojoules are left to `nptwofold.hardware`.

Layer matrix
- An (R x C) integer matrix of weight levels q: row r = input, column c = output channel. A
  conv's rows run in the im2col order (ky, kx, ci) of `kernels.conv.weight_as_matrix`, so the
  array's inputs are the im2col patches as they are. LFSR masks name rows in the PyTorch flatten
  (ci, ky, kx); `matrix_rows` converts them once, when a layer is mapped.

Physical mapping (SPEC 7)
- Output channels are laid on column tiles of `crossbar_cols` columns, `outputs_per_tile` channels
  each (the encoding fixes the columns per channel, below). A word line carries one input to
  every column of its tile, so a tile stores every row kept by any of its channels: the union of
  their kept rows, in ascending matrix order. A channel's pruned weights on those rows are
  stored as the level 0. The stored rows are split into row tiles of `crossbar_rows` word lines
  (the last may be partial); one (column tile, row tile) pair is one physical crossbar.

Signed-weight encodings (M = b/2 cells per magnitude; cell m holds bits (2m+1, 2m) of an
unsigned code as state 2 B(2m+1) + B(2m), 00..11):
- twos_complement: M columns hold the b-bit two's complement code u = q mod 2^b read as
  unsigned (weight 4^m), and one sign column holds 01 where q < 0 (weight -2^b): u - 2^b
  [q < 0] = q. M + 1 columns per channel.
- offset_binary (NeuroSim's weight shift): M columns hold u = q + 2^(b-1) (weight 4^m); one
  reference column per column tile holds 10 on every stored row at the top significance (weight
  -4^(M-1)), so its reading, 2 x (driven rows), removes the offset 2^(b-1) of every driven row
  from all the tile's channels. A pruned weight is stored as the offset (top cell 10).
- sign_magnitude (differential): a positive and a negative group of M columns each hold |q|
  (weights +4^m and -4^m); the idle one stores 00. 2M columns per channel.

Arithmetic, per output position p, input bit j (a word line is driven when bit j of its input
is 1) and physical column k of tile tau:
  S[t, k] = sum of the states of column k's cells on the driven stored rows of row tile t
  Q[p, k] = sum_j 2^j sum_t code_k(S[t, k])
  y[p, c] = sum over the columns k of channel c, and the reference column of its tile,
            of coefficient_k * step_k * Q[p, k]            (float64, a fixed order)
With an ideal ADC, code(S) = S, step = 1 and y = x @ q exactly.

ADC (`AdcSteps`): code(S) = min(round_half_even(S / step), top_code), the reading code x step.
Uniform steps, round to nearest, clip at the top code. Ideal: step 1, no top code. The steps
are per physical column; `nptwofold.hardware` sets them (fixed full scale or calibrated ranges).

Energy events (integers, so two computations of the same events agree exactly):
- activated cells per state: for every position, input bit and driven stored row of a tile,
  every cell on that word line in the tile, sign and reference columns and 00 cells included;
- ADC conversions: one per (position, input bit, physical column, row tile of its column
  tile); with `skip_zero_tiles` a row tile with no driven row for that bit is not converted
  (its partial sums are 0, which any ADC reads as 0, so the output is unchanged);
- LFSR steps: `Crossbar.lfsr_steps` per output position (set by the caller from the masks).

Bit-packed evaluation: bit j of the inputs of position p is packed along R into 64-bit words.
Each crossbar (block) has, per word and physical column, a HI and a LO mask of the stored rows
whose cell state has the high or low bit; S = 2 popcount(X & HI) + popcount(X & LO), read by
the ADC (`_adc_code`'s arithmetic) in the same vector loop, for every input bit j at once (a
zero word gives S = 0, read as the code 0 by any ADC). An ADC that reads every sum a column can
reach exactly (the ideal one, or steps of 1 with top codes at or above
`Crossbar.largest_partial_sums`) is linear: sum_j 2^j sum_t S = sum_r x_r cells[k, r], so
there Q is one exact matmul of the integer inputs with the cell states (in a float type that
holds every sum exactly), with no bit-serial pass. An ADC of steps of 1 whose top code a
column could exceed reads min(S, top) = S - max(S - top, 0): the exact matmul, less the
excess of the few partial sums above the top (`_clipping_kernel`; S is at most 3 x the driven
rows, so most crossbars are ruled out by one popcount). Work is split over output positions
in fixed chunks, and every per-chunk partial result is an exact integer, so results do not
depend on the thread count.
"""
import functools
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from ..checks import check_integer
from ..errors import NptwofoldError
from ..threads import image_chunks, run_parallel
from .conv import weight_as_matrix
from .quant import ENCODINGS, check_bits, max_level

CELL_BITS = 2
CELL_STATES = ("00", "01", "10", "11")
N_CELL_STATES = len(CELL_STATES)
MAX_CELL_STATE = N_CELL_STATES - 1
MAX_ACTIVATION_BITS = 16
WORD_BITS = 64            # rows per packed word
POSITIONS_PER_CHUNK = 64  # positions per parallel work item
EXACT_POSITIONS_PER_CHUNK = 1024  # positions per matmul of an exact (ideal) reading
IDEAL_TOP_CODE = np.iinfo(np.int64).max


class Crossbar(NamedTuple):
    """A layer as the array stores it (see the module docstring)."""
    bits: int
    encoding: str
    n_rows: int               # R, inputs of the layer
    n_outputs: int            # C, output channels
    rows_per_tile: int        # word lines per crossbar
    outputs_per_tile: int     # output channels per column tile
    cells: np.ndarray         # (K, R) uint8: state of physical column k's cell on matrix row r
    stored: np.ndarray        # (column tiles, R) bool: rows a column tile stores (the union)
    column_tile: np.ndarray   # (K,) int64
    output_of: np.ndarray     # (K,) int64: channel of column k, -1 for a tile's reference column
    coefficient: np.ndarray   # (K,) int64: digital weight of the column's readings
    channel: np.ndarray       # (K,) int64: ADC calibration channel (`adc_channels`)
    lfsr_steps: int           # LFSR steps per output position, 0 if nothing is routed

    @property
    def n_columns(self):
        return self.cells.shape[0]

    @property
    def n_column_tiles(self):
        return self.stored.shape[0]

    @property
    def kept_rows_per_tile(self):
        """(column tiles,) rows stored by each column tile."""
        return self.stored.sum(axis=1)

    @property
    def n_row_tiles(self):
        """(column tiles,) row tiles of each column tile."""
        return -(-self.kept_rows_per_tile // self.rows_per_tile)

    @property
    def largest_partial_sums(self):
        """(K,) int64: the largest partial sum each column can produce (every stored row of
        its fullest row tile driven), at most 3T."""
        row_tile = self.row_tile[self.column_tile]  # (K, R), -1 where not stored
        largest = np.zeros(self.n_columns, np.int64)
        for tile in range(int(self.n_row_tiles.max(initial=0))):
            largest = np.maximum(largest, np.where(row_tile == tile, self.cells, 0).sum(
                axis=1, dtype=np.int64))
        return largest

    @property
    def row_tile(self):
        """(column tiles, R) int64: row tile of each stored row, -1 where not stored."""
        rank = np.cumsum(self.stored, axis=1) - 1
        return np.where(self.stored, rank // self.rows_per_tile, -1).astype(np.int64)


class AdcSteps(NamedTuple):
    """Per physical column: the reading of one code (step) and the top code."""
    step: np.ndarray  # (K,) float64
    top: np.ndarray   # (K,) int64

    def is_ideal(self, crossbar, largest_sums=None):
        """True if every partial sum the crossbar can produce is read exactly: steps of 1 and
        top codes at or above 3T, or above each column's `largest_sums` when given."""
        largest = MAX_CELL_STATE * crossbar.rows_per_tile if largest_sums is None else \
            largest_sums
        return bool(np.all(self.step == 1.0) and np.all(self.top >= largest))


class EnergyCounts(NamedTuple):
    """Energy events of one layer over a batch of positions."""
    cell_state_counts: np.ndarray  # (4,) int64: activated cells in state 00, 01, 10, 11
    adc_conversions: int
    lfsr_steps: int

    def __add__(self, other):
        return EnergyCounts(self.cell_state_counts + other.cell_state_counts,
                            self.adc_conversions + other.adc_conversions,
                            self.lfsr_steps + other.lfsr_steps)

    @classmethod
    def zero(cls):
        return cls(np.zeros(N_CELL_STATES, np.int64), 0, 0)


# --- layer matrix and encodings ------------------------------------------------------------

def layer_matrix(weights):
    """(R, C) view of conv OIHW (rows (ky, kx, ci), the im2col order) or FC (out, in) weights."""
    weights = np.asarray(weights)
    if weights.ndim == 4:
        return weight_as_matrix(weights)
    return weights.T


def matrix_rows(pytorch_rows, weight_shape):
    """Matrix rows of rows named in the PyTorch flatten (ci, ky, kx) of a weight of this shape."""
    pytorch_rows = np.asarray(pytorch_rows, np.int64)
    if len(weight_shape) != 4:
        return pytorch_rows
    in_channels, height, width = weight_shape[1:]
    channel, kernel_position = np.divmod(pytorch_rows, height * width)
    return kernel_position * in_channels + channel


def cells_per_magnitude(bits):
    return check_bits(bits) // CELL_BITS


def adc_channels(encoding, bits):
    """Names of the ADC calibration channels of an encoding (one per kind of column)."""
    cells = range(cells_per_magnitude(bits))
    if encoding == "twos_complement":
        return [f"code{m}" for m in cells] + ["sign"]
    if encoding == "offset_binary":
        return [f"code{m}" for m in cells] + ["reference"]
    if encoding == "sign_magnitude":
        return [f"positive{m}" for m in cells] + [f"negative{m}" for m in cells]
    raise NptwofoldError(f"unknown weight encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def columns_per_output(encoding, bits):
    """(columns per output channel, shared columns per column tile) of an encoding."""
    cells = cells_per_magnitude(bits)
    adc_channels(encoding, bits)  # rejects an unknown encoding
    return {"twos_complement": (cells + 1, 0), "offset_binary": (cells, 1),
            "sign_magnitude": (2 * cells, 0)}[encoding]


def outputs_per_tile(encoding, bits, crossbar_cols):
    """Output channels one column tile holds; raises if not even one fits."""
    per_output, shared = columns_per_output(encoding, bits)
    outputs = (crossbar_cols - shared) // per_output
    if outputs < 1:
        raise NptwofoldError(f"a {bits}-bit weight in {encoding} needs {per_output + shared} "
                             f"columns, more than the crossbar's {crossbar_cols}")
    return outputs


def _cell_states(codes, bits):
    """(M, *shape) states of unsigned codes, cell m = bits (2m+1, 2m)."""
    shifts = CELL_BITS * np.arange(cells_per_magnitude(bits)).reshape(-1, *[1] * codes.ndim)
    return ((codes[None] >> shifts) & MAX_CELL_STATE).astype(np.uint8)


def _encoded_columns(levels, encoding, bits):
    """Per output channel, its columns' states (C, per_output, R), coefficients and channels."""
    cells = cells_per_magnitude(bits)
    q = levels.T.astype(np.int64)  # (C, R)
    significance = 4 ** np.arange(cells, dtype=np.int64)
    if encoding == "twos_complement":
        states = np.concatenate([_cell_states(q & ((1 << bits) - 1), bits),
                                 (q < 0)[None].astype(np.uint8)])
        coefficient = np.append(significance, -(1 << bits))
    elif encoding == "offset_binary":
        states = _cell_states(q + (1 << (bits - 1)), bits)
        coefficient = significance
    else:
        states = np.concatenate([_cell_states(np.where(q > 0, q, 0), bits),
                                 _cell_states(np.where(q < 0, -q, 0), bits)])
        coefficient = np.concatenate([significance, -significance])
    return states.transpose(1, 0, 2), coefficient, np.arange(len(coefficient))


def weight_cells(levels, bits, encoding):
    """(columns per weight, *levels.shape) uint8: the state of the cell each of a weight's
    columns holds on the weight's row (offset binary's shared reference column left out)."""
    levels = np.asarray(levels)
    states = _encoded_columns(levels.reshape(-1, 1), encoding, check_bits(bits))[0][0]
    return np.ascontiguousarray(states.reshape((-1,) + levels.shape))


def map_layer(levels, bits, rows_per_tile, crossbar_cols, encoding="twos_complement",
              keep=None, lfsr_steps=0):
    """Crossbar of an (R, C) matrix of b-bit integer levels (module docstring).

    keep: (R, C) bool, the kept weights in matrix row order, or None for a dense layer. Pruned
    weights are stored as the level 0 on the rows their column tile stores.
    lfsr_steps: LFSR steps per output position needed to route this layer's stored rows.
    """
    levels = _check_integer_matrix("layer levels", levels)
    bits = check_bits(bits)
    rows_per_tile = check_integer("crossbar rows", rows_per_tile, 1)
    crossbar_cols = check_integer("crossbar columns", crossbar_cols, 1)
    n_rows, n_outputs = levels.shape
    qmax = max_level(bits)
    if levels.size and np.abs(levels).max() > qmax:
        raise NptwofoldError(f"layer levels must lie in -{qmax}..{qmax} for {bits}-bit weights")
    if keep is None:
        keep = np.ones(levels.shape, bool)
    keep = np.asarray(keep, bool)
    if keep.shape != levels.shape:
        raise NptwofoldError(f"keep mask has shape {keep.shape}, the layer {levels.shape}")
    per_tile = outputs_per_tile(encoding, bits, crossbar_cols)
    states, coefficient, channel = _encoded_columns(np.where(keep, levels, 0), encoding, bits)
    tiles = range(0, n_outputs, per_tile)
    stored = np.array([keep[:, start:start + per_tile].any(axis=1) for start in tiles])
    cells, coefficients, channels, column_tile, output_of = [], [], [], [], []
    for tile, start in enumerate(tiles):
        outputs = range(start, min(start + per_tile, n_outputs))
        for output in outputs:
            cells.append(states[output])
            coefficients.append(coefficient)
            channels.append(channel)
            output_of.append(np.full(len(coefficient), output))
            column_tile.append(np.full(len(coefficient), tile))
        if encoding == "offset_binary":
            cells.append(np.full((1, n_rows), 2, np.uint8))  # the offset 2 x 4^(M-1)
            coefficients.append([-(4 ** (cells_per_magnitude(bits) - 1))])
            channels.append([len(coefficient)])
            output_of.append([-1])
            column_tile.append([tile])
    cells = np.concatenate(cells) * stored[np.concatenate(column_tile)]
    return Crossbar(bits, encoding, n_rows, n_outputs, rows_per_tile, per_tile,
                    np.ascontiguousarray(cells, np.uint8), np.ascontiguousarray(stored),
                    *(np.concatenate(a).astype(np.int64)
                      for a in (column_tile, output_of, coefficients, channels)),
                    check_integer("LFSR steps", lfsr_steps, 0))


# --- ADC ------------------------------------------------------------------------------------

def adc_range_bits(rows_per_tile):
    """Bits of the largest partial sum of a tile, 3 * rows_per_tile."""
    return (MAX_CELL_STATE * rows_per_tile).bit_length()


def ideal_adc(crossbar):
    return AdcSteps(np.ones(crossbar.n_columns), np.full(crossbar.n_columns, IDEAL_TOP_CODE))


def fixed_adc(crossbar, adc_bits):
    """ADC of fixed full scale 0..3T (it does not know a layer's ranges): step 2^(range_bits -
    n), ideal for n = 0 or n >= range_bits."""
    adc_bits = check_integer("ADC bits", adc_bits, 0)
    range_bits = adc_range_bits(crossbar.rows_per_tile)
    if adc_bits == 0 or adc_bits >= range_bits:
        return ideal_adc(crossbar)
    return AdcSteps(np.full(crossbar.n_columns, float(1 << (range_bits - adc_bits))),
                    np.full(crossbar.n_columns, (1 << adc_bits) - 1))


def calibrated_adc(crossbar, adc_bits, full_scale):
    """ADC whose top code reads `full_scale[channel]` (partial-sum units, one per ADC channel):
    step = max(1, full_scale / (2^n - 1)); a step below 1 would resolve nothing more."""
    adc_bits = check_integer("ADC bits", adc_bits, 0)
    if adc_bits == 0:
        return ideal_adc(crossbar)
    full_scale = np.asarray(full_scale, np.float64)
    if full_scale.shape != (len(adc_channels(crossbar.encoding, crossbar.bits)),):
        raise NptwofoldError(f"full scales have shape {full_scale.shape}, the encoding "
                             f"{crossbar.encoding} has {len(adc_channels(crossbar.encoding, crossbar.bits))} ADC channels")
    top = (1 << adc_bits) - 1
    step = np.maximum(1.0, full_scale / top)[crossbar.channel]
    return AdcSteps(step, np.full(crossbar.n_columns, top))


def full_scale_at_percentile(histogram, percentile):
    """Smallest partial sum at or below which `percentile` % of the counted readings lie, per
    channel, from (channels, 3T + 1) histograms; at least 1."""
    histogram = np.asarray(histogram, np.int64)
    cumulative = np.cumsum(histogram, axis=1)
    totals = cumulative[:, -1:]
    reached = cumulative * 100.0 >= percentile * np.maximum(totals, 1)
    return np.maximum(reached.argmax(axis=1), 1).astype(np.float64)


# --- input checks -------------------------------------------------------------------------

def _check_integer_matrix(name, array):
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise NptwofoldError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
    return array


def _check_inputs(crossbar, x, activation_bits):
    activation_bits = check_integer("activation bits", activation_bits, 1, MAX_ACTIVATION_BITS)
    x = _check_integer_matrix("CIM inputs", x)
    if x.shape[1] != crossbar.n_rows:
        raise NptwofoldError(f"CIM inputs have {x.shape[1]} rows, the layer has {crossbar.n_rows}")
    if x.size and (x.min() < 0 or x.max() >= 1 << activation_bits):
        raise NptwofoldError(f"CIM inputs must be unsigned {activation_bits}-bit integers "
                             f"(0..{(1 << activation_bits) - 1})")
    return np.ascontiguousarray(x), activation_bits


def _check_adc(crossbar, adc):
    if adc is None:
        return ideal_adc(crossbar)
    if not isinstance(adc, AdcSteps) or adc.step.shape != (crossbar.n_columns,):
        raise NptwofoldError("the ADC must be AdcSteps with one step per physical column")
    return adc


# --- kernels --------------------------------------------------------------------------------

@intrinsic
def _popcount(typingctx, value):
    """Number of 1 bits of an integer, as int64: LLVM's ctpop (vectorised with AVX-512)."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, builder.ctpop(args[0]), value, types.int64)

    return types.int64(value), codegen


@numba.njit(cache=True)
def _adc_code(partial_sum, step, top):
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
                    codes[p, k] += _adc_code(sums[t], step[k], top[k]) << j
    return conversions


def cim_matmul(crossbar, x, activation_bits, adc=None, skip_zero_tiles=False):
    """Bit-serial array output of integer inputs x (P, R) and its energy events, row by row.

    Returns (y, counts): y is (P, C) float64, equal to x @ q_kept for an ideal ADC (adc None);
    counts is an EnergyCounts.
    """
    x, activation_bits = _check_inputs(crossbar, x, activation_bits)
    adc = _check_adc(crossbar, adc)
    codes = np.zeros((x.shape[0], crossbar.n_columns), np.int64)
    cell_counts = np.zeros(N_CELL_STATES, np.int64)
    conversions = _simulate_kernel(x, crossbar.cells, crossbar.stored, crossbar.row_tile,
                                   crossbar.n_row_tiles, crossbar.column_tile, activation_bits,
                                   adc.step, adc.top, bool(skip_zero_tiles), codes, cell_counts)
    return (_combine(crossbar, codes, adc),
            EnergyCounts(cell_counts, int(conversions), crossbar.lfsr_steps * x.shape[0]))


def _combine(crossbar, codes, adc):
    out = np.empty((codes.shape[0], crossbar.n_outputs))
    _combine_kernel(codes, crossbar.coefficient, adc.step, crossbar.output_of,
                    crossbar.column_tile, crossbar.outputs_per_tile, out)
    return out


def _blocks(crossbar):
    """Crossbars (column tile, row tile) as (rows (n,) bool per block (B, R), first column,
    columns)."""
    row_tile = crossbar.row_tile
    rows, first, count = [], [], []
    starts = np.searchsorted(crossbar.column_tile, np.arange(crossbar.n_column_tiles))
    columns = np.bincount(crossbar.column_tile, minlength=crossbar.n_column_tiles)
    for tile, n_tiles in enumerate(crossbar.n_row_tiles):
        for t in range(n_tiles):
            rows.append(row_tile[tile] == t)
            first.append(starts[tile])
            count.append(columns[tile])
    return np.array(rows).reshape(-1, crossbar.n_rows), np.array(first), np.array(count)


@numba.njit(parallel=True, cache=True)
def _count_kernel(x, row_cells, block_rows, block_columns, activation_bits, skip_zero_tiles,
                  chunk_ones, chunk_conversions):
    """Per chunk of positions: each row's 1-bits (chunk_ones) and, with skip_zero_tiles, each
    block's converted bits (chunk_conversions); integers, summed by the caller."""
    n_positions, n_rows = x.shape
    n_blocks = block_rows.shape[0]
    for chunk in prange(chunk_ones.shape[0]):
        for p in range(chunk * POSITIONS_PER_CHUNK,
                       min((chunk + 1) * POSITIONS_PER_CHUNK, n_positions)):
            for r in range(n_rows):
                chunk_ones[chunk, r] += _popcount(np.int64(x[p, r]))
            if skip_zero_tiles:
                # a block is converted for bit j iff bit j of the OR of its inputs is 1
                for b in range(n_blocks):
                    tile_bits = np.int64(0)
                    for r in range(n_rows):
                        if block_rows[b, r]:
                            tile_bits |= np.int64(x[p, r])
                    chunk_conversions[chunk, b] += _popcount(tile_bits) * block_columns[b]


@numba.njit(nogil=True, cache=True)
def _count_ones(levels, out):
    source, target = levels.reshape(-1), out.reshape(-1)
    for i in range(source.size):
        target[i] = _popcount(np.int64(source[i]))


def activation_ones(levels):
    """1-bits of each unsigned input level (C-contiguous floats holding integers), as float64:
    the input bits that drive a word line. Image chunks on the engine's pool."""
    ones = np.empty(levels.shape, np.float64)
    chunks = image_chunks(levels.shape[0])
    run_parallel(lambda index: _count_ones(levels[slice(*chunks[index])],
                                           ones[slice(*chunks[index])]), len(chunks))
    return ones


def count_events(crossbar, x, activation_bits, skip_zero_tiles=False, validate=True):
    """The EnergyCounts of `cim_matmul(crossbar, x, ...)`, from input popcounts (no partial
    sums), parallel over positions. `validate=False` skips the input checks, for inputs known
    to be unsigned `activation_bits`-bit integers (any numeric dtype)."""
    if validate:
        x, activation_bits = _check_inputs(crossbar, x, activation_bits)
    block_rows, _, block_columns = _blocks(crossbar)
    n_chunks = -(-x.shape[0] // POSITIONS_PER_CHUNK)
    chunk_ones = np.zeros((n_chunks, crossbar.n_rows), np.int64)
    chunk_conversions = np.zeros((n_chunks, len(block_columns)), np.int64)
    _count_kernel(x, _row_cells(crossbar), block_rows, block_columns, activation_bits,
                  bool(skip_zero_tiles), chunk_ones, chunk_conversions)
    counts = count_events_of_row_ones(crossbar, chunk_ones.sum(axis=0), x.shape[0],
                                      activation_bits)
    if skip_zero_tiles:
        counts = counts._replace(adc_conversions=int(chunk_conversions.sum()))
    return counts


def count_events_of_row_ones(crossbar, row_ones, n_positions, activation_bits):
    """The EnergyCounts of `n_positions` input vectors whose 1-bits, summed over positions and
    input bits, are `row_ones` (R,) per matrix row, with every tile converted (no skipping):
    the cell events depend on the inputs only through these sums."""
    _, _, block_columns = _blocks(crossbar)
    cell_counts = np.asarray(row_ones, np.int64) @ _row_cells(crossbar)
    return EnergyCounts(cell_counts, n_positions * activation_bits * int(block_columns.sum()),
                        crossbar.lfsr_steps * n_positions)


def _row_cells(crossbar):
    """(R, 4): cells on each word line, by state, over the column tiles that store the row."""
    exists = crossbar.stored[crossbar.column_tile]
    return np.stack([((crossbar.cells == s) & exists).sum(axis=0)
                     for s in range(N_CELL_STATES)], 1)


@intrinsic
def _bit_plane_word(typingctx, lanes, plane):
    """Bit `plane` of the first 64 values of `lanes` (a C-contiguous array of unsigned
    integers) as one word, bit i from lanes[i]: one vector test in LLVM IR (vptestm and kmov
    with AVX-512, vpmovmskb with AVX2), which LLVM does not make of a loop over the lanes."""
    if not (isinstance(lanes, types.Array) and lanes.layout == "C"
            and isinstance(lanes.dtype, types.Integer) and isinstance(plane, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        lane_type = context.get_value_type(signature.args[0].dtype)
        vector_type = ir.VectorType(lane_type, WORD_BITS)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        values = builder.load(builder.bitcast(data, vector_type.as_pointer()), align=1)
        mask = builder.shl(ir.Constant(lane_type, 1), builder.trunc(args[1], lane_type))
        undefined = ir.Constant(vector_type, ir.Undefined)
        splat = builder.shuffle_vector(
            builder.insert_element(undefined, mask, ir.Constant(ir.IntType(32), 0)), undefined,
            ir.Constant(ir.VectorType(ir.IntType(32), WORD_BITS), [0] * WORD_BITS))
        is_set = builder.icmp_unsigned("!=", builder.and_(values, splat),
                                       ir.Constant(vector_type, None))
        return builder.bitcast(is_set, ir.IntType(WORD_BITS))

    return types.uint64(lanes, plane), codegen


@numba.njit(parallel=True, cache=True)
def _pack_input_bits(x, activation_bits, n_words):
    """(P, a, W) uint64 words: bit r % 64 of word r // 64 of plane j is bit j of x[p, r].

    A word's 64 inputs are converted into a small buffer of 16-bit lanes (zero past the last
    row), and each plane is one vector test of it (`_bit_plane_word`): 4-5x faster than
    gathering the bits of eight input bytes per multiply."""
    n_positions, n_rows = x.shape
    words = np.empty((n_positions, activation_bits, n_words), np.uint64)
    n_chunks = (n_positions + POSITIONS_PER_CHUNK - 1) // POSITIONS_PER_CHUNK
    for chunk in prange(n_chunks):
        lanes = np.zeros(WORD_BITS, np.uint16)  # MAX_ACTIVATION_BITS bits
        for p in range(chunk * POSITIONS_PER_CHUNK,
                       min((chunk + 1) * POSITIONS_PER_CHUNK, n_positions)):
            for w in range(n_words):
                first = w * WORD_BITS
                count = min(WORD_BITS, n_rows - first)
                for i in range(count):
                    lanes[i] = np.uint16(x[p, first + i])
                lanes[count:] = 0
                for j in range(activation_bits):
                    words[p, j, w] = _bit_plane_word(lanes, j)
    return words


@numba.njit(cache=True)
def _pack_cell_masks(cells, block_rows, block_first, block_columns, n_words):
    """Per block, its word span (first, stop) and masks (span words, 2, columns) uint64 of the
    rows whose cell state has the high (0) or low (1) bit, laid end to end in one array."""
    n_blocks, n_rows = block_rows.shape
    spans = np.zeros((n_blocks, 2), np.int64)
    offsets = np.zeros(n_blocks + 1, np.int64)
    for b in range(n_blocks):
        first, stop = n_words, 0
        for r in range(n_rows):
            if block_rows[b, r]:
                first = min(first, r // WORD_BITS)
                stop = max(stop, r // WORD_BITS + 1)
        spans[b, 0], spans[b, 1] = first, max(stop, first)
        offsets[b + 1] = offsets[b] + (spans[b, 1] - spans[b, 0]) * 2 * block_columns[b]
    masks = np.zeros(offsets[n_blocks], np.uint64)
    for b in range(n_blocks):
        n_columns = block_columns[b]
        for r in range(n_rows):
            if not block_rows[b, r]:
                continue
            base = offsets[b] + (r // WORD_BITS - spans[b, 0]) * 2 * n_columns
            bit = np.uint64(1) << np.uint64(r % WORD_BITS)
            for k in range(n_columns):
                state = cells[block_first[b] + k, r]
                if state & 2:
                    masks[base + k] |= bit
                if state & 1:
                    masks[base + n_columns + k] |= bit
    return masks, spans, offsets


@numba.njit(cache=True)
def _word_masks(masks, base, n_columns):
    """(high, low): one input word's masks of a block's columns, laid from `base`."""
    return masks[base:base + n_columns], masks[base + n_columns:base + 2 * n_columns]


@numba.njit(cache=True)
def _pair_sum(word0, high0, low0, word1, high1, low1):
    """The partial sum of one column over two input words: 2 popcount(word & high) +
    popcount(word & low) for each."""
    return (2 * (_popcount(word0 & high0) + _popcount(word1 & high1))
            + _popcount(word0 & low0) + _popcount(word1 & low1))


@numba.njit(cache=True)
def _load_pair(input_words, p, w, stop, words0, words1):
    """Every input bit's words w and w + 1 of position p into words0 and words1, the second
    zero where w + 1 is the block's end `stop`; returns the index of the second word's masks
    (w where it is zero, whose masks then meet only zeros)."""
    second = min(w + 1, stop - 1)
    for j in range(words0.size):
        words0[j] = input_words[p, j, w]
        words1[j] = input_words[p, j, second] if second > w else np.uint64(0)
    return second


@functools.cache
def _packed_kernel(activation_bits):
    """The bit-serial kernel for `activation_bits`-bit inputs, compiled once per width (the
    width is a constant in it, so LLVM unrolls the loop over the input bits)."""

    @numba.njit(parallel=True, cache=True)
    def kernel(input_words, masks, spans, offsets, block_first, block_columns, step, top,
               channel, histograms, codes):
        """Fills `codes` (P, K) with sum_j 2^j sum_t code(S), code(S) = min(rint(S / step[k]),
        top[k]) as in `_adc_code`; with `histograms` of shape (chunks, channels, 3T + 1) it
        instead counts every partial sum S by channel and leaves `codes` alone.

        Per position and block, one loop over the block's columns computes every input bit's
        partial sum, ADC reading and shifted sum: the column's masks are loaded once for all
        the bits and the loop vectorizes over columns. A block spans at most two words in the
        usual case (crossbars of up to 128 rows); a longer one first sums its earlier word
        pairs into `carried` (column-major, so that loop vectorizes too). Against a loop per
        input bit that skipped zero words: 1.5x for the kernel, 1.4x for a whole CIM run
        (docs/cim-model.md).
        """
        n_positions = input_words.shape[0]
        record = histograms.shape[0] > 0
        n_chunks = (n_positions + POSITIONS_PER_CHUNK - 1) // POSITIONS_PER_CHUNK
        for chunk in prange(n_chunks):
            carried = np.zeros((block_columns.max(), activation_bits), np.int64)
            words0 = np.zeros(activation_bits, np.uint64)
            words1 = np.zeros(activation_bits, np.uint64)
            for p in range(chunk * POSITIONS_PER_CHUNK,
                           min((chunk + 1) * POSITIONS_PER_CHUNK, n_positions)):
                if not record:
                    codes[p, :] = 0
                for b in range(block_columns.size):
                    n_columns, first = block_columns[b], block_first[b]
                    start, stop = spans[b, 0], spans[b, 1]
                    last = start + (stop - start - 1) // 2 * 2  # first word of the last pair
                    # histograms: every pair into the running sums first, as a loop with
                    # their scatter would not vectorize
                    for w in range(start, stop if record else last, 2):
                        second = _load_pair(input_words, p, w, stop, words0, words1)
                        high0, low0 = _word_masks(masks, offsets[b] + (w - start) * 2 * n_columns,
                                                  n_columns)
                        high1, low1 = _word_masks(
                            masks, offsets[b] + (second - start) * 2 * n_columns, n_columns)
                        for k in range(n_columns):
                            for j in range(activation_bits):
                                carried[k, j] += _pair_sum(words0[j], high0[k], low0[k],
                                                           words1[j], high1[k], low1[k])
                    if record:
                        for k in range(n_columns):
                            for j in range(activation_bits):
                                histograms[chunk, channel[first + k], carried[k, j]] += 1
                                carried[k, j] = 0
                        continue
                    second = _load_pair(input_words, p, last, stop, words0, words1)
                    high0, low0 = _word_masks(masks, offsets[b] + (last - start) * 2 * n_columns,
                                              n_columns)
                    high1, low1 = _word_masks(masks, offsets[b] + (second - start) * 2 * n_columns,
                                              n_columns)
                    block_codes = codes[p, first:first + n_columns]
                    block_step = step[first:first + n_columns]
                    block_top = top[first:first + n_columns]
                    # `_adc_code` is written out in the two loops below: called, it kept LLVM
                    # from vectorizing them (2-3x slower); the first one, without running
                    # sums, is 1.5x faster than the second on blocks of two words
                    if last == start:
                        for k in range(n_columns):
                            block_code = np.int64(0)
                            for j in range(activation_bits):
                                partial_sum = _pair_sum(words0[j], high0[k], low0[k],
                                                        words1[j], high1[k], low1[k])
                                block_code += min(np.int64(np.rint(partial_sum / block_step[k])),
                                                  block_top[k]) << j
                            block_codes[k] += block_code
                    else:
                        for k in range(n_columns):
                            block_code = np.int64(0)
                            for j in range(activation_bits):
                                partial_sum = carried[k, j] + _pair_sum(
                                    words0[j], high0[k], low0[k], words1[j], high1[k], low1[k])
                                block_code += min(np.int64(np.rint(partial_sum / block_step[k])),
                                                  block_top[k]) << j
                                carried[k, j] = 0
                            block_codes[k] += block_code

    return kernel


@numba.njit(parallel=True, cache=True)
def _clipping_kernel(input_words, masks, spans, offsets, block_first, block_columns, top,
                     codes):
    """Subtracts from the exact sums `codes` (P, K) what an ADC of steps of 1 clips: its
    reading min(S, top) is S - max(S - top, 0). S is at most 3 x the crossbar's driven rows
    for that bit, so a crossbar whose driven rows cannot reach its lowest top code is skipped
    after one popcount of its words: nearly all of them, so this costs a fraction of the
    bit-serial kernel."""
    n_positions, activation_bits, _ = input_words.shape
    n_blocks = block_columns.size
    n_chunks = (n_positions + POSITIONS_PER_CHUNK - 1) // POSITIONS_PER_CHUNK
    for chunk in prange(n_chunks):
        lowest_top = np.empty(n_blocks, np.int64)
        for b in range(n_blocks):
            lowest_top[b] = top[block_first[b]:block_first[b] + block_columns[b]].min()
        for p in range(chunk * POSITIONS_PER_CHUNK,
                       min((chunk + 1) * POSITIONS_PER_CHUNK, n_positions)):
            for j in range(activation_bits):
                for b in range(n_blocks):
                    start, stop = spans[b, 0], spans[b, 1]
                    driven = 0
                    for w in range(start, stop):
                        driven += _popcount(input_words[p, j, w])
                    if MAX_CELL_STATE * driven <= lowest_top[b]:
                        continue
                    n_columns, first = block_columns[b], block_first[b]
                    for k in range(n_columns):
                        partial_sum = 0
                        for w in range(start, stop):
                            high = offsets[b] + (w - start) * 2 * n_columns + k  # low: + n_columns
                            word = input_words[p, j, w]
                            partial_sum += (2 * _popcount(word & masks[high])
                                            + _popcount(word & masks[high + n_columns]))
                        if partial_sum > top[first + k]:
                            codes[p, first + k] -= (partial_sum - top[first + k]) << j


class PackedCrossbar:
    """A Crossbar's cell masks, packed once per physical crossbar for `matmul` and
    `partial_sum_histograms`; an ADC that reads every partial sum this crossbar can produce
    exactly (e.g. an 8-bit ADC of step 1 on columns whose sums stay below 256) needs no
    bit-serial pass (module docstring)."""

    def __init__(self, crossbar):
        self.crossbar = crossbar
        self.n_words = -(-crossbar.n_rows // WORD_BITS)
        self.largest_sums = crossbar.largest_partial_sums
        self._packed = None  # the cell masks, packed when first needed
        self._cell_matrices = {}  # dtype -> cells^T (R, K), for _exact_codes

    def _pack(self):
        if self._packed is None:
            rows, first, columns = _blocks(self.crossbar)
            masks, spans, offsets = _pack_cell_masks(self.crossbar.cells, rows, first, columns,
                                                     self.n_words)
            self._packed = (masks, spans, offsets, first, columns)
        return self._packed

    def _run(self, x, activation_bits, adc, histograms):
        crossbar = self.crossbar
        if not histograms.shape[0]:
            if adc.is_ideal(crossbar, self.largest_sums):
                return self._exact_codes(x, activation_bits)
            if np.all(adc.step == 1.0):
                codes = self._exact_codes(x, activation_bits)
                _clipping_kernel(_pack_input_bits(x, activation_bits, self.n_words),
                                 *self._pack(), adc.top, codes)
                return codes
        codes = np.empty((x.shape[0], crossbar.n_columns), np.int64)
        _packed_kernel(activation_bits)(_pack_input_bits(x, activation_bits, self.n_words),
                                        *self._pack(), adc.step, adc.top, crossbar.channel,
                                        histograms, codes)
        return codes

    def _exact_codes(self, x, activation_bits):
        """Q = x @ cells^T, (P, K) int64: what the bit-serial reading gives when the ADC reads
        every partial sum exactly, since sum_j 2^j sum_t S[t, j, k] = sum_r x_r cells[k, r].
        One float matmul per chunk of positions, in a float type that holds every sum exactly
        (integers below 2^24 in float32, else float64), so the order of the sums cannot
        matter."""
        crossbar = self.crossbar
        largest = ((1 << activation_bits) - 1) * MAX_CELL_STATE * crossbar.n_rows
        dtype = np.dtype(np.float32 if largest < 2 ** 24 else np.float64)
        if dtype not in self._cell_matrices:
            self._cell_matrices[dtype] = np.ascontiguousarray(crossbar.cells.T, dtype)
        cells = self._cell_matrices[dtype]
        codes = np.empty((x.shape[0], crossbar.n_columns), np.int64)
        chunks = range(0, x.shape[0], EXACT_POSITIONS_PER_CHUNK)

        def run_chunk(index):
            rows = slice(chunks[index], chunks[index] + EXACT_POSITIONS_PER_CHUNK)
            codes[rows] = x[rows].astype(dtype, copy=False) @ cells

        run_parallel(run_chunk, len(chunks))
        return codes

    def matmul(self, x, activation_bits, adc=None, skip_zero_tiles=False, validate=True,
               count=True):
        """`cim_matmul` on bit-packed words: the same (y, counts), exactly; counts (None
        unless `count`) from `count_events`. `validate=False`: see `count_events`."""
        if validate:
            x, activation_bits = _check_inputs(self.crossbar, x, activation_bits)
        adc = _check_adc(self.crossbar, adc)
        codes = self._run(x, activation_bits, adc, np.zeros((0, 0, 0), np.int64))
        counts = (count_events(self.crossbar, x, activation_bits, skip_zero_tiles, False)
                  if count else None)
        return _combine(self.crossbar, codes, adc), counts

    def partial_sum_histograms(self, x, activation_bits, validate=True):
        """(ADC channels, 3T + 1) int64: how often each partial sum is converted, by channel."""
        if validate:
            x, activation_bits = _check_inputs(self.crossbar, x, activation_bits)
        crossbar = self.crossbar
        n_chunks = -(-x.shape[0] // POSITIONS_PER_CHUNK)
        n_channels = len(adc_channels(crossbar.encoding, crossbar.bits))
        histograms = np.zeros((n_chunks, n_channels,
                               MAX_CELL_STATE * crossbar.rows_per_tile + 1), np.int64)
        self._run(x, activation_bits, ideal_adc(crossbar), histograms)
        return histograms.sum(axis=0)


def cim_matmul_packed(crossbar, x, activation_bits, adc=None, skip_zero_tiles=False):
    """`cim_matmul` computed on bit-packed words (packing the crossbar for this call)."""
    return PackedCrossbar(crossbar).matmul(x, activation_bits, adc, skip_zero_tiles)
