"""Batch normalisation over the channel (last) axis of NHWC activations or (rows, C) matrices.

The work is split by the fixed image chunks of `threads.image_chunks` (the first axis).
Channel sums are taken per chunk in float64 and added in chunk order, so the statistics do
not depend on the thread count: a resumed run reproduces a straight one exactly.
"""
import numba
import numpy as np

from ..threads import image_chunks, run_parallel


@numba.njit(nogil=True, cache=True)
def channel_moments(a, b):
    """Per-channel (sum of a, sum of a*b) over the rows of (rows, C) arrays, in float64."""
    rows, chans = a.shape
    sum_a = np.zeros(chans)
    sum_ab = np.zeros(chans)
    for i in range(rows):
        for c in range(chans):
            a_value = np.float64(a[i, c])  # a float32 product is exact in float64
            sum_a[c] += a_value
            sum_ab[c] += a_value * b[i, c]
    return sum_a, sum_ab


@numba.njit(nogil=True, cache=True)
def _normalise(x, mean, inv_std, gamma, beta, y, xhat):
    rows, chans = x.shape
    for i in range(rows):
        for c in range(chans):
            xhat[i, c] = (x[i, c] - mean[c]) * inv_std[c]
            y[i, c] = xhat[i, c] * gamma[c] + beta[c]


@numba.njit(nogil=True, cache=True)
def _affine(x, scale, shift, y):
    rows, chans = x.shape
    for i in range(rows):
        for c in range(chans):
            y[i, c] = x[i, c] * scale[c] + shift[c]


@numba.njit(nogil=True, cache=True)
def _batchnorm_input_grad(dy, xhat, coef, dbeta_mean, dgamma_mean, dx):
    rows, chans = dy.shape
    for i in range(rows):
        for c in range(chans):
            dx[i, c] = coef[c] * (dy[i, c] - dbeta_mean[c] - xhat[i, c] * dgamma_mean[c])


def _chunk_rows(array, start, stop):
    """Images start:stop of an (N, ..., C) array as a (rows, C) view."""
    return array[start:stop].reshape(-1, array.shape[-1])


def _for_each_chunk(kernel, inputs, outputs, *per_channel):
    """kernel(input rows..., per-channel vectors..., output rows...) on every image chunk."""
    chunks = image_chunks(inputs[0].shape[0])

    def run_chunk(index):
        start, stop = chunks[index]
        kernel(*[_chunk_rows(a, start, stop) for a in inputs], *per_channel,
               *[_chunk_rows(a, start, stop) for a in outputs])

    run_parallel(run_chunk, len(chunks))


def batch_moments(a, b):
    """channel_moments over the whole batch: per-chunk float64 sums, added in chunk order."""
    chunks = image_chunks(a.shape[0])
    partial = np.empty((len(chunks), 2, a.shape[-1]))

    def moments_chunk(index):
        start, stop = chunks[index]
        partial[index, 0], partial[index, 1] = channel_moments(_chunk_rows(a, start, stop),
                                                               _chunk_rows(b, start, stop))

    run_parallel(moments_chunk, len(chunks))
    total = partial[0].copy()
    for chunk_sums in partial[1:]:
        total += chunk_sums
    return total[0], total[1]


def batchnorm_forward_train(x, gamma, beta, eps):
    """Normalise with batch statistics. Returns y, xhat, batch mean, biased variance, 1/std."""
    rows = x.size // x.shape[-1]
    sum_x, sum_x2 = batch_moments(x, x)
    mean = sum_x / rows
    # float64 sums keep E[x^2] - E[x]^2 accurate for activations of moderate mean
    var = np.maximum(sum_x2 / rows - mean * mean, 0.0)
    inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    y, xhat = np.empty_like(x), np.empty_like(x)
    _for_each_chunk(_normalise, [x], [y, xhat], mean.astype(x.dtype), inv_std, gamma, beta)
    return y, xhat, mean, var, inv_std


def channel_affine(x, scale, shift):
    """y = x * scale + shift per channel: inference-mode batch norm with folded statistics."""
    y = np.empty_like(x)
    _for_each_chunk(_affine, [x], [y], scale, shift)
    return y


def batchnorm_backward(dy, xhat, gamma, inv_std):
    """Gradients to the input, gamma and beta of a training-mode batch norm."""
    rows = dy.size // dy.shape[-1]
    dtype = dy.dtype
    dbeta, dgamma = batch_moments(dy, xhat)
    coef = (gamma * inv_std).astype(dtype)
    dx = np.empty_like(dy)
    _for_each_chunk(_batchnorm_input_grad, [dy, xhat], [dx], coef, (dbeta / rows).astype(dtype),
                    (dgamma / rows).astype(dtype))
    return dx, dgamma.astype(dtype), dbeta.astype(dtype)
