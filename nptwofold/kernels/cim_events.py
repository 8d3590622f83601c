"""The energy events of a crossbar run, counted from input popcounts (no partial sums).

Energy events (integers, so two computations of the same events agree exactly):
- activated cells per state: for every position, input bit and driven stored row of a tile,
  every cell on that word line in the tile, sign and reference columns and 00 cells included;
- ADC conversions: one per (position, input bit, physical column, row tile of its column
  tile); with `skip_zero_tiles` a row tile with no driven row for that bit is not converted
  (its partial sums are 0, which any ADC reads as 0, so the output is unchanged);
- LFSR steps: `Crossbar.lfsr_steps` per output position (set by the mapping from the masks).
Picojoules are the ledger's (`cim.ledger`).
"""
from typing import NamedTuple

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from ..checks import check_integer, check_integer_matrix
from ..cim.device import MAX_ACTIVATION_BITS, N_CELL_STATES
from ..errors import NptwofoldError
from ..threads import image_chunks, run_parallel

POSITIONS_PER_CHUNK = 64  # positions per parallel work item


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


@intrinsic
def popcount(typingctx, value):
    """Number of 1 bits of an integer, as int64: LLVM's ctpop (vectorised with AVX-512)."""
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, builder.ctpop(args[0]), value, types.int64)

    return types.int64(value), codegen


def check_inputs(crossbar, x, activation_bits):
    activation_bits = check_integer("activation bits", activation_bits, 1, MAX_ACTIVATION_BITS)
    x = check_integer_matrix("CIM inputs", x)
    if x.shape[1] != crossbar.n_rows:
        raise NptwofoldError(f"CIM inputs have {x.shape[1]} rows, the layer has {crossbar.n_rows}")
    if x.size and (x.min() < 0 or x.max() >= 1 << activation_bits):
        raise NptwofoldError(f"CIM inputs must be unsigned {activation_bits}-bit integers "
                             f"(0..{(1 << activation_bits) - 1})")
    return np.ascontiguousarray(x), activation_bits


def crossbar_blocks(crossbar):
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
                chunk_ones[chunk, r] += popcount(np.int64(x[p, r]))
            if skip_zero_tiles:
                # a block is converted for bit j iff bit j of the OR of its inputs is 1
                for b in range(n_blocks):
                    tile_bits = np.int64(0)
                    for r in range(n_rows):
                        if block_rows[b, r]:
                            tile_bits |= np.int64(x[p, r])
                    chunk_conversions[chunk, b] += popcount(tile_bits) * block_columns[b]


@numba.njit(nogil=True, cache=True)
def _count_ones(levels, out):
    source, target = levels.reshape(-1), out.reshape(-1)
    for i in range(source.size):
        target[i] = popcount(np.int64(source[i]))


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
        x, activation_bits = check_inputs(crossbar, x, activation_bits)
    block_rows, _, block_columns = crossbar_blocks(crossbar)
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
    _, _, block_columns = crossbar_blocks(crossbar)
    cell_counts = np.asarray(row_ones, np.int64) @ _row_cells(crossbar)
    return EnergyCounts(cell_counts, n_positions * activation_bits * int(block_columns.sum()),
                        crossbar.lfsr_steps * n_positions)


def _row_cells(crossbar):
    """(R, 4): cells on each word line, by state, over the column tiles that store the row."""
    exists = crossbar.stored[crossbar.column_tile]
    return np.stack([((crossbar.cells == s) & exists).sum(axis=0)
                     for s in range(N_CELL_STATES)], 1)
