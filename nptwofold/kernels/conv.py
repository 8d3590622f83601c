"""3x3 convolution (padding 1, stride 1 or 2) on NHWC activations, image chunk by image chunk.

Weights arrive in OIHW, the checkpoint layout. The matrix view of a weight is (3*3*Cin, Cout)
with rows ordered (ky, kx, ci), so that one im2col row is a contiguous run of the NHWC input
and a matmul result is already the NHWC output.

Two routes, the same sums:
- **Register-blocked** (where Cout fills whole SIMD vectors: 16 float32 or 8 float64 lanes,
  as in every ResNet-20 layer). Per chunk, the images are copied into a zero border
  (`pad_border`) and a kernel keeps a block of sums in registers (`kernels.simd`): `rows`
  neighbouring output pixels by Cout for the forward, `rows` input channels of one tap by Cout
  for the weight gradient. The input gradient of a stride-1 convolution is the same forward
  kernel applied to dy with the flipped weights (`flipped_matrix`). No patches are built, and
  the kernels run at 100-130 GFLOP/s on one core, where OpenBLAS reached 47-102 on the skinny
  im2col matrices (docs/engine.md).
- **im2col + BLAS** otherwise (odd channel counts; the input gradient of a stride-2
  convolution), and for the CIM simulator, which needs the patches themselves. A chunk is cut
  into blocks of whole images whose patches hold at most BLOCK_VALUES values, in a per-thread
  scratch array that stays in the L2 cache; the backward pass recomputes them instead of
  keeping the batch's patches (9x the input) alive between the passes.

Weight gradients are summed over the chunks in chunk order, so they do not depend on the
thread count.
"""
import functools

import numba
import numpy as np
from llvmlite.binding import get_host_cpu_features

from ..threads import image_chunks, run_parallel, scratch
from .simd import add_row_vector, fma_broadcast, lanes, store_block, zero_block

BLOCK_VALUES = 2 * 32 * 32 * 9 * 16
ROWS_PER_MATMUL = 2048  # rows of a whole-batch matmul per task
# Vectors of sums a direct kernel keeps in registers: 16 of AVX-512's 32. Without AVX-512 a
# 64-byte vector takes two of AVX2's 16 registers; there 4 measured fastest (16 spilled, 44-57
# against 59-67 GFLOP/s; docs/engine.md). Either way the sums are the same, in the same order.
ACCUMULATOR_VECTORS = 16 if get_host_cpu_features().get("avx512f", False) else 4


@numba.njit(cache=True)
def conv_output_size(size, stride):
    """Output height or width of a 3x3 convolution with padding 1."""
    return (size + 2 - 3) // stride + 1


@numba.njit(nogil=True, cache=True)
def im2col_3x3(x, stride, out):
    """(N, H, W, C) -> `out` (N*Ho*Wo, 9*C) patches, zero where the window hangs over the padding.

    A patch row's (ky, kx, ci) values for one ky are the 3*C contiguous values of three
    neighbouring input pixels, so each is copied as one run (zero-filled past the edges):
    1.3-2x faster than copying pixel by pixel, whose C-long copies fell into LLVM's scalar
    remainder loop at 16 channels and below (docs/engine.md)."""
    n_img, height, width, chans = x.shape
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    cols = out.reshape(n_img, out_h, out_w, 3, 3 * chans)
    run, row_values = 3 * chans, width * chans
    for n in range(n_img):
        for oy in range(out_h):
            for ky in range(3):
                iy = oy * stride + ky - 1
                if iy < 0 or iy >= height:
                    cols[n, oy, :, ky, :] = 0.0
                    continue
                # a copy only where x is strided
                row = np.ascontiguousarray(x[n, iy]).reshape(row_values)
                for ox in range(out_w):
                    patch = cols[n, oy, ox, ky]
                    first = (ox * stride - 1) * chans  # the run's first value in the row
                    if first >= 0 and first + run <= row_values:
                        for t in range(run):
                            patch[t] = row[first + t]
                    else:
                        for t in range(run):
                            source = first + t
                            patch[t] = row[source] if 0 <= source < row_values else 0.0
    return out


@numba.njit(nogil=True, cache=True)
def col2im_3x3(dcols, stride, out):
    """Adjoint of im2col_3x3: `out` (N, H, W, C) = the patch gradients scatter-added back."""
    n_img, height, width, chans = out.shape
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    patches = dcols.reshape(n_img, out_h, out_w, 3, 3, chans)
    out[...] = 0.0
    for n in range(n_img):
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
                            out[n, iy, ix, c] += patches[n, oy, ox, ky, kx, c]
    return out


@numba.njit(nogil=True, cache=True)
def pad_border(x, out):
    """`out` (N, H+2, W+2, C) = x inside a border of zeros.

    In flat runs per image: each input row is one run, and the right border of a row and the
    left border of the next are one run of zeros. The runs are views indexed from 0, so that
    LLVM sees non-negative indices and vectorizes the copies (indexing the whole array at a
    run's offset plus t, or 2-D slice copies, were 3-4x slower)."""
    n_img, height, width, chans = x.shape
    row, padded_row = width * chans, (width + 2) * chans
    for n in range(n_img):
        image, padded = np.ascontiguousarray(x[n]).reshape(-1), out[n].reshape(-1)
        padded[:padded_row + chans] = 0.0  # the top row and row 1's left border
        for iy in range(height):
            source = image[iy * row:(iy + 1) * row]
            target = padded[(iy + 1) * padded_row + chans:(iy + 2) * padded_row + 2 * chans]
            for t in range(row):
                target[t] = source[t]
            for t in range(row, row + 2 * chans):
                target[t] = 0.0
        padded[(height + 1) * padded_row + chans:] = 0.0
    return out


@numba.njit(nogil=True, cache=True)
def _window_sums(block, padded, first, pixel_step, matrix):
    """block[r] += the 3x3 window of (N, Hp, Wp, Cin) `padded` at flat index first +
    r * pixel_step, times the (9*Cin, Cout) `matrix`: one FMA per (pixel, output vector) for
    each of the window's values."""
    _, _, pad_w, in_ch = padded.shape
    out_ch = matrix.shape[1]
    source, weights = padded.reshape(-1), matrix.reshape(-1)
    for ky in range(3):
        for kx in range(3):
            window = first + (ky * pad_w + kx) * in_ch
            tap = (ky * 3 + kx) * in_ch
            for c in range(in_ch):
                block = fma_broadcast(block, source, window + c, pixel_step, weights,
                                      (tap + c) * out_ch)
    return block


@functools.cache
def _direct_conv_kernel(rows, vectors):
    """conv(x, padded, matrix, stride, shift, relu, out): `out` (N, Ho, Wo, Cout) = the
    convolution of x (copied into `padded`, inside a zero border) with the (9*Cin, Cout)
    matrix, `rows` output pixels of a row at a time with their Cout = `vectors` vectors of
    sums in registers, to which `shift` is added per channel (then a ReLU if `relu`) before
    they are stored, unless shift is empty.
    One call does all of it: each call from Python takes the GIL back, and at two threads
    the hand-overs cost more than the Python itself. Compiled once per block shape."""

    @numba.njit(nogil=True, cache=True)
    def conv(x, padded, matrix, stride, shift, relu, out):
        pad_border(x, padded)
        _, pad_h, pad_w, in_ch = padded.shape
        n_img, out_h, out_w, out_ch = out.shape
        source, target = padded.reshape(-1), out.reshape(-1)
        pixel_step = stride * in_ch
        whole = out_w - out_w % rows
        shifted = shift.size > 0
        for n in range(n_img):
            for oy in range(out_h):
                first = (n * pad_h + oy * stride) * pad_w * in_ch
                target_first = (n * out_h + oy) * out_w * out_ch
                for ox in range(0, whole, rows):
                    block = _window_sums(zero_block(source, rows, vectors), padded,
                                         first + ox * pixel_step, pixel_step, matrix)
                    if shifted:
                        block = add_row_vector(block, shift, relu)
                    store_block(block, target, target_first + ox * out_ch, out_ch)
                # the tail pixels one by one; a helper shared by both loops (the block passed
                # in and out of it) made the kernel 12 % slower
                for ox in range(whole, out_w):
                    block = _window_sums(zero_block(source, 1, vectors), padded,
                                         first + ox * pixel_step, pixel_step, matrix)
                    if shifted:
                        block = add_row_vector(block, shift, relu)
                    store_block(block, target, target_first + ox * out_ch, out_ch)

    return conv


@numba.njit(nogil=True, cache=True)
def _tap_sums(block, padded, dy, ky, kx, channel, stride):
    """block[r] += sum over the output pixels of padded[the pixel's (ky, kx) tap, channel + r]
    times dy[the pixel]: a `rows`-channel slice of one tap's weight gradient."""
    _, pad_h, pad_w, in_ch = padded.shape
    n_img, out_h, out_w, out_ch = dy.shape
    source, grads = padded.reshape(-1), dy.reshape(-1)
    for n in range(n_img):
        for oy in range(out_h):
            first = ((n * pad_h + oy * stride + ky) * pad_w + kx) * in_ch + channel
            grad_first = (n * out_h + oy) * out_w * out_ch
            for ox in range(out_w):
                block = fma_broadcast(block, source, first + ox * stride * in_ch, 1, grads,
                                      grad_first + ox * out_ch)
    return block


@functools.cache
def _direct_weight_grad_kernel(rows, vectors):
    """weight_grad(x, padded, dy, stride, out): `out` (9*Cin, Cout) = the weight gradient (x
    copied into `padded` first), in blocks of `rows` input channels of one tap by Cout =
    `vectors` vectors, each summed in registers over all the output pixels. Compiled once per
    block shape."""

    @numba.njit(nogil=True, cache=True)
    def weight_grad(x, padded, dy, stride, out):
        pad_border(x, padded)
        in_ch = padded.shape[3]
        out_ch = dy.shape[3]
        target = out.reshape(-1)
        whole = in_ch - in_ch % rows
        for tap in range(9):
            ky, kx = tap // 3, tap % 3
            for c in range(0, whole, rows):
                block = _tap_sums(zero_block(target, rows, vectors), padded, dy, ky, kx, c,
                                  stride)
                store_block(block, target, (tap * in_ch + c) * out_ch, out_ch)
            for c in range(whole, in_ch):
                block = _tap_sums(zero_block(target, 1, vectors), padded, dy, ky, kx, c, stride)
                store_block(block, target, (tap * in_ch + c) * out_ch, out_ch)

    return weight_grad


def _vectors(channels, dtype):
    """SIMD vectors per pixel of `channels` values, or 0 if they do not fill whole vectors
    (then the im2col + BLAS path runs)."""
    if dtype not in (np.float32, np.float64) or channels % lanes(np.dtype(dtype)):
        return 0
    return channels // lanes(np.dtype(dtype))


def _padding_scratch(x):
    """A per-thread array for x inside a border of zeros."""
    n_img, height, width, chans = x.shape
    return scratch("padded", (n_img, height + 2, width + 2, chans), x.dtype)


def direct_conv3x3(x, matrix, stride, out, shift=None, relu=False):
    """`out` = the convolution of NHWC `x` with the (9*Cin, Cout) `matrix`, Cout a whole
    number of vectors, then + `shift` per channel (and a ReLU if `relu`) if a shift is given:
    register-blocked, no im2col."""
    vectors = _vectors(matrix.shape[1], matrix.dtype)
    rows = min(max(1, ACCUMULATOR_VECTORS // vectors), out.shape[2])
    shift = np.empty(0, x.dtype) if shift is None else shift
    # the compiled closures return nothing: an array returned by a cached Numba closure came
    # back with the wrong shape, or not at all
    _direct_conv_kernel(rows, vectors)(x, _padding_scratch(x), matrix, stride, shift, relu, out)
    return out


def direct_weight_grad(x, dy, stride, out):
    """`out` (9*Cin, Cout) = the weight gradient as a matrix, Cout a whole number of vectors."""
    vectors = _vectors(dy.shape[3], dy.dtype)
    rows = min(max(1, ACCUMULATOR_VECTORS // vectors), x.shape[3])
    _direct_weight_grad_kernel(rows, vectors)(x, _padding_scratch(x), dy, stride, out)
    return out


def flipped_matrix(weight_oihw):
    """(9*Cout, Cin) matrix of the input gradient's convolution: dx = conv(dy, flipped), the
    taps reversed and the channels swapped."""
    return weight_as_matrix(weight_oihw[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def weight_as_matrix(weight_oihw):
    """OIHW weight -> contiguous (9*Cin, Cout) matrix whose rows follow the im2col order."""
    out_ch, in_ch = weight_oihw.shape[:2]
    return np.ascontiguousarray(weight_oihw.transpose(2, 3, 1, 0).reshape(9 * in_ch, out_ch))


def im2col_rows(input_shape, stride):
    """Shape of the im2col matrix of an NHWC input."""
    n_img, height, width, chans = input_shape
    return n_img * conv_output_size(height, stride) * conv_output_size(width, stride), 9 * chans


def im2col_batch(x, stride):
    """The whole batch's im2col matrix (for the CIM simulator, which needs every patch), filled
    image chunk by image chunk on the pool."""
    patches = np.empty(im2col_rows(x.shape, stride), x.dtype)
    rows_per_image = patches.shape[0] // max(x.shape[0], 1)
    chunks = image_chunks(x.shape[0])

    def fill_chunk(index):
        start, stop = chunks[index]
        im2col_3x3(x[start:stop], stride, patches[start * rows_per_image:stop * rows_per_image])

    run_parallel(fill_chunk, len(chunks))
    return patches


def im2col_column_sums(x, stride):
    """im2col(x).sum(axis=0), (9*C,) float64, without the patches: column (ky, kx, ci) sums
    the pixels its window offset reads, a strided block of the zero-padded sum over images.
    Exact for integer-valued x (1-bit counts), whatever the order of the sums."""
    _, height, width, chans = x.shape
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    padded = np.zeros((height + 2, width + 2, chans))
    padded[1:-1, 1:-1] = x.sum(axis=0, dtype=np.float64)
    sums = np.empty((3, 3, chans))
    for ky in range(3):
        for kx in range(3):
            sums[ky, kx] = padded[ky:ky + stride * (out_h - 1) + 1:stride,
                                  kx:kx + stride * (out_w - 1) + 1:stride].sum(axis=(0, 1))
    return sums.reshape(-1)


def rows_matmul(a, matrix):
    """a @ matrix with a's rows in fixed chunks on the pool, each converted to the matrix's
    dtype as it is multiplied (a whole-batch matmul runs on one BLAS thread)."""
    out = np.empty((a.shape[0], matrix.shape[1]), np.result_type(matrix.dtype, np.float32))
    chunks = image_chunks(a.shape[0], ROWS_PER_MATMUL)

    def multiply_chunk(index):
        rows = slice(*chunks[index])
        np.matmul(a[rows].astype(matrix.dtype, copy=False), matrix, out=out[rows])

    run_parallel(multiply_chunk, len(chunks))
    return out


def _blocks(start, stop, values_per_image):
    """Sub-ranges of one chunk whose patches fit in a core's L2 cache. The later stages have
    fewer patch values per image, so their blocks take more images: fewer, larger matmuls and
    fewer Python calls per chunk."""
    size = max(1, BLOCK_VALUES // values_per_image)
    return [(first, min(first + size, stop)) for first in range(start, stop, size)]


@numba.njit(nogil=True, cache=True)
def _add_shift(rows, shift, relu):
    """rows (R, C) += shift per channel, then ReLU if `relu`, in place."""
    n_rows, chans = rows.shape
    for i in range(n_rows):
        for c in range(chans):
            value = rows[i, c] + shift[c]
            rows[i, c] = value if value > 0 or not relu else 0.0


def conv3x3_forward(x, weight_oihw, stride, shift=None, relu=False):
    """NHWC output of the convolution of x with an OIHW weight (`conv3x3_matrix_forward`)."""
    return conv3x3_matrix_forward(x, weight_as_matrix(weight_oihw), stride, shift, relu)


def conv3x3_matrix_forward(x, matrix, stride, shift=None, relu=False):
    """NHWC output of the convolution with a (9*Cin, Cout) weight matrix, image chunk by image
    chunk on the pool.

    Register-blocked (`direct_conv3x3`) where Cout fills whole SIMD vectors; otherwise im2col
    into per-thread scratch arrays and a BLAS matmul per block. `shift` (Cout,) is added per
    output channel, then a ReLU if `relu`: with the weights scaled by an inference-mode batch
    norm's scale, that is conv -> BN (-> ReLU) in one pass, on each chunk's or block's output
    while it is still in the cache.
    """
    n_img, height, width, in_ch = x.shape
    out_h, out_w = conv_output_size(height, stride), conv_output_size(width, stride)
    y = np.empty((n_img, out_h, out_w, matrix.shape[1]), dtype=x.dtype)
    chunks = image_chunks(n_img)
    direct = _vectors(matrix.shape[1], x.dtype) > 0

    def forward_chunk(index):
        if direct:
            start, stop = chunks[index]
            direct_conv3x3(x[start:stop], matrix, stride, y[start:stop], shift, relu)
            return
        for start, stop in _blocks(*chunks[index], out_h * out_w * 9 * in_ch):
            patches = scratch("cols", im2col_rows((stop - start, height, width, in_ch), stride),
                              x.dtype)
            im2col_3x3(x[start:stop], stride, patches)
            rows = y[start:stop].reshape(patches.shape[0], -1)
            np.matmul(patches, matrix, out=rows)
            if shift is not None:
                _add_shift(rows, shift, relu)

    run_parallel(forward_chunk, len(chunks))
    return y


def conv3x3_backward(dy, x, weight_oihw, stride, need_input_grad=True):
    """Gradients to the NHWC input `x` (None if not needed, as for the stem) and the OIHW weight.

    Per image chunk: the weight gradient register-blocked (`direct_weight_grad`) where Cout
    fills whole SIMD vectors, and the input gradient of a stride-1 convolution as the
    convolution of dy with the flipped weights (`direct_conv3x3`) where Cin does; otherwise
    per block the patches are recomputed (im2col) for the weight gradient's matmul, and dy @
    W^T is scattered back (col2im) for the input gradient.
    """
    out_ch, in_ch = weight_oihw.shape[:2]
    n_img, height, width, _ = x.shape
    matrix = weight_as_matrix(weight_oihw)
    chunks = image_chunks(n_img)
    patch_values = conv_output_size(height, stride) * conv_output_size(width, stride) * 9 * in_ch
    partial_dweight = np.zeros((len(chunks), 9 * in_ch, out_ch), dtype=dy.dtype)
    dx = np.empty_like(x) if need_input_grad else None
    direct_weight = _vectors(out_ch, dy.dtype) > 0
    direct_input = need_input_grad and stride == 1 and _vectors(in_ch, dy.dtype) > 0
    flipped = flipped_matrix(weight_oihw) if direct_input else None

    def backward_chunk(index):
        first, last = chunks[index]
        if direct_weight:
            direct_weight_grad(x[first:last], dy[first:last], stride, partial_dweight[index])
        if direct_input:
            direct_conv3x3(dy[first:last], flipped, 1, dx[first:last])
        if direct_weight and (direct_input or not need_input_grad):
            return
        block_dweight = scratch("dweight", partial_dweight.shape[1:], dy.dtype)
        for start, stop in _blocks(first, last, patch_values):  # in order: reproducible
            patches = scratch("cols", im2col_rows((stop - start, height, width, in_ch), stride),
                              x.dtype)
            dy_rows = dy[start:stop].reshape(patches.shape[0], out_ch)
            if not direct_weight:
                im2col_3x3(x[start:stop], stride, patches)
                partial_dweight[index] += np.matmul(patches.T, dy_rows, out=block_dweight)
            if need_input_grad and not direct_input:
                dpatches = np.matmul(dy_rows, matrix.T, out=patches)  # the patches are spent
                col2im_3x3(dpatches, stride, dx[start:stop])

    run_parallel(backward_chunk, len(chunks))
    dweight_matrix = partial_dweight[0].copy()
    for partial in partial_dweight[1:]:  # chunk order, whatever thread computed each
        dweight_matrix += partial
    dweight = dweight_matrix.reshape(3, 3, in_ch, out_ch).transpose(3, 2, 0, 1)
    return dx, np.ascontiguousarray(dweight)
