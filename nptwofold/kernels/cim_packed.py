"""The bit-packed simulation of a crossbar (`PackedCrossbar`): exactly what the reference
`cim_bitserial.cim_matmul` gives, fast enough for a whole network.

Bit j of the inputs of position p is packed along R into 64-bit words. Each crossbar (block)
has, per word and physical column, a HI and a LO mask of the stored rows whose cell state has
the high or low bit; S = 2 popcount(X & HI) + popcount(X & LO), read by the ADC (`adc_code`'s
arithmetic) in the same vector loop, for every input bit j at once (a zero word gives S = 0,
read as the code 0 by any ADC). An ADC that reads every sum a column can reach exactly (the
ideal one, or steps of 1 with top codes at or above `Crossbar.largest_partial_sums`) is linear:
sum_j 2^j sum_t S = sum_r x_r cells[k, r], so there Q is one exact matmul of the integer inputs
with the cell states (in a float type that holds every sum exactly), with no bit-serial pass.
An ADC of steps of 1 whose top code a column could exceed reads min(S, top) = S - max(S - top,
0): the exact matmul, less the excess of the few partial sums above the top
(`_clipping_kernel`; S is at most 3 x the driven rows, so most crossbars are ruled out by one
popcount). Work is split over output positions in fixed chunks, and every per-chunk partial
result is an exact integer, so results do not depend on the thread count.
"""
import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from ..cim.adc import check_adc, ideal_adc
from ..cim.device import MAX_CELL_STATE, adc_channels
from ..threads import run_parallel
from .cim_bitserial import combine
from .cim_events import (POSITIONS_PER_CHUNK, check_inputs, count_events, crossbar_blocks,
                         popcount)

WORD_BITS = 64            # rows per packed word

EXACT_POSITIONS_PER_CHUNK = 1024  # positions per matmul of an exact (ideal) reading


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
    return (2 * (popcount(word0 & high0) + popcount(word1 & high1))
            + popcount(word0 & low0) + popcount(word1 & low1))


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
        top[k]) as in `adc_code`; with `histograms` of shape (chunks, channels, 3T + 1) it
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
                    # `adc_code` is written out in the two loops below: called, it kept LLVM
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
                        driven += popcount(input_words[p, j, w])
                    if MAX_CELL_STATE * driven <= lowest_top[b]:
                        continue
                    n_columns, first = block_columns[b], block_first[b]
                    for k in range(n_columns):
                        partial_sum = 0
                        for w in range(start, stop):
                            high = offsets[b] + (w - start) * 2 * n_columns + k  # low: + n_columns
                            word = input_words[p, j, w]
                            partial_sum += (2 * popcount(word & masks[high])
                                            + popcount(word & masks[high + n_columns]))
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
            rows, first, columns = crossbar_blocks(self.crossbar)
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
            x, activation_bits = check_inputs(self.crossbar, x, activation_bits)
        adc = check_adc(self.crossbar, adc)
        codes = self._run(x, activation_bits, adc, np.zeros((0, 0, 0), np.int64))
        counts = (count_events(self.crossbar, x, activation_bits, skip_zero_tiles, False)
                  if count else None)
        return combine(self.crossbar, codes, adc), counts

    def partial_sum_histograms(self, x, activation_bits, validate=True):
        """(ADC channels, 3T + 1) int64: how often each partial sum is converted, by channel."""
        if validate:
            x, activation_bits = check_inputs(self.crossbar, x, activation_bits)
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
