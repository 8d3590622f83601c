"""The SIMD register blocks (kernels/simd.py) against plain loops over the same indices.

The values are small integers, so the fused multiply-adds are exact and the kernel must match
the loops bit for bit; output slots that no block writes must keep their NaN."""
import functools

import numba
import numpy as np
import pytest

from nptwofold.kernels.simd import add_row_vector, fma_broadcast, lanes, store_block, zero_block


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


@functools.cache
def shifted_block_kernel(rows, vectors):
    @numba.njit
    def run(a, b, shift, relu, out, row_step):
        block = fma_broadcast(zero_block(out, rows, vectors), a, 0, 1, b, 0)
        store_block(add_row_vector(block, shift, relu), out, 0, row_step)

    return run


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, vectors", [(1, 1), (3, 2), (4, 4)])
def test_add_row_vector_shifts_every_row_then_clips(dtype, rows, vectors, relu):
    rng = np.random.default_rng(rows + 7 * vectors)
    width = vectors * lanes(np.dtype(dtype))
    a = rng.integers(-4, 5, size=rows).astype(dtype)
    b = rng.integers(-4, 5, size=width).astype(dtype)
    shift = rng.integers(-6, 7, size=width).astype(dtype)
    out = np.full(rows * width, np.nan, dtype)
    shifted_block_kernel(rows, vectors)(a, b, shift, relu, out, width)
    expected = a[:, None] * b[None, :] + shift[None, :]
    if relu:
        expected = np.where(expected > 0, expected, 0.0)
    np.testing.assert_array_equal(out.reshape(rows, width), expected)


def test_lanes_fill_64_bytes():
    assert lanes(np.dtype(np.float32)) == 16 and lanes(np.dtype(np.float64)) == 8


def test_blocks_reject_integer_arrays():
    with pytest.raises(numba.TypingError):
        block_kernel(1, 1)(np.zeros(20, np.int64), np.zeros(1, np.int64), 1,
                           np.zeros(20, np.int64), np.zeros(1, np.int64), np.zeros(20, np.int64),
                           0, 16)
