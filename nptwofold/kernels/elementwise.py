"""Element-wise and reshaping kernels of ResNet-20: ReLU, option-A shortcut, global average pool."""
import numba
import numpy as np
from numba import prange


@numba.njit(parallel=True, cache=True)
def relu_forward(x):
    flat = x.ravel()
    y = np.empty_like(flat)
    for i in prange(flat.size):
        y[i] = flat[i] if flat[i] > 0 else 0.0
    return y.reshape(x.shape)


@numba.njit(parallel=True, cache=True)
def relu_backward(dy, y):
    """The ReLU output alone decides where the gradient passes (y > 0)."""
    dy_flat = dy.ravel()
    y_flat = y.ravel()
    dx = np.empty_like(dy_flat)
    for i in prange(dy_flat.size):
        dx[i] = dy_flat[i] if y_flat[i] > 0 else 0.0
    return dx.reshape(dy.shape)


@numba.njit(parallel=True, cache=True)
def add_relu_forward(a, b):
    """relu(a + b): the end of a residual block, in one pass over memory."""
    a_flat = a.ravel()
    b_flat = b.ravel()
    y = np.empty_like(a_flat)
    for i in prange(a_flat.size):
        s = a_flat[i] + b_flat[i]
        y[i] = s if s > 0 else 0.0
    return y.reshape(a.shape)


@numba.njit(parallel=True, cache=True)
def shortcut_a_forward(x, out_channels):
    """Option-A shortcut: every other pixel, channels zero-padded equally on both sides."""
    n_img, height, width, in_ch = x.shape
    pad = (out_channels - in_ch) // 2
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    y = np.zeros((n_img, out_h, out_w, out_channels), dtype=x.dtype)
    for n in prange(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for c in range(in_ch):
                    y[n, oy, ox, pad + c] = x[n, 2 * oy, 2 * ox, c]
    return y


@numba.njit(parallel=True, cache=True)
def shortcut_a_backward(dy, height, width, in_channels):
    n_img, out_h, out_w, out_ch = dy.shape
    pad = (out_ch - in_channels) // 2
    dx = np.zeros((n_img, height, width, in_channels), dtype=dy.dtype)
    for n in prange(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for c in range(in_channels):
                    dx[n, 2 * oy, 2 * ox, c] = dy[n, oy, ox, pad + c]
    return dx


@numba.njit(parallel=True, cache=True)
def global_avg_pool_forward(x):
    n_img, height, width, chans = x.shape
    y = np.zeros((n_img, chans), dtype=x.dtype)
    for n in prange(n_img):
        for iy in range(height):
            for ix in range(width):
                for c in range(chans):
                    y[n, c] += x[n, iy, ix, c]
        for c in range(chans):
            y[n, c] /= height * width  # in place, so float32 stays float32
    return y


@numba.njit(parallel=True, cache=True)
def global_avg_pool_backward(dy, height, width):
    n_img, chans = dy.shape
    dx = np.empty((n_img, height, width, chans), dtype=dy.dtype)
    scale = 1.0 / (height * width)
    for n in prange(n_img):
        for iy in range(height):
            for ix in range(width):
                for c in range(chans):
                    dx[n, iy, ix, c] = dy[n, c] * scale
    return dx
