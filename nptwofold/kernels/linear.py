"""Fully connected layer y = x W^T + b with W stored (out, in), as in the checkpoint."""
import numba
import numpy as np


@numba.njit(nogil=True, cache=True)  # inference calls it from several threads at once
def linear_forward(x, weight, bias):
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    y = np.empty((n_rows, out_features), dtype=x.dtype)
    for n in range(n_rows):
        for o in range(out_features):
            acc = bias[o]
            for i in range(in_features):
                acc += x[n, i] * weight[o, i]
            y[n, o] = acc
    return y


@numba.njit(cache=True)
def linear_backward(dy, x, weight):
    """Gradients to the input, the (out, in) weight and the bias."""
    n_rows, in_features = x.shape
    out_features = weight.shape[0]
    dx = np.zeros_like(x)
    dweight = np.zeros_like(weight)
    dbias = np.zeros(out_features, dtype=dy.dtype)
    for n in range(n_rows):
        for o in range(out_features):
            g = dy[n, o]
            dbias[o] += g
            for i in range(in_features):
                dx[n, i] += g * weight[o, i]
                dweight[o, i] += g * x[n, i]
    return dx, dweight, dbias
