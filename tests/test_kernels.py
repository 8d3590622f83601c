"""Every fast kernel against a slow, obviously-correct plain-NumPy / plain-Python reference.

The references below are deliberately naive (explicit loops, textbook formulas) and never call
the package. They run on float64 copies of the inputs, so a float32 kernel is compared with the
exact-arithmetic answer for its own (already rounded) inputs.
"""

import numpy as np
import pytest

from nptwofold.kernels.augment import CROP_PAD, crop_flip_to_float, to_float
from nptwofold.kernels.batchnorm import (batchnorm_backward, batchnorm_forward_train,
                                         channel_affine, channel_moments)
from nptwofold.kernels.cim_events import activation_ones
from nptwofold.kernels import conv
from nptwofold.kernels.conv import (col2im_3x3, conv3x3_backward, conv3x3_forward, im2col_3x3,
                                    im2col_batch, im2col_column_sums, im2col_rows,
                                    rows_matmul)
from nptwofold.kernels.elementwise import (add, add_relu_forward, global_avg_pool_backward,
                                           global_avg_pool_forward, relu_backward, relu_forward,
                                           shortcut_a_backward, shortcut_a_forward)
from nptwofold.kernels.linear import linear_backward, linear_forward
from nptwofold.kernels.loss import distillation_loss, softmax_cross_entropy
from nptwofold.kernels.optim import sgd_momentum_update
from nptwofold.layers import BatchNorm, ShortcutA

DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def assert_close(actual, expected, dtype, rtol=None, scale=None):
    """Element-wise closeness, with the absolute slack scaled by the largest expected value
    (or by `scale`, the size of the terms that cancel, where the result is ill-conditioned)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    rtol = RTOL[dtype] if rtol is None else rtol
    if scale is None:
        scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rtol, atol=rtol * scale)


def random(rng, shape, dtype, scale=1.0, offset=0.0):
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Reference implementations (slow, loops over plain Python floats)
# --------------------------------------------------------------------------------------------

def out_size(size, stride):
    """Output length of a 3x3 window, padding 1: count the starts -1, -1+s, ... <= size-2."""
    return len(range(-1, size - 1, stride))


def reference_conv3x3(x, weight, stride):
    """Direct convolution (cross-correlation as in PyTorch), zero padding 1, 7 nested loops."""
    n_img, height, width, in_ch = x.shape
    out_ch = weight.shape[0]
    out_h, out_w = out_size(height, stride), out_size(width, stride)
    xs, ws = x.astype(np.float64).tolist(), weight.astype(np.float64).tolist()
    y = np.zeros((n_img, out_h, out_w, out_ch))
    for n in range(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for o in range(out_ch):
                    acc = 0.0
                    for ci in range(in_ch):
                        for ky in range(3):
                            for kx in range(3):
                                iy, ix = oy * stride + ky - 1, ox * stride + kx - 1
                                if 0 <= iy < height and 0 <= ix < width:
                                    acc += xs[n][iy][ix][ci] * ws[o][ci][ky][kx]
                    y[n, oy, ox, o] = acc
    return y


def reference_conv3x3_backward(dy, x, weight, stride):
    """The adjoint of the convolution, read off its definition y[n,oy,ox,o] = sum x*w.

    Every product x[n,iy,ix,ci] * w[o,ci,ky,kx] that reaches y[n,oy,ox,o] sends
    dy[n,oy,ox,o] * w back to x and dy[n,oy,ox,o] * x back to w.
    """
    n_img, height, width, in_ch = x.shape
    out_ch = weight.shape[0]
    out_h, out_w = dy.shape[1:3]
    xs, ws, dys = (a.astype(np.float64).tolist() for a in (x, weight, dy))
    dx = np.zeros(x.shape)
    dw = np.zeros(weight.shape)
    for n in range(n_img):
        for oy in range(out_h):
            for ox in range(out_w):
                for o in range(out_ch):
                    g = dys[n][oy][ox][o]
                    for ci in range(in_ch):
                        for ky in range(3):
                            for kx in range(3):
                                iy, ix = oy * stride + ky - 1, ox * stride + kx - 1
                                if 0 <= iy < height and 0 <= ix < width:
                                    dx[n, iy, ix, ci] += g * ws[o][ci][ky][kx]
                                    dw[o, ci, ky, kx] += g * xs[n][iy][ix][ci]
    return dx, dw


def reference_batchnorm_forward(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)  # biased, two-pass
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * inv_std
    return xhat * gamma + beta, xhat, mean, var, inv_std


def reference_batchnorm_backward(dy, xhat, gamma, inv_std, relu_output=None):
    """Textbook (Ioffe & Szegedy 2015): dx = g/(N sigma) (N dy - sum dy - xhat sum dy xhat),
    dy first masked where a following ReLU's output is 0."""
    dy, xhat = dy.astype(np.float64), xhat.astype(np.float64)
    if relu_output is not None:
        dy = np.where(relu_output > 0, dy, 0.0)
    rows = dy.shape[0]
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    dx = gamma.astype(np.float64) * inv_std.astype(np.float64) / rows * (
        rows * dy - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def reference_shortcut_a(x, out_channels):
    pad = (out_channels - x.shape[-1]) // 2
    sub = x[:, ::2, ::2, :]
    return np.pad(sub, ((0, 0), (0, 0), (0, 0), (pad, out_channels - x.shape[-1] - pad)))


def reference_softmax_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    n_rows, n_classes = logits.shape
    loss, correct = 0.0, 0
    dlogits = np.zeros_like(logits)
    for n in range(n_rows):
        row = logits[n]
        top = row.max()
        log_norm = top + np.log(np.sum(np.exp(row - top)))
        loss += log_norm - row[labels[n]]
        dlogits[n] = np.exp(row - log_norm)
        dlogits[n, labels[n]] -= 1.0
        correct += int(np.argmax(row) == labels[n])
    return loss / n_rows, dlogits / n_rows, correct


def reference_distillation_loss(logits, teacher_logits, labels, temperature, weight):
    """Hinton's loss written out with scipy-free NumPy, one row at a time."""
    def softmax(row):
        e = np.exp(row - row.max())
        return e / e.sum()

    logits, teacher_logits = logits.astype(np.float64), teacher_logits.astype(np.float64)
    n_rows = len(logits)
    hard_loss, dhard, correct = reference_softmax_cross_entropy(logits, labels)
    soft_loss, dsoft = 0.0, np.zeros_like(logits)
    for n in range(n_rows):
        student = softmax(logits[n] / temperature)
        teacher = softmax(teacher_logits[n] / temperature)
        soft_loss += temperature ** 2 * np.sum(teacher * np.log(teacher / student))
        dsoft[n] = temperature * (student - teacher)
    return ((1 - weight) * hard_loss + weight * soft_loss / n_rows,
            (1 - weight) * dhard + weight * dsoft / n_rows, correct)


def reference_sgd(param, grads, lrs, momentum, weight_decay, nesterov):
    """torch.optim.SGD's documented algorithm (dampening 0, maximize False), one lr per step."""
    p = param.astype(np.float64)
    buf = None
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = g.copy() if t == 1 else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p, buf


def reference_crop_flip(images, offset_y, offset_x, flip):
    padded = np.pad(images, ((0, 0), (CROP_PAD, CROP_PAD), (CROP_PAD, CROP_PAD), (0, 0)))
    _, height, width, _ = images.shape
    out = []
    for n in range(len(images)):
        crop = padded[n, offset_y[n]:offset_y[n] + height, offset_x[n]:offset_x[n] + width]
        if flip[n]:
            crop = crop[:, ::-1]
        out.append(crop.astype(np.float64) / 255.0)
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------

# (N, H, W, Cin, Cout, stride): odd sizes, odd channel counts, non-square, tiny, stride 2;
# batches over CHUNK_IMAGES (8) images are cut into chunks, the last one shorter
CONV_CASES = [
    (11, 4, 5, 3, 2, 1),
    (17, 5, 3, 2, 3, 2),
    (2, 5, 5, 3, 5, 1),
    (1, 7, 9, 5, 3, 1),
    (2, 9, 7, 3, 4, 2),
    (1, 5, 5, 3, 5, 2),
    (2, 6, 4, 2, 3, 2),
    (1, 8, 8, 4, 4, 2),
    (1, 1, 1, 3, 2, 1),
    (1, 2, 3, 3, 5, 2),
    # output channels filling whole SIMD vectors (16 float32 or 8 float64 lanes): the
    # register-blocked kernels, with pixel and channel blocks that leave tails
    (2, 5, 6, 16, 16, 1),
    (2, 4, 19, 20, 16, 1),
    (3, 6, 7, 16, 32, 2),
    (1, 6, 6, 8, 64, 1),
    (2, 5, 3, 3, 48, 2),
]


def conv_inputs(case, dtype, seed):
    n_img, height, width, in_ch, out_ch, stride = case
    rng = np.random.default_rng(seed)
    x = random(rng, (n_img, height, width, in_ch), dtype)
    weight = random(rng, (out_ch, in_ch, 3, 3), dtype)
    return x, weight, stride, rng


def test_im2col_rows_matches_reference_output_size():
    for height in range(1, 12):
        for stride in (1, 2):
            rows, width = im2col_rows((3, height, height + 1, 5), stride)
            assert rows == 3 * out_size(height, stride) * out_size(height + 1, stride)
            assert width == 45


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3x3_forward(case, dtype):
    x, weight, stride, _ = conv_inputs(case, dtype, seed=10)
    y = conv3x3_forward(x, weight, stride)
    assert y.dtype == dtype
    assert_close(y, reference_conv3x3(x, weight, stride), dtype)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3x3_forward_with_shift_and_relu(case, relu):
    x, weight, stride, rng = conv_inputs(case, np.float64, seed=12)
    shift = rng.standard_normal(weight.shape[0])
    y = conv3x3_forward(x, weight, stride, shift, relu)
    expected = reference_conv3x3(x, weight, stride) + shift
    assert_close(y, np.maximum(expected, 0) if relu else expected, np.float64)


@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3x3_backward(case, dtype, need_input_grad):
    x, weight, stride, rng = conv_inputs(case, dtype, seed=11)
    y = conv3x3_forward(x, weight, stride)
    dy = random(rng, y.shape, dtype)
    dx, dweight = conv3x3_backward(dy, x, weight, stride, need_input_grad=need_input_grad)
    ref_dx, ref_dw = reference_conv3x3_backward(dy, x, weight, stride)
    assert dweight.shape == weight.shape and dweight.dtype == dtype
    assert_close(dweight, ref_dw, dtype)
    if need_input_grad:
        assert dx.shape == x.shape and dx.dtype == dtype
        assert_close(dx, ref_dx, dtype)
    else:
        assert dx is None


DIRECT_CASES = [case for case in CONV_CASES if case[4] % 16 == 0]


@pytest.mark.parametrize("accumulators", [16, 4])  # with AVX-512, and without
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DIRECT_CASES)
def test_register_blocked_kernels(case, dtype, accumulators, monkeypatch):
    """The direct kernels themselves (the layer's functions fall back to im2col silently):
    forward, weight gradient and, as the convolution of dy with the flipped weights, the
    stride-1 input gradient."""
    monkeypatch.setattr(conv, "ACCUMULATOR_VECTORS", accumulators)
    x, weight, stride, rng = conv_inputs(case, dtype, seed=16)
    out_ch, in_ch = weight.shape[:2]
    matrix = conv.weight_as_matrix(weight)
    y = conv.direct_conv3x3(x, matrix, stride, np.full((x.shape[0], out_size(x.shape[1], stride),
                                                       out_size(x.shape[2], stride), out_ch),
                                                      np.nan, dtype))
    assert_close(y, reference_conv3x3(x, weight, stride), dtype)
    dy = random(rng, y.shape, dtype)
    ref_dx, ref_dw = reference_conv3x3_backward(dy, x, weight, stride)
    dweight = conv.direct_weight_grad(x, dy, stride, np.full((9 * in_ch, out_ch), np.nan, dtype))
    assert_close(dweight.reshape(3, 3, in_ch, out_ch).transpose(3, 2, 0, 1), ref_dw, dtype)
    if stride == 1 and in_ch % conv.lanes(np.dtype(dtype)) == 0:
        dx = conv.direct_conv3x3(dy, conv.flipped_matrix(weight), 1,
                                 np.full(x.shape, np.nan, dtype))
        assert_close(dx, ref_dx, dtype)


def test_pad_border():
    x = np.random.default_rng(17).standard_normal((3, 4, 5, 6))
    padded = conv.pad_border(x, np.full((3, 6, 7, 6), np.nan))
    np.testing.assert_array_equal(padded, np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    mirrored = x[:, :, ::-1]  # strided
    np.testing.assert_array_equal(conv.pad_border(mirrored, np.empty((3, 6, 7, 6))),
                                  np.pad(mirrored, ((0, 0), (1, 1), (1, 1), (0, 0))))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3x3_backward_is_adjoint_of_forward(case):
    """<conv(x, w), dy> == <x, dx> == <w, dw> (the conv is linear in x and in w)."""
    x, weight, stride, rng = conv_inputs(case, np.float64, seed=12)
    y = conv3x3_forward(x, weight, stride)
    dy = rng.standard_normal(y.shape)
    dx, dweight = conv3x3_backward(dy, x, weight, stride)
    inner = np.sum(y * dy)
    assert np.sum(x * dx) == pytest.approx(inner, rel=1e-12, abs=1e-12)
    assert np.sum(weight * dweight) == pytest.approx(inner, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_col2im_adjoint(case, dtype):
    x, _, stride, rng = conv_inputs(case, dtype, seed=13)
    cols = np.full(im2col_rows(x.shape, stride), np.nan, dtype=dtype)
    im2col_3x3(x, stride, cols)
    c = random(rng, cols.shape, dtype)
    # garbage in the output buffer must not leak into the sums (col2im starts from zero)
    back = col2im_3x3(c, stride, np.full(x.shape, np.nan, dtype=dtype))
    assert back.shape == x.shape and back.dtype == dtype
    lhs = np.sum(cols.astype(np.float64) * c)
    rhs = np.sum(x.astype(np.float64) * back.astype(np.float64))
    assert rhs == pytest.approx(lhs, rel=10 * RTOL[dtype], abs=10 * RTOL[dtype])


def test_im2col_patch_layout():
    """An im2col row is the (ky, kx, ci) window of the zero-padded input; rows in (n, oy, ox)."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 5, 4, 3))
    for stride in (1, 2):
        cols = np.full(im2col_rows(x.shape, stride), np.nan)
        im2col_3x3(x, stride, cols)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        row = 0
        for n in range(2):
            for oy in range(out_size(5, stride)):
                for ox in range(out_size(4, stride)):
                    window = padded[n, oy * stride:oy * stride + 3, ox * stride:ox * stride + 3, :]
                    np.testing.assert_array_equal(cols[row], window.reshape(-1))
                    row += 1
        assert row == cols.shape[0]
        mirrored = x[:, :, ::-1, :]  # a strided view: the same patches as its copy
        np.testing.assert_array_equal(
            im2col_3x3(mirrored, stride, np.empty_like(cols)),
            im2col_3x3(np.ascontiguousarray(mirrored), stride, np.empty_like(cols)))


@pytest.mark.parametrize("images_per_block", [1, 3])
def test_conv3x3_blocks_smaller_than_a_chunk(monkeypatch, images_per_block):
    """Blocks of fewer images than a chunk (the 32x32 stage's case), the last one shorter."""
    x, weight, stride, rng = conv_inputs((11, 4, 5, 3, 2, 1), np.float64, seed=15)
    monkeypatch.setattr(conv, "BLOCK_VALUES", images_per_block * 4 * 5 * 9 * 3)
    y = conv3x3_forward(x, weight, stride)
    assert_close(y, reference_conv3x3(x, weight, stride), np.float64)
    dy = rng.standard_normal(y.shape)
    dx, dweight = conv3x3_backward(dy, x, weight, stride)
    ref_dx, ref_dw = reference_conv3x3_backward(dy, x, weight, stride)
    assert_close(dx, ref_dx, np.float64)
    assert_close(dweight, ref_dw, np.float64)


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_batch_is_im2col_of_the_whole_batch(stride):
    x = random(np.random.default_rng(16), (19, 5, 4, 3), np.float32)  # 3 chunks, last short
    expected = im2col_3x3(x, stride, np.empty(im2col_rows(x.shape, stride), np.float32))
    np.testing.assert_array_equal(im2col_batch(x, stride), expected)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(3, 5, 4, 2), (2, 6, 7, 3), (1, 1, 1, 1)])
def test_im2col_column_sums_are_the_patch_matrix_column_sums(shape, stride):
    counts = np.random.default_rng(18).integers(0, 9, shape).astype(np.float64)
    patches = im2col_3x3(counts, stride, np.empty(im2col_rows(shape, stride)))
    np.testing.assert_array_equal(im2col_column_sums(counts, stride), patches.sum(axis=0))


def test_activation_ones_counts_the_bits_of_each_level():
    levels = np.random.default_rng(19).integers(0, 256, (19, 3, 2, 5)).astype(np.float32)
    expected = np.array([bin(int(level)).count("1") for level in levels.ravel()])
    np.testing.assert_array_equal(activation_ones(levels), expected.reshape(levels.shape))


def test_rows_matmul_is_exact_on_integer_levels():
    """The CIM simulator's integer products: float32 sums below 2^24 are exact, so the row
    chunks (5,000 rows: three of them) give the integer matmul exactly, inputs of any dtype."""
    rng = np.random.default_rng(17)
    levels = rng.integers(0, 256, (5000, 40)).astype(np.uint8)
    weights = rng.integers(-127, 128, (40, 6))
    product = rows_matmul(levels, weights.astype(np.float32))
    assert product.dtype == np.float32
    np.testing.assert_array_equal(product, levels.astype(np.int64) @ weights)
    assert rows_matmul(levels, weights.astype(np.float64)).dtype == np.float64


# --------------------------------------------------------------------------------------------
# Batch normalisation
# --------------------------------------------------------------------------------------------

BN_SHAPES = [(7, 3), (50, 5), (1000, 16), (33, 1), (2, 4)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_forward_train(shape, dtype, relu):
    rng = np.random.default_rng(20)
    rows, chans = shape
    # per-channel means and spreads of different sizes (mean up to ~3 sigma)
    x = (rng.uniform(-3, 3, chans) + rng.uniform(0.3, 2.0, chans)
         * rng.standard_normal(shape)).astype(dtype)
    gamma = random(rng, chans, dtype, offset=1.0)
    beta = random(rng, chans, dtype)
    eps = 1e-5
    y, mean, var, inv_std = batchnorm_forward_train(x, gamma, beta, eps, relu)
    ref_y, _, ref_mean, ref_var, ref_inv_std = reference_batchnorm_forward(x, gamma, beta, eps)
    assert y.dtype == dtype and inv_std.dtype == dtype
    assert_close(y, np.maximum(ref_y, 0) if relu else ref_y, dtype, scale=np.abs(ref_y).max())
    assert_close(mean, ref_mean, dtype)
    assert_close(var, ref_var, dtype, rtol=max(RTOL[dtype], 1e-10))
    assert_close(inv_std, ref_inv_std, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_forward_mean_offset(dtype):
    """E[x^2] - E[x]^2 cancels when |mean| >> std; a mean 30 sigma away must stay accurate."""
    rng = np.random.default_rng(24)
    x = random(rng, (4096, 3), dtype, offset=30.0)
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    y, mean, var, inv_std = batchnorm_forward_train(x, gamma, beta, 1e-5)
    ref_y, _, ref_mean, ref_var, _ = reference_batchnorm_forward(x, gamma, beta, 1e-5)
    assert_close(mean, ref_mean, dtype)
    assert_close(var, ref_var, dtype)
    assert_close(inv_std, 1.0 / np.sqrt(ref_var + 1e-5), dtype)
    assert_close(y, ref_y, dtype)


def test_batchnorm_forward_constant_channel():
    """A constant channel has variance 0 (never negative from rounding), so y = beta."""
    x = np.full((64, 2), 0.1, np.float32)
    x[:, 1] = np.linspace(-1, 1, 64)
    gamma = np.array([2.0, 1.0], np.float32)
    beta = np.array([0.5, 0.0], np.float32)
    y, _, var, inv_std = batchnorm_forward_train(x, gamma, beta, 1e-5)
    assert var[0] >= 0 and np.all(np.isfinite(inv_std))
    np.testing.assert_allclose(y[:, 0], 0.5, atol=2e-3)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_backward(shape, dtype, relu):
    rng = np.random.default_rng(21)
    rows, chans = shape
    x = random(rng, shape, dtype, scale=1.5, offset=0.5)
    gamma = random(rng, chans, dtype, offset=1.0)
    beta = random(rng, chans, dtype)
    y, mean, _, inv_std = batchnorm_forward_train(x, gamma, beta, 1e-5, relu)
    relu_output = y if relu else None
    # xhat as the kernels compute it, in x's dtype from the rounded mean and 1/std
    xhat = (x - mean.astype(dtype)) * inv_std
    dy = random(rng, shape, dtype)
    dx, dgamma, dbeta = batchnorm_backward(dy, x, mean, inv_std, gamma, relu_output)
    ref_dx, ref_dgamma, ref_dbeta = reference_batchnorm_backward(dy, xhat, gamma, inv_std,
                                                                 relu_output)
    assert dx.dtype == dtype and dgamma.dtype == dtype and dbeta.dtype == dtype
    # dx cancels terms of size |gamma inv_std dy| (exactly, for two rows); judge it on that scale
    term_scale = float(np.abs(gamma.astype(np.float64) * inv_std * dy).max())
    assert_close(dx, ref_dx, dtype, scale=max(term_scale, float(np.abs(ref_dx).max())))
    assert_close(dgamma, ref_dgamma, dtype)
    assert_close(dbeta, ref_dbeta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_channel_affine(shape, dtype):
    rng = np.random.default_rng(22)
    x = random(rng, shape, dtype)
    scale = random(rng, shape[1], dtype)
    shift = random(rng, shape[1], dtype)
    y = channel_affine(x, scale, shift)
    assert y.dtype == dtype
    expected = np.empty(shape)
    for i in range(shape[0]):
        for c in range(shape[1]):
            expected[i, c] = float(x[i, c]) * float(scale[c]) + float(shift[c])
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BN_SHAPES + [(31, 3), (32, 2), (65, 7)])
def test_channel_moments(shape, dtype):
    rng = np.random.default_rng(23)
    a = random(rng, shape, dtype, offset=0.7)
    b = random(rng, shape, dtype)
    sum_a, sum_ab = channel_moments(a, b)
    ref_a, ref_ab = np.zeros(shape[1]), np.zeros(shape[1])
    for i in range(shape[0]):
        for c in range(shape[1]):
            ref_a[c] += float(a[i, c])
            ref_ab[c] += float(a[i, c]) * float(b[i, c])
    assert sum_a.dtype == np.float64 and sum_ab.dtype == np.float64
    np.testing.assert_allclose(sum_a, ref_a, rtol=1e-12, atol=1e-12 * shape[0])
    assert_close(sum_ab, ref_ab, dtype, rtol=max(RTOL[dtype] / 10, 1e-12))


# --------------------------------------------------------------------------------------------
# Element-wise kernels, shortcut, pooling
# --------------------------------------------------------------------------------------------

ACT_SHAPES = [(2, 5, 5, 3), (1, 7, 9, 5), (3, 4, 6, 16), (1, 1, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_relu_forward_backward(shape, dtype):
    rng = np.random.default_rng(30)
    x = random(rng, shape, dtype)
    x.flat[0] = 0.0  # the kink itself: output 0, gradient blocked
    y = relu_forward(x)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
    dy = random(rng, shape, dtype)
    dx = relu_backward(dy, y)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES)
def test_add_relu_forward(shape, dtype):
    rng = np.random.default_rng(31)
    a = random(rng, shape, dtype)
    b = random(rng, shape, dtype)
    y = add_relu_forward(a, b)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, np.maximum(a + b, 0))
    total = add(a, b)
    assert total.dtype == dtype and total.shape == shape
    np.testing.assert_array_equal(total, a + b)


# (N, H, W, Cin, Cout): the ResNet cases 16->32, 32->64 and odd spatial sizes
SHORTCUT_CASES = [(2, 8, 8, 16, 32), (1, 5, 5, 3, 7), (2, 7, 9, 4, 8), (1, 1, 1, 2, 6),
                  (2, 6, 3, 5, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHORTCUT_CASES)
def test_shortcut_a(case, dtype):
    n_img, height, width, in_ch, out_ch = case
    rng = np.random.default_rng(32)
    x = random(rng, (n_img, height, width, in_ch), dtype)
    y = shortcut_a_forward(x, out_ch)
    assert y.dtype == dtype
    expected = reference_shortcut_a(x, out_ch)
    assert expected.shape == (n_img, (height + 1) // 2, (width + 1) // 2, out_ch)
    np.testing.assert_array_equal(y, expected)
    # backward: the adjoint of "subsample then zero-pad", by explicit loops
    dy = random(rng, y.shape, dtype)
    dx = shortcut_a_backward(dy, height, width, in_ch)
    assert dx.dtype == dtype
    pad = (out_ch - in_ch) // 2
    ref_dx = np.zeros(x.shape)
    for n in range(n_img):
        for iy in range(0, height, 2):
            for ix in range(0, width, 2):
                for c in range(in_ch):
                    ref_dx[n, iy, ix, c] = dy[n, iy // 2, ix // 2, c + pad]
    np.testing.assert_array_equal(dx, ref_dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_SHAPES + [(2, 8, 8, 64)])
def test_global_avg_pool(shape, dtype):
    rng = np.random.default_rng(33)
    x = random(rng, shape, dtype, offset=0.3)
    y = global_avg_pool_forward(x)
    assert y.dtype == dtype and y.shape == (shape[0], shape[3])
    assert_close(y, x.astype(np.float64).mean(axis=(1, 2)), dtype)
    dy = random(rng, y.shape, dtype)
    dx = global_avg_pool_backward(dy, shape[1], shape[2])
    assert dx.dtype == dtype and dx.shape == shape
    expected = np.empty(shape)
    for n in range(shape[0]):
        for c in range(shape[3]):
            expected[n, :, :, c] = float(dy[n, c]) / (shape[1] * shape[2])
    assert_close(dx, expected, dtype)


# --------------------------------------------------------------------------------------------
# Fully connected layer, loss, optimiser
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 10), (5, 3, 7), (1, 1, 1), (7, 9, 4)])
def test_linear(shape, dtype):
    n_rows, in_features, out_features = shape
    rng = np.random.default_rng(40)
    x = random(rng, (n_rows, in_features), dtype)
    weight = random(rng, (out_features, in_features), dtype)
    bias = random(rng, out_features, dtype)
    y = linear_forward(x, weight, bias)
    assert y.dtype == dtype
    ref_y = np.zeros((n_rows, out_features))
    for n in range(n_rows):
        for o in range(out_features):
            ref_y[n, o] = float(bias[o]) + sum(float(x[n, i]) * float(weight[o, i])
                                               for i in range(in_features))
    assert_close(y, ref_y, dtype)

    dy = random(rng, y.shape, dtype)
    dx, dweight, dbias = linear_backward(dy, x, weight)
    assert dx.dtype == dtype and dweight.dtype == dtype and dbias.dtype == dtype
    x64, w64, dy64 = x.astype(np.float64), weight.astype(np.float64), dy.astype(np.float64)
    ref_dx = np.array([[sum(dy64[n, o] * w64[o, i] for o in range(out_features))
                        for i in range(in_features)] for n in range(n_rows)])
    ref_dw = np.array([[sum(dy64[n, o] * x64[n, i] for n in range(n_rows))
                        for i in range(in_features)] for o in range(out_features)])
    ref_db = np.array([sum(dy64[n, o] for n in range(n_rows)) for o in range(out_features)])
    assert_close(dx, ref_dx, dtype)
    assert_close(dweight, ref_dw, dtype)
    assert_close(dbias, ref_db, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1000.0])
def test_softmax_cross_entropy(scale, dtype):
    rng = np.random.default_rng(41)
    logits = random(rng, (16, 10), dtype, scale=scale)
    labels = rng.integers(0, 10, 16)
    labels[:4] = np.argmax(logits[:4], axis=1)  # some hits for sure
    loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    ref_loss, ref_dlogits, ref_correct = reference_softmax_cross_entropy(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert dlogits.dtype == dtype
    assert correct == ref_correct and correct >= 4
    assert loss == pytest.approx(ref_loss, rel=RTOL[dtype], abs=RTOL[dtype])
    assert_close(dlogits, ref_dlogits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_large_logits(dtype):
    """Logits around 1000 overflow a naive exp(); the loss must stay exact and finite."""
    logits = np.array([[1000.0, 999.0, 998.0],
                       [-1000.0, 1000.0, 0.0],
                       [1000.0, 1000.0, 1000.0],
                       [1000.0, 0.0, -1000.0]], dtype)
    labels = np.array([0, 0, 2, 0])
    loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    ref_loss, ref_dlogits, _ = reference_softmax_cross_entropy(logits, labels)
    # row-by-row by hand: log(1 + e^-1 + e^-2); 2000 + log(1 + e^-1000 + e^-2000) ~ 2000; log 3; ~0
    hand = (np.log1p(np.exp(-1.0) + np.exp(-2.0)) + 2000.0 + np.log(3.0) + 0.0) / 4
    assert ref_loss == pytest.approx(hand, rel=1e-12)
    assert loss == pytest.approx(hand, rel=RTOL[dtype])
    assert_close(dlogits, ref_dlogits, dtype)
    # row 2 ties everywhere: argmax picks the first maximum (class 0), so it is a miss
    assert correct == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature, weight", [(1.0, 0.5), (4.0, 0.9), (4.0, 1.0), (20.0, 0.3)])
def test_distillation_loss(temperature, weight, dtype):
    rng = np.random.default_rng(43)
    logits = random(rng, (16, 10), dtype, scale=5.0)
    teacher_logits = random(rng, (16, 10), dtype, scale=8.0)
    labels = rng.integers(0, 10, 16)
    loss, dlogits, correct = distillation_loss(logits, teacher_logits, labels, temperature,
                                               weight)
    ref_loss, ref_dlogits, ref_correct = reference_distillation_loss(
        logits, teacher_logits, labels, temperature, weight)
    assert dlogits.dtype == dtype and correct == ref_correct
    assert loss == pytest.approx(ref_loss, rel=RTOL[dtype], abs=RTOL[dtype])
    assert_close(dlogits, ref_dlogits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_distillation_loss_without_teacher_weight_is_cross_entropy(dtype):
    rng = np.random.default_rng(44)
    logits, teacher_logits = random(rng, (8, 10), dtype, 30.0), random(rng, (8, 10), dtype)
    labels = rng.integers(0, 10, 8)
    plain = softmax_cross_entropy(logits, labels)
    distilled = distillation_loss(logits, teacher_logits, labels, 4.0, 0.0)
    assert distilled[0] == pytest.approx(plain[0], rel=RTOL[dtype])
    assert_close(distilled[1], plain[1], dtype)
    assert distilled[2] == plain[2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay, nesterov",
                         [(0.9, 0.0, False), (0.9, 5e-4, False), (0.9, 5e-4, True),
                          (0.9, 0.0, True), (0.0, 1e-3, False), (0.5, 0.1, True)])
def test_sgd_momentum_update(dtype, momentum, weight_decay, nesterov):
    rng = np.random.default_rng(42)
    shape = (4, 3, 3, 3)
    param = random(rng, shape, dtype)
    start = param.copy()
    velocity = np.zeros_like(param)
    grads = [random(rng, shape, dtype) for _ in range(4)]
    lrs = [0.1, 0.1, 0.05, 0.02]
    for step, (grad, lr) in enumerate(zip(grads, lrs), start=1):
        sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov)
        assert param.dtype == dtype and velocity.dtype == dtype  # in place, nothing returned
        # the reference replays all steps so far with the learning rates used
        p_ref, buf = reference_sgd(start, grads[:step], lrs[:step], momentum,
                                   weight_decay, nesterov)
        assert_close(param, p_ref, dtype)
        if momentum != 0:
            assert_close(velocity, buf, dtype)
    assert np.abs(param.astype(np.float64) - start).max() > 0.01


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7, 3), (32, 32, 3), (9, 5, 1)])
def test_crop_flip_to_float_every_offset_and_flip(shape):
    rng = np.random.default_rng(50)
    span = np.arange(2 * CROP_PAD + 1)
    offset_y, offset_x, flip = (a.ravel() for a in np.meshgrid(span, span, [False, True],
                                                               indexing="ij"))
    images = rng.integers(0, 256, (len(flip),) + shape, dtype=np.uint8)
    out = crop_flip_to_float(images, offset_y, offset_x, flip)
    assert out.dtype == np.float32 and out.shape == images.shape
    expected = reference_crop_flip(images, offset_y, offset_x, flip)
    np.testing.assert_allclose(out, expected, rtol=1e-7, atol=0)


def test_crop_flip_to_float_random_plan():
    """As the trainer calls it: a random batch, int64 offsets from rng.integers, bool flips."""
    rng = np.random.default_rng(51)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    offsets = rng.integers(0, 2 * CROP_PAD + 1, size=(2, 20))
    flips = rng.random(20) < 0.5
    out = crop_flip_to_float(images, offsets[0], offsets[1], flips)
    expected = reference_crop_flip(images, offsets[0], offsets[1], flips)
    np.testing.assert_allclose(out, expected, rtol=1e-7, atol=0)
    # centre crop without flip is the image itself
    centre = crop_flip_to_float(images[:2], np.array([4, 4]), np.array([4, 4]),
                                np.array([False, False]))
    np.testing.assert_allclose(centre, images[:2] / 255.0, rtol=1e-7)


def test_to_float():
    values = np.arange(256, dtype=np.uint8)
    images = np.stack([values.reshape(16, 16, 1)] * 3, axis=-1).reshape(1, 16, 16, 3)
    out = to_float(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    expected = np.array([v / 255.0 for v in range(256)]).reshape(16, 16)
    for c in range(3):
        np.testing.assert_allclose(out[0, :, :, c], expected, rtol=1e-7, atol=0)
    assert out.min() == 0.0 and out.max() == 1.0


# --------------------------------------------------------------------------------------------
# Layers: batch-norm running statistics, identity shortcut
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_running_statistics_follow_pytorch(dtype):
    rng = np.random.default_rng(60)
    chans = 5
    bn = BatchNorm(chans, dtype=dtype)
    assert bn.momentum == 0.1 and bn.eps == 1e-5
    np.testing.assert_array_equal(bn.buffers["running_mean"], 0.0)
    np.testing.assert_array_equal(bn.buffers["running_var"], 1.0)
    bn.params["weight"][...] = rng.uniform(0.5, 1.5, chans)
    bn.params["bias"][...] = rng.standard_normal(chans)
    running_mean, running_var = np.zeros(chans), np.ones(chans)
    for step in range(4):
        x = random(rng, (3, 5, 3, chans), dtype, scale=2.0, offset=1.5)
        y = bn.forward(x)
        assert y.shape == x.shape and y.dtype == dtype
        rows = x.reshape(-1, chans).astype(np.float64)
        batch_mean = rows.sum(axis=0) / len(rows)
        unbiased = ((rows - batch_mean) ** 2).sum(axis=0) / (len(rows) - 1)
        running_mean = (1 - 0.1) * running_mean + 0.1 * batch_mean
        running_var = (1 - 0.1) * running_var + 0.1 * unbiased
        assert_close(bn.buffers["running_mean"], running_mean, dtype)
        assert_close(bn.buffers["running_var"], running_var, dtype)
        assert int(bn.buffers["num_batches_tracked"]) == step + 1
        # training mode normalises with the batch's own (biased) statistics
        ref_y = reference_batchnorm_forward(rows, bn.params["weight"], bn.params["bias"],
                                            1e-5)[0]
        assert_close(y.reshape(-1, chans), ref_y, dtype)

    bn.eval()
    x = random(rng, (2, 3, 3, chans), dtype, offset=1.0)
    y = bn.forward(x)
    gamma = bn.params["weight"].astype(np.float64)
    beta = bn.params["bias"].astype(np.float64)
    expected = (x.astype(np.float64) - running_mean) / np.sqrt(running_var + 1e-5) * gamma + beta
    assert y.dtype == dtype
    assert_close(y, expected, dtype)
    # eval mode does not touch the running statistics
    assert_close(bn.buffers["running_mean"], running_mean, dtype)
    assert_close(bn.buffers["running_var"], running_var, dtype)
    assert int(bn.buffers["num_batches_tracked"]) == 4


def test_shortcut_a_identity():
    rng = np.random.default_rng(61)
    x = rng.standard_normal((2, 5, 5, 16)).astype(np.float32)
    shortcut = ShortcutA(16, 16, 1)
    y = shortcut.forward(x)
    np.testing.assert_array_equal(y, x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(shortcut.backward(dy), dy)
    # not the identity: a stride, or a change of width
    for in_ch, out_ch, stride in [(16, 32, 2), (16, 16, 2)]:
        down = ShortcutA(in_ch, out_ch, stride)
        x = rng.standard_normal((2, 7, 5, in_ch))
        y = down.forward(x)
        np.testing.assert_array_equal(y, reference_shortcut_a(x, out_ch))
        dy = rng.standard_normal(y.shape)
        dx = down.backward(dy)
        assert dx.shape == x.shape
        assert np.sum(dx * x) == pytest.approx(np.sum(dy * y), rel=1e-12)
