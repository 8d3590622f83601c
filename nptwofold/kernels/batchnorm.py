"""Batch normalisation over the channel axis of NHWC activations, seen as (rows, channels).

Channel sums are taken over a fixed number of row chunks and added in chunk order, so the
result does not depend on the thread count: a resumed run reproduces a straight one exactly.
"""
import numba
import numpy as np
from numba import prange

SUM_CHUNKS = 32


@numba.njit(parallel=True, cache=True)
def channel_moments(a, b):
    """Per-channel (sum of a, sum of a*b) in one pass, accumulated in float64."""
    rows, chans = a.shape
    partial = np.zeros((SUM_CHUNKS, 2, chans))
    for chunk in prange(SUM_CHUNKS):
        for i in range(chunk * rows // SUM_CHUNKS, (chunk + 1) * rows // SUM_CHUNKS):
            for c in range(chans):
                a_value = np.float64(a[i, c])  # a float32 product is exact in float64
                partial[chunk, 0, c] += a_value
                partial[chunk, 1, c] += a_value * b[i, c]
    total = np.zeros((2, chans))
    for chunk in range(SUM_CHUNKS):
        total += partial[chunk]
    return total[0], total[1]


@numba.njit(parallel=True, cache=True)
def _normalise(x, mean, inv_std, gamma, beta):
    rows, chans = x.shape
    xhat = np.empty_like(x)
    y = np.empty_like(x)
    for i in prange(rows):
        for c in range(chans):
            xhat[i, c] = (x[i, c] - mean[c]) * inv_std[c]
            y[i, c] = xhat[i, c] * gamma[c] + beta[c]
    return y, xhat


def batchnorm_forward_train(x, gamma, beta, eps):
    """Normalise with batch statistics. Returns y, xhat, batch mean, biased variance, 1/std."""
    rows = x.shape[0]
    sum_x, sum_x2 = channel_moments(x, x)
    mean = sum_x / rows
    # float64 sums keep E[x^2] - E[x]^2 accurate for activations of moderate mean
    var = np.maximum(sum_x2 / rows - mean * mean, 0.0)
    inv_std = 1.0 / np.sqrt(var + eps)
    dtype = x.dtype
    y, xhat = _normalise(x, mean.astype(dtype), inv_std.astype(dtype), gamma, beta)
    return y, xhat, mean, var, inv_std.astype(dtype)


@numba.njit(parallel=True, cache=True)
def channel_affine(x, scale, shift):
    """y = x * scale + shift per channel: inference-mode batch norm with folded statistics."""
    rows, chans = x.shape
    y = np.empty_like(x)
    for i in prange(rows):
        for c in range(chans):
            y[i, c] = x[i, c] * scale[c] + shift[c]
    return y


@numba.njit(parallel=True, cache=True)
def _batchnorm_input_grad(dy, xhat, coef, dbeta_mean, dgamma_mean):
    rows, chans = dy.shape
    dx = np.empty_like(dy)
    for i in prange(rows):
        for c in range(chans):
            dx[i, c] = coef[c] * (dy[i, c] - dbeta_mean[c] - xhat[i, c] * dgamma_mean[c])
    return dx


def batchnorm_backward(dy, xhat, gamma, inv_std):
    """Gradients to the input, gamma and beta of a training-mode batch norm."""
    rows = dy.shape[0]
    dtype = dy.dtype
    dbeta, dgamma = channel_moments(dy, xhat)
    coef = (gamma * inv_std).astype(dtype)
    dx = _batchnorm_input_grad(dy, xhat, coef, (dbeta / rows).astype(dtype),
                               (dgamma / rows).astype(dtype))
    return dx, dgamma.astype(dtype), dbeta.astype(dtype)
