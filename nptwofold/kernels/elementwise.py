"""Element-wise and reshaping kernels of ResNet-20: ReLU, option-A shortcut, global average pool.

The ReLU and add kernels run on the engine's thread pool over the fixed image chunks; the
shortcut and the pooling move little memory and run on the calling thread. Every kernel
releases the GIL: inference runs whole image chunks through the network on several threads at
once.
"""
import numba
import numpy as np

from ..threads import image_chunks, run_parallel


@numba.njit(nogil=True, cache=True)
def _relu(x, y):
    for i in range(x.size):
        y[i] = x[i] if x[i] > 0 else 0.0


@numba.njit(nogil=True, cache=True)
def _relu_grad(dy, y, dx):
    for i in range(dy.size):
        dx[i] = dy[i] if y[i] > 0 else 0.0


@numba.njit(nogil=True, cache=True)
def _add(a, b, y):
    for i in range(a.size):
        y[i] = a[i] + b[i]


@numba.njit(nogil=True, cache=True)
def _add_relu(a, b, y):
    for i in range(a.size):
        s = a[i] + b[i]
        y[i] = s if s > 0 else 0.0


def _map_chunks(kernel, *inputs):
    """kernel(flat input chunks..., flat output chunk) over the image chunks; returns the output."""
    out = np.empty_like(inputs[0])
    chunks = image_chunks(out.shape[0])

    def run_chunk(index):
        start, stop = chunks[index]
        kernel(*[a[start:stop].reshape(-1) for a in (*inputs, out)])

    run_parallel(run_chunk, len(chunks))
    return out


def relu_forward(x):
    return _map_chunks(_relu, x)


def relu_backward(dy, y):
    """The ReLU output alone decides where the gradient passes (y > 0)."""
    return _map_chunks(_relu_grad, dy, y)


def add(a, b):
    """a + b on the pool (a residual block's two input gradients)."""
    return _map_chunks(_add, a, b)


def add_relu_forward(a, b):
    """relu(a + b): the end of a residual block, in one pass over memory."""
    return _map_chunks(_add_relu, a, b)


@numba.njit(nogil=True, cache=True)
def shortcut_a_forward(x, out_channels):
    """Option-A shortcut: every other pixel, channels zero-padded equally on both sides."""
    n_img, height, width, in_ch = x.shape
    pad = (out_channels - in_ch) // 2
    out_h, out_w = (height + 1) // 2, (width + 1) // 2
    y = np.zeros((n_img, out_h, out_w, out_channels), dtype=x.dtype)
    for n in range(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for c in range(in_ch):
                    y[n, oy, ox, pad + c] = x[n, 2 * oy, 2 * ox, c]
    return y


@numba.njit(nogil=True, cache=True)
def shortcut_a_backward(dy, height, width, in_channels):
    n_img, out_h, out_w, out_ch = dy.shape
    pad = (out_ch - in_channels) // 2
    dx = np.zeros((n_img, height, width, in_channels), dtype=dy.dtype)
    for n in range(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for c in range(in_channels):
                    dx[n, 2 * oy, 2 * ox, c] = dy[n, oy, ox, pad + c]
    return dx


@numba.njit(nogil=True, cache=True)
def global_avg_pool_forward(x):
    n_img, height, width, chans = x.shape
    y = np.zeros((n_img, chans), dtype=x.dtype)
    for n in range(n_img):
        for iy in range(height):
            for ix in range(width):
                for c in range(chans):
                    y[n, c] += x[n, iy, ix, c]
        for c in range(chans):
            y[n, c] /= height * width  # in place, so float32 stays float32
    return y


@numba.njit(nogil=True, cache=True)
def global_avg_pool_backward(dy, height, width):
    n_img, chans = dy.shape
    dx = np.empty((n_img, height, width, chans), dtype=dy.dtype)
    scale = 1.0 / (height * width)
    for n in range(n_img):
        for iy in range(height):
            for ix in range(width):
                for c in range(chans):
                    dx[n, iy, ix, c] = dy[n, c] * scale
    return dx
