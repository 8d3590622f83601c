"""3x3 convolution (padding 1, stride 1 or 2) on NHWC activations: im2col + BLAS matmul.

Weights arrive in OIHW, the checkpoint layout. The matmul view of a weight is
(3*3*Cin, Cout) with rows ordered (ky, kx, ci), so that one im2col row is a contiguous run
of the NHWC input and the matmul result is already the NHWC output.
"""
import numba
import numpy as np
from numba import prange


@numba.njit(cache=True)
def conv_output_size(size, stride):
    """Output height or width of a 3x3 convolution with padding 1."""
    return (size + 2 - 3) // stride + 1


@numba.njit(parallel=True, cache=True)
def im2col_3x3(x, stride, out):
    """(N, H, W, C) -> `out` (N*Ho*Wo, 9*C) patches, zero where the window hangs over the padding."""
    n_img, height, width, chans = x.shape
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    cols = out.reshape(n_img, out_h, out_w, 3, 3, chans)
    for n in prange(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for ky in range(3):
                    iy = oy * stride + ky - 1
                    for kx in range(3):
                        ix = ox * stride + kx - 1
                        if 0 <= iy < height and 0 <= ix < width:
                            for c in range(chans):
                                cols[n, oy, ox, ky, kx, c] = x[n, iy, ix, c]
                        else:
                            for c in range(chans):
                                cols[n, oy, ox, ky, kx, c] = 0.0
    return out


@numba.njit(parallel=True, cache=True)
def col2im_3x3(dcols, n_img, height, width, chans, stride):
    """Adjoint of im2col_3x3: scatter-add patch gradients back onto the (N, H, W, C) input."""
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    patches = dcols.reshape(n_img, out_h, out_w, 3, 3, chans)
    dx = np.zeros((n_img, height, width, chans), dtype=dcols.dtype)
    for n in prange(n_img):  # images are independent, so the scatter has no write races
        for oy in range(out_h):
            for ox in range(out_w):
                for ky in range(3):
                    iy = oy * stride + ky - 1
                    if iy < 0 or iy >= height:
                        continue
                    for kx in range(3):
                        ix = ox * stride + kx - 1
                        if ix < 0 or ix >= width:
                            continue
                        for c in range(chans):
                            dx[n, iy, ix, c] += patches[n, oy, ox, ky, kx, c]
    return dx


def weight_as_matrix(weight_oihw):
    """OIHW weight -> (9*Cin, Cout) matrix whose rows follow the im2col order (ky, kx, ci)."""
    out_ch, in_ch = weight_oihw.shape[:2]
    return weight_oihw.transpose(2, 3, 1, 0).reshape(9 * in_ch, out_ch)


def im2col_rows(input_shape, stride):
    """Shape of the im2col matrix of an NHWC input."""
    n_img, height, width, chans = input_shape
    return n_img * conv_output_size(height, stride) * conv_output_size(width, stride), 9 * chans


def conv3x3_forward(x, weight_oihw, stride, cols):
    """NHWC output; `cols` (shape `im2col_rows`) receives the patches the backward pass needs.

    The caller owns `cols` and reuses it: a fresh multi-MB array each step would be
    page-faulted in again every time, which costs as much as the copy itself.
    """
    n_img, height, width, _ = x.shape
    im2col_3x3(x, stride, cols)
    y = cols @ weight_as_matrix(weight_oihw)
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    return y.reshape(n_img, out_h, out_w, weight_oihw.shape[0])


def conv3x3_backward(dy, cols, weight_oihw, input_shape, stride, need_input_grad=True):
    """Gradients to the input (None if not needed, as for the stem) and to the OIHW weight.

    `cols` holds the forward patches; it is overwritten with the patch gradients.
    """
    out_ch, in_ch = weight_oihw.shape[:2]
    dy_mat = dy.reshape(-1, out_ch)
    dweight = (cols.T @ dy_mat).reshape(3, 3, in_ch, out_ch).transpose(3, 2, 0, 1)
    dweight = np.ascontiguousarray(dweight)
    if not need_input_grad:
        return None, dweight
    dcols = np.matmul(dy_mat, weight_as_matrix(weight_oihw).T, out=cols)
    n_img, height, width, chans = input_shape
    return col2im_3x3(dcols, n_img, height, width, chans, stride), dweight
