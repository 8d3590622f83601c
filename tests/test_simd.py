"""The SIMD register blocks (kernels/simd.py) against plain loops over the same indices.

The values are small integers, so the fused multiply-adds are exact and the kernel must match
the loops bit for bit; output slots that no block writes must keep their NaN."""
import functools

import numba
import numpy as np
import pytest

from nptwofold.kernels.simd import fma_broadcast, lanes, store_block, zero_block


@functools.cache
def block_kernel(rows, vectors):
    @numba.njit
    def run(a, a_starts, a_step, b, b_starts, out, out_start, row_step):
        block = zero_block(out, rows, vectors)
        for k in range(a_starts.size):
            block = fma_broadcast(block, a, a_starts[k], a_step, b, b_starts[k])
        store_block(block, out, out_start, row_step)

    return run


def reference(rows, vectors, a, a_starts, a_step, b, b_starts, out, out_start, row_step):
    width = lanes(out.dtype)
    for r in range(rows):
        for v in range(vectors):
            for lane in range(width):
                total = 0.0
                for a_start, b_start in zip(a_starts, b_starts):
                    total += a[a_start + r * a_step] * b[b_start + v * width + lane]
                out[out_start + r * row_step + v * width + lane] = total
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, vectors", [(1, 1), (3, 2), (16, 1), (4, 4), (2, 3)])
def test_blocks_match_loops(dtype, rows, vectors):
    rng = np.random.default_rng(rows * 10 + vectors)
    width = lanes(np.dtype(dtype))
    a_step, steps = 3, 5
    a = rng.integers(-8, 9, size=rows * a_step + steps + 7).astype(dtype)
    b = rng.integers(-8, 9, size=vectors * width + 2 * steps + 5).astype(dtype)
    a_starts = rng.integers(0, 7, size=steps)
    b_starts = rng.integers(0, 2 * steps + 5, size=steps)
    row_step = vectors * width + 5  # gaps between the stored rows
    out_start = 2
    size = out_start + rows * row_step + 3
    out = np.full(size, np.nan, dtype)
    block_kernel(rows, vectors)(a, a_starts, a_step, b, b_starts, out, out_start, row_step)
    expected = reference(rows, vectors, a, a_starts, a_step, b, b_starts,
                         np.full(size, np.nan, dtype), out_start, row_step)
    np.testing.assert_array_equal(out, expected)


def test_lanes_fill_64_bytes():
    assert lanes(np.dtype(np.float32)) == 16 and lanes(np.dtype(np.float64)) == 8


def test_blocks_reject_integer_arrays():
    with pytest.raises(numba.TypingError):
        block_kernel(1, 1)(np.zeros(20, np.int64), np.zeros(1, np.int64), 1,
                           np.zeros(20, np.int64), np.zeros(1, np.int64), np.zeros(20, np.int64),
                           0, 16)
