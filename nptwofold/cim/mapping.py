"""The physical mapping of a layer onto crossbars: the layer matrix, its row order, column tiles
and the rows each stores, and the LFSR steps that route them.

Layer matrix
- An (R x C) integer matrix of weight levels q: row r = input, column c = output channel. A
  conv's rows run in the im2col order (ky, kx, ci) of `kernels.conv.weight_as_matrix`, so the
  array's inputs are the im2col patches as they are. LFSR masks and the weights' own layout
  name rows in the PyTorch flatten (ci, ky, kx); `pytorch_rows` is the one place the two
  orders meet (`matrix_rows` and `in_weight_layout` convert with it).

Physical mapping
- Output channels are laid on column tiles of `crossbar_cols` columns, `outputs_per_tile` channels
  each (the encoding fixes the columns per channel, `cim.device`). A word line carries one
  input to every column of its tile, so a tile stores every row kept by any of its channels: the
  union of their kept rows, in ascending matrix order. A channel's pruned weights on those rows
  are stored as the level 0. The stored rows are split into row tiles of `crossbar_rows` word
  lines (the last may be partial); one (column tile, row tile) pair is one physical crossbar.

LFSR steps on the physical mapping **[assumption]**: a column tile routes the rows of every mask
group it holds, so it walks those groups' stretches of the layer's LFSR sequence, once per output
position; a group split over two tiles is walked by both. A dense layer, or a mask keeping every
row, routes nothing.
"""
from typing import NamedTuple

import numpy as np

from ..checks import check_integer, check_integer_matrix
from ..errors import NptwofoldError
from ..kernels.conv import weight_as_matrix
from ..kernels.lfsr import feedback_mask, lfsr_in_range_rows
from ..kernels.quant import check_bits, max_level
from .device import cells_per_magnitude, encoded_columns, outputs_per_tile


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


def layer_matrix(weights):
    """(R, C) view of conv OIHW (rows (ky, kx, ci), the im2col order) or FC (out, in) weights."""
    weights = np.asarray(weights)
    if weights.ndim == 4:
        return weight_as_matrix(weights)
    return weights.T


def pytorch_rows(weight_shape):
    """(R,) the PyTorch flatten index (ci, ky, kx) of each matrix row (ky, kx, ci) of a weight
    of this shape (the identity for the FC's (out, in))."""
    n_rows = int(np.prod(weight_shape[1:]))
    if len(weight_shape) != 4:
        return np.arange(n_rows, dtype=np.int64)
    in_channels, height, width = weight_shape[1:]
    ky, kx, channel = np.unravel_index(np.arange(n_rows), (height, width, in_channels))
    return ((channel * height + ky) * width + kx).astype(np.int64)


def matrix_rows(pytorch_rows_named, weight_shape):
    """Matrix rows of rows named in the PyTorch flatten (ci, ky, kx) of a weight of this shape."""
    order = pytorch_rows(weight_shape)
    matrix_row_of = np.empty_like(order)
    matrix_row_of[order] = np.arange(order.size)
    return matrix_row_of[np.asarray(pytorch_rows_named, np.int64)]


def in_weight_layout(per_matrix_row, weight_shape):
    """A value per matrix row (R,) laid out as one output channel of the weight, (ci, ky, kx)
    for a conv, (in,) for the FC."""
    per_pytorch_row = np.empty(len(per_matrix_row), np.asarray(per_matrix_row).dtype)
    per_pytorch_row[pytorch_rows(weight_shape)] = per_matrix_row
    return per_pytorch_row.reshape(weight_shape[1:])


def map_layer(levels, bits, rows_per_tile, crossbar_cols, encoding="twos_complement",
              keep=None, lfsr_steps=0):
    """Crossbar of an (R, C) matrix of b-bit integer levels (module docstring).

    keep: (R, C) bool, the kept weights in matrix row order, or None for a dense layer. Pruned
    weights are stored as the level 0 on the rows their column tile stores.
    lfsr_steps: LFSR steps per output position needed to route this layer's stored rows.
    """
    levels = check_integer_matrix("layer levels", levels)
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
    states, coefficient, channel = encoded_columns(np.where(keep, levels, 0), encoding, bits)
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


def lfsr_steps_per_position(mask, outputs_per_tile):
    """LFSR steps a layer needs per output position on the physical mapping (module docstring):
    the stretches of the sequence of every group a column tile holds, summed over tiles."""
    n_rows, n_cols = mask.mask.shape
    n_groups = mask.kept_rows.shape[0]
    walked = [0]  # steps of the walk up to the end of each group's stretch
    for group in range(n_groups):
        walked.append(lfsr_in_range_rows(mask.seed, mask.width, feedback_mask(mask.taps), n_rows,
                                         (group + 1) * mask.kept)[1])
    steps = 0
    for first in range(0, n_cols, outputs_per_tile):
        last = min(first + outputs_per_tile, n_cols) - 1
        steps += walked[last // mask.group + 1] - walked[first // mask.group]
    return steps
