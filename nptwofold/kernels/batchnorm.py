"""Batch normalisation over the channel (last) axis of NHWC activations or (rows, C) matrices,
optionally followed by a ReLU in the same passes.

The work is split by the fixed image chunks of `threads.image_chunks` (the first axis).
Channel sums are taken per chunk in float64 and added in chunk order, so the statistics do
not depend on the thread count: a resumed run reproduces a straight one exactly.

Training goes over memory as few times as the sums allow: the forward reads x twice (the
statistics, then the normalisation and the ReLU) and writes y once; the backward recomputes
xhat = (x - mean) / std from x instead of keeping it, and applies the ReLU's mask (y > 0)
while it reads dy, in two passes (the two gradient sums, then dx). A separate ReLU layer
and a stored xhat took three more passes forward and two more backward.
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
def _normalise(x, mean, inv_std, gamma, beta, relu, y):
    rows, chans = x.shape
    for i in range(rows):
        for c in range(chans):
            value = (x[i, c] - mean[c]) * inv_std[c] * gamma[c] + beta[c]
            y[i, c] = value if value > 0 or not relu else 0.0


@numba.njit(nogil=True, cache=True)
def _gradient_moments(dy, x, y, mean, inv_std, relu):
    """Per channel (sum of g, sum of g * xhat) in float64, where g is dy masked by the ReLU
    (y > 0) if `relu`, else dy (then y is not read)."""
    rows, chans = dy.shape
    sum_g = np.zeros(chans)
    sum_g_xhat = np.zeros(chans)
    for i in range(rows):
        for c in range(chans):
            g = dy[i, c] if not relu or y[i, c] > 0 else 0.0
            xhat = (x[i, c] - mean[c]) * inv_std[c]
            sum_g[c] += g
            sum_g_xhat[c] += np.float64(g) * xhat  # a float32 product is exact in float64
    return sum_g, sum_g_xhat


@numba.njit(nogil=True, cache=True)
def _affine(x, scale, shift, y):
    rows, chans = x.shape
    for i in range(rows):
        for c in range(chans):
            y[i, c] = x[i, c] * scale[c] + shift[c]


@numba.njit(nogil=True, cache=True)
def _batchnorm_input_grad(dy, x, y, mean, inv_std, relu, coef, g_mean, g_xhat_mean, dx):
    rows, chans = dy.shape
    for i in range(rows):
        for c in range(chans):
            g = dy[i, c] if not relu or y[i, c] > 0 else 0.0
            xhat = (x[i, c] - mean[c]) * inv_std[c]
            dx[i, c] = coef[c] * (g - g_mean[c] - xhat * g_xhat_mean[c])


def _chunk_rows(array, start, stop):
    """Images start:stop of an (N, ..., C) array as a (rows, C) view."""
    return array[start:stop].reshape(-1, array.shape[-1])


def _for_each_chunk(kernel, inputs, outputs, *per_channel):
    """kernel(input rows..., per-channel vectors and flags..., output rows...) on every image
    chunk."""
    chunks = image_chunks(inputs[0].shape[0])

    def run_chunk(index):
        start, stop = chunks[index]
        kernel(*[_chunk_rows(a, start, stop) for a in inputs], *per_channel,
               *[_chunk_rows(a, start, stop) for a in outputs])

    run_parallel(run_chunk, len(chunks))


def _sum_chunks(moments, arrays, *scalars):
    """moments(chunk rows of each array..., *scalars) -> two per-channel float64 sums, over the
    whole batch: per-chunk sums, added in chunk order."""
    chunks = image_chunks(arrays[0].shape[0])
    partial = np.empty((len(chunks), 2, arrays[0].shape[-1]))

    def moments_chunk(index):
        start, stop = chunks[index]
        partial[index, 0], partial[index, 1] = moments(
            *[_chunk_rows(a, start, stop) for a in arrays], *scalars)

    run_parallel(moments_chunk, len(chunks))
    total = partial[0].copy()
    for chunk_sums in partial[1:]:
        total += chunk_sums
    return total[0], total[1]


def batchnorm_forward_train(x, gamma, beta, eps, relu=False):
    """Normalise with batch statistics, then a ReLU if `relu`. Returns y, the batch mean and
    biased variance (float64) and 1/std (x's dtype)."""
    rows = x.size // x.shape[-1]
    sum_x, sum_x2 = _sum_chunks(channel_moments, [x, x])
    mean = sum_x / rows
    # float64 sums keep E[x^2] - E[x]^2 accurate for activations of moderate mean
    var = np.maximum(sum_x2 / rows - mean * mean, 0.0)
    inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    y = np.empty_like(x)
    _for_each_chunk(_normalise, [x], [y], mean.astype(x.dtype), inv_std, gamma, beta, relu)
    return y, mean, var, inv_std


def channel_affine(x, scale, shift):
    """y = x * scale + shift per channel: inference-mode batch norm with folded statistics."""
    y = np.empty_like(x)
    _for_each_chunk(_affine, [x], [y], scale, shift)
    return y


def batchnorm_backward(dy, x, mean, inv_std, gamma, relu_output=None):
    """Gradients to the input, gamma and beta of a training-mode batch norm from its input x
    and the forward's mean and 1/std; with the output of a fused ReLU, through the ReLU too."""
    rows = dy.size // dy.shape[-1]
    dtype = dy.dtype
    relu = relu_output is not None
    y = relu_output if relu else x  # not read without a ReLU (the kernels need an array)
    mean = mean.astype(dtype)  # as the forward's normalisation used it
    dbeta, dgamma = _sum_chunks(_gradient_moments, [dy, x, y], mean, inv_std, relu)
    coef = (gamma * inv_std).astype(dtype)
    dx = np.empty_like(dy)
    _for_each_chunk(_batchnorm_input_grad, [dy, x, y], [dx], mean, inv_std, relu, coef,
                    (dbeta / rows).astype(dtype), (dgamma / rows).astype(dtype))
    return dx, dgamma.astype(dtype), dbeta.astype(dtype)
