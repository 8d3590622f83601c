"""Quantization, bit planes and bit-representation training kernels against SPEC 2 and 3.

Oracles are plain NumPy / Python written from the SPEC formulas, not from the kernels.
"""

import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.kernels import quant

EVEN_BITS = list(range(2, 17, 2))


def reference_quantize(weights, b):
    scale = float(np.max(np.abs(weights)))
    qmax = 2 ** (b - 1) - 1
    return np.rint(weights.astype(np.float64) / scale * qmax).astype(np.int64), scale


def reference_planes(level, b):
    """Bits of one level, plane n first, from its b-bit two's complement string."""
    text = format(level & (2**b - 1), f"0{b}b")
    return [int(bit) for bit in reversed(text)]


def reference_real_levels(bits):
    b = bits.shape[0]
    weights = 2.0 ** np.arange(b)
    weights[-1] = -weights[-1]
    return np.tensordot(weights, bits.astype(np.float64), axes=1)


def reference_surrogate(bits, scale):
    """W~ = s * clip(q~) / qmax: the smooth path whose derivative the STE backward uses."""
    qmax = 2 ** (bits.shape[0] - 1) - 1
    return scale * np.clip(reference_real_levels(bits), -qmax, qmax) / qmax


def reference_bits_forward(bits, scale):
    qmax = 2 ** (bits.shape[0] - 1) - 1
    return scale * np.rint(np.clip(reference_real_levels(bits), -qmax, qmax)) / qmax


def reference_dropped_levels(bits, dropped):
    """Levels of a layer whose `dropped` low planes are dropped, one weight at a time."""
    qmax = 2 ** (bits.shape[0] - 1) - 1
    step = 2**dropped
    top = step * (qmax // step)
    real = reference_real_levels(bits)
    return np.array([step * round(min(max(q, -top), top) / step) for q in real.ravel()],
                    np.float64).reshape(real.shape)


@pytest.mark.parametrize("bad", [7, 1, 0, -2, 18, 8.0, "8", None, True])
def test_bad_bit_widths_raise(bad):
    with pytest.raises(NptwofoldError):
        quant.check_bits(bad)


def test_bad_bit_width_reaches_every_entry_point():
    with pytest.raises(NptwofoldError, match="odd"):
        quant.quantize(np.ones(3, np.float32), 7)
    with pytest.raises(NptwofoldError):
        quant.decompose(np.zeros(3, np.int8), 18)
    with pytest.raises(NptwofoldError):
        quant.bits_forward(np.zeros((3, 4)), 1.0)


def test_valid_bit_widths_pass_and_pick_level_dtype():
    for b in EVEN_BITS:
        assert quant.check_bits(np.int64(b)) == b
        assert quant.max_level(b) == 2 ** (b - 1) - 1
        assert quant.level_dtype(b) == (np.int8 if b <= 8 else np.int16)


@pytest.mark.parametrize("b", EVEN_BITS)
def test_decompose_matches_reference_and_compose_round_trips(b):
    levels = np.arange(-(2 ** (b - 1)), 2 ** (b - 1)).astype(quant.level_dtype(b))
    planes = quant.decompose(levels, b)
    assert planes.dtype == np.uint8 and planes.shape == (b, levels.size)
    expected = np.array([reference_planes(int(level), b) for level in levels]).T
    np.testing.assert_array_equal(planes, expected)
    composed = quant.compose(planes)
    assert composed.dtype == quant.level_dtype(b)
    np.testing.assert_array_equal(composed, levels)


def test_bit_planes_keep_weight_shape():
    levels = np.arange(-8, 8, dtype=np.int8).reshape(2, 2, 2, 2)
    planes = quant.decompose(levels, 4)
    assert planes.shape == (4, 2, 2, 2, 2)
    # -8 = 1000b: only the sign plane is set; 7 = 0111b: all but the sign plane.
    assert planes[:, 0, 0, 0, 0].tolist() == [0, 0, 0, 1]
    assert planes[:, 1, 1, 1, 1].tolist() == [1, 1, 1, 0]
    np.testing.assert_array_equal(quant.compose(planes), levels)


def test_decompose_and_compose_reject_bad_input():
    with pytest.raises(NptwofoldError, match="range"):
        quant.decompose(np.array([8], np.int8), 4)
    with pytest.raises(NptwofoldError, match="range"):
        quant.decompose(np.array([-9], np.int8), 4)
    with pytest.raises(NptwofoldError, match="integers"):
        quant.decompose(np.array([1.0]), 4)
    with pytest.raises(NptwofoldError, match="0 and 1"):
        quant.compose(np.array([[2], [0]], np.uint8))
    with pytest.raises(NptwofoldError, match="uint8"):
        quant.compose(np.zeros((2, 3)))


@pytest.mark.parametrize(
    "weights, b, expected_levels, expected_scale",
    [
        # s = 1, qmax = 7: 0.5*7 = 3.5 -> 4 (half to even), -7, 0.25*7 = 1.75 -> 2, 0.
        ([0.5, -1.0, 0.25, 0.0], 4, [4, -7, 2, 0], 1.0),
        # s = 2, qmax = 1: W/s = 0.5 -> 0 (half to even, not 1), -0.25 -> 0, 0.125 -> 0, -1.
        ([1.0, -0.5, 0.25, -2.0], 2, [0, 0, 0, -1], 2.0),
        # s = 2, qmax = 127: 1 -> 127, -0.5*127 = -63.5 -> -64 (even),
        # 0.25*127 = 31.75 -> 32, -2^-7 * 127 = -0.9921875 -> -1.
        ([2.0, -1.0, 0.5, -0.015625], 8, [127, -64, 32, -1], 2.0),
        # s = 3, qmax = 7: 1.5/3*7 = 3.5 -> 4, 0.75/3*7 = 1.75 -> 2, -3 -> -7.
        ([1.5, 0.75, -3.0], 4, [4, 2, -7], 3.0),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_hand_worked_examples(weights, b, expected_levels, expected_scale, dtype):
    levels, scale = quant.quantize(np.array(weights, dtype), b)
    assert levels.dtype == quant.level_dtype(b)
    assert levels.tolist() == expected_levels
    assert scale == expected_scale


def test_dequantize_hand_worked_example():
    # q = [4, -7, 2, 0], s = 1, qmax = 7 -> W = [4/7, -1, 2/7, 0].
    weights = quant.dequantize(np.array([4, -7, 2, 0], np.int8), 1.0, 4, dtype=np.float64)
    np.testing.assert_allclose(weights, [4 / 7, -1.0, 2 / 7, 0.0], rtol=1e-15)
    assert quant.dequantize(np.zeros(2, np.int8), 1.0, 4).dtype == np.float32


@pytest.mark.parametrize("b", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_matches_reference_on_random_layers(b, dtype):
    rng = np.random.default_rng(b)
    weights = (rng.standard_normal((16, 8, 3, 3)) * 0.1).astype(dtype)
    levels, scale = quant.quantize(weights, b)
    expected_levels, expected_scale = reference_quantize(weights, b)
    qmax = 2 ** (b - 1) - 1
    assert scale == expected_scale
    assert levels.shape == weights.shape
    np.testing.assert_array_equal(levels, expected_levels)
    assert np.abs(levels).max() == qmax
    recon = quant.dequantize(levels, scale, b, dtype=np.float64)
    np.testing.assert_allclose(recon, scale * expected_levels / qmax, rtol=1e-15)
    assert np.abs(recon - weights).max() <= scale / qmax / 2 * (1 + 1e-6)


def test_quantize_all_zero_layer_gives_zero_levels():
    levels, scale = quant.quantize(np.zeros((4, 3), np.float32), 8)
    assert scale == 0.0
    assert levels.tolist() == [[0] * 3] * 4
    assert not np.isnan(quant.dequantize(levels, scale, 8)).any()


def test_quantize_rejects_non_finite_and_non_float_weights():
    with pytest.raises(NptwofoldError, match="NaN"):
        quant.quantize(np.array([1.0, np.nan]), 8)
    with pytest.raises(NptwofoldError, match="float32 or float64"):
        quant.quantize(np.array([1, 2]), 8)


@pytest.mark.parametrize("b", [2, 4, 8, 16])
def test_forward_of_exact_bits_equals_dequantize(b):
    rng = np.random.default_rng(100 + b)
    qmax = 2 ** (b - 1) - 1
    levels = rng.integers(-qmax, qmax + 1, size=(5, 7)).astype(quant.level_dtype(b))
    bits = quant.decompose(levels, b).astype(np.float32)
    np.testing.assert_array_equal(quant.bits_forward(bits, 0.37), quant.dequantize(levels, 0.37, b))


def test_forward_clips_most_negative_level():
    # Bits 1000 compose to -8, outside [-7, 7]: the forward clips it to -7 -> W = -s.
    bits = quant.decompose(np.array([-8], np.int8), 4).astype(np.float64)
    assert quant.bits_forward(bits, 2.0).tolist() == [-2.0]


@pytest.mark.parametrize("b", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_of_continuous_bits_matches_reference(b, dtype):
    rng = np.random.default_rng(200 + b)
    bits = rng.random((b, 6, 3, 3, 3)).astype(dtype)
    weights = quant.bits_forward(bits, 0.8)
    assert weights.dtype == dtype and weights.shape == bits.shape[1:]
    np.testing.assert_allclose(weights, reference_bits_forward(bits, 0.8), rtol=1e-6)


@pytest.mark.parametrize("b", [2, 4, 8, 16])
def test_rebinarize_gives_exact_bits_of_rounded_clipped_level(b):
    rng = np.random.default_rng(300 + b)
    bits = rng.random((b, 40, 5))
    qmax = 2 ** (b - 1) - 1
    expected_levels = np.rint(np.clip(reference_real_levels(bits), -qmax, qmax))
    forward_before = quant.bits_forward(bits, 1.3)
    levels = quant.rebinarize_bits(bits)
    assert set(np.unique(bits)) <= {0.0, 1.0}
    np.testing.assert_array_equal(levels, expected_levels)
    np.testing.assert_array_equal(quant.compose(bits.astype(np.uint8)), expected_levels)
    np.testing.assert_array_equal(quant.bits_forward(bits, 1.3), forward_before)


@pytest.mark.parametrize("b,dropped", [(4, 1), (8, 1), (8, 2), (8, 6), (16, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropped_planes_round_to_multiples_of_their_step(b, dropped, dtype):
    rng = np.random.default_rng(250 + b + dropped)
    bits = rng.random((b, 30, 3)).astype(dtype)
    bits[:dropped] = 0.0
    bits[:, 0, 0] = [1.0] * (b - 1) + [0.0]  # q~ = qmax: clipped to the top multiple
    expected = reference_dropped_levels(bits, dropped)
    levels = quant.rounded_levels(bits, dropped)
    np.testing.assert_array_equal(levels, expected)
    assert (levels % 2**dropped == 0).all()
    assert levels[0, 0] == 2**dropped * ((2 ** (b - 1) - 1) // 2**dropped)
    qmax = 2 ** (b - 1) - 1
    np.testing.assert_allclose(quant.bits_forward(bits, 0.8, dropped), 0.8 * expected / qmax,
                               rtol=1e-6)


def test_dropped_planes_hand_worked():
    # q~ = 1*1 + 0.6*4 = 3.4 (b = 4): 3 with nothing dropped, 4 with one plane (3.4/2 -> 2),
    # 4 with two (3.4/4 = 0.85 -> 1); q~ = 7 with two dropped clips to 4, the top multiple.
    bits = np.array([[1.0, 1.0], [0.0, 1.0], [0.6, 1.0], [0.0, 0.0]])
    assert quant.rounded_levels(bits).tolist() == [3, 7]
    assert quant.rounded_levels(bits, 1).tolist() == [4, 6]
    assert quant.rounded_levels(bits, 2).tolist() == [4, 4]


@pytest.mark.parametrize("b,dropped", [(4, 2), (8, 2)])
def test_rebinarize_with_dropped_planes_zeroes_them_and_keeps_the_forward(b, dropped):
    rng = np.random.default_rng(350 + b)
    bits = rng.random((b, 20, 4))
    bits[:dropped] = 0.0
    forward_before = quant.bits_forward(bits, 1.3, dropped)
    expected = reference_dropped_levels(bits, dropped)
    levels = quant.rebinarize_bits(bits, dropped)
    np.testing.assert_array_equal(levels, expected)
    np.testing.assert_array_equal(quant.compose(bits.astype(np.uint8)), expected)
    assert set(np.unique(bits)) <= {0.0, 1.0} and (bits[:dropped] == 0).all()
    np.testing.assert_array_equal(quant.bits_forward(bits, 1.3, dropped), forward_before)


@pytest.mark.parametrize("bad", [-1, 7, 1.0, True, None])
def test_bad_dropped_plane_counts_raise(bad):
    with pytest.raises(NptwofoldError, match="dropped low planes"):
        quant.bits_forward(np.zeros((8, 3)), 1.0, bad)


def test_clamp_bits_in_place():
    bits = np.array([[-0.5, 0.0, 0.3], [1.0, 1.7, 0.9]], np.float32)
    quant.clamp_bits(bits)
    np.testing.assert_array_equal(bits, np.array([[0.0, 0.0, 0.3], [1.0, 1.0, 0.9]], np.float32))


def loss_weights(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_bit_gradient_is_derivative_of_clipped_surrogate(b):
    rng = np.random.default_rng(500 + b)
    bits = rng.random((b, 5, 4))
    qmax = 2 ** (b - 1) - 1
    # Force both regimes: weight 0 in the clipped region (q~ = -2^(b-1) = -qmax - 1),
    # weight 1 well inside (q~ = 0.3 * (2^(b-1) - 1) - 0.3 * 2^(b-1) = -0.3).
    bits[:, 0, 0] = 0.0
    bits[-1, 0, 0] = 1.0
    bits[:, 0, 1] = 0.3
    grad_output = loss_weights(bits.shape[1:], b)
    scale, step = 0.9, 1e-6

    grad_bits = quant.bits_backward(bits, scale, grad_output)
    assert grad_bits.dtype == bits.dtype and grad_bits.shape == bits.shape

    real_levels = reference_real_levels(bits)
    inside = np.abs(real_levels) < qmax - 1e-3
    outside = np.abs(real_levels) > qmax + 1e-3
    assert inside[0, 1] and outside[0, 0]
    assert inside.any() and (inside | outside).all()
    for index in np.ndindex(bits.shape):
        plus, minus = bits.copy(), bits.copy()
        plus[index] += step
        minus[index] -= step
        surrogate_change = reference_surrogate(plus, scale) - reference_surrogate(minus, scale)
        numeric = np.sum(grad_output * surrogate_change) / (2 * step)
        assert abs(grad_bits[index] - numeric) <= 1e-7 * max(1.0, abs(numeric)), index
    assert np.all(grad_bits[:, outside] == 0.0)


def test_bit_gradient_passes_at_the_clip_boundary():
    # After re-binarization the largest weights sit exactly at +-qmax; they must keep a
    # gradient so they can move inwards. q = 7 = 0111b, q = -7 = 1001b.
    bits = quant.decompose(np.array([7, -7], np.int8), 4).astype(np.float64)
    grad_bits = quant.bits_backward(bits, 1.0, np.ones(2))
    # dW/dB(n) = s / qmax * (+-2^n) = [1, 2, 4, -8] / 7 for both weights.
    np.testing.assert_allclose(grad_bits, np.array([[1, 2, 4, -8]] * 2).T / 7, rtol=1e-15)


def test_bit_gradient_with_dropped_planes_clips_at_the_top_multiple():
    # b = 4, two planes dropped: levels are multiples of 4 inside +-4. q~ = 4.5 lies outside,
    # so the clip cuts its gradient; q~ = 3.5 lies inside and passes +-2^n / qmax.
    bits = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.875], [0.0, 0.0]])
    bits[1] = [0.25, 0.0]  # q~ = 0.5 + 4 = 4.5 and 3.5
    grad_bits = quant.bits_backward(bits, 1.0, np.ones(2), dropped=2)
    assert (grad_bits[:, 0] == 0).all()
    np.testing.assert_allclose(grad_bits[:, 1], np.array([1, 2, 4, -8]) / 7, rtol=1e-15)


def test_float32_backward_matches_float64():
    rng = np.random.default_rng(7)
    bits = rng.random((8, 6, 6))
    grad_output = rng.standard_normal((6, 6))
    grad64 = quant.bits_backward(bits, 0.5, grad_output)
    grad32 = quant.bits_backward(
        bits.astype(np.float32), 0.5, grad_output.astype(np.float32)
    )
    assert grad32.dtype == np.float32
    np.testing.assert_allclose(grad32, grad64, rtol=1e-6, atol=1e-7)


def test_backward_rejects_mismatched_gradient_shape():
    with pytest.raises(NptwofoldError, match="shape"):
        quant.bits_backward(np.zeros((4, 3)), 1.0, np.zeros(2))


@pytest.mark.parametrize("encoding", quant.ENCODINGS)
def test_backward_into_out_adds_the_gradient(encoding):
    """bits_backward(..., out=G) adds its gradient into G in place (the regularizers' path)."""
    rng = np.random.default_rng(3)
    bits = rng.random((8, 5, 7)).astype(np.float32)
    grad_output = rng.standard_normal((5, 7)).astype(np.float32)
    start = rng.standard_normal(bits.shape).astype(np.float32)
    out = start.copy()
    returned = quant.bits_backward(bits, 0.3, grad_output, 1, encoding, out=out)
    assert returned is out
    want = start.astype(np.float64) + quant.bits_backward(
        bits.astype(np.float64), 0.3, grad_output.astype(np.float64), 1, encoding)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(out, start)
    with pytest.raises(NptwofoldError, match="out must be a C-contiguous float32"):
        quant.bits_backward(bits, 0.3, grad_output, 1, encoding, out=out.astype(np.float64))


# --- the planes of each weight encoding ------------------------------------------------------

def reference_encoded_planes(level, b, encoding):
    """Planes of one level from the encoding's definition, as a binary string read backwards."""
    if encoding == "twos_complement":
        code = level & (2**b - 1)
    elif encoding == "offset_binary":
        code = level + 2 ** (b - 1)
    else:  # the magnitude in planes 0..b-2, the sign (1 = negative) in plane b-1
        code = abs(level) + (2 ** (b - 1) if level < 0 else 0)
    return [int(bit) for bit in reversed(format(code, f"0{b}b"))]


def reference_encoded_real_levels(bits, encoding):
    """q~ of continuous planes by the encoding's formula."""
    b = bits.shape[0]
    low = np.tensordot(2.0 ** np.arange(b - 1), bits[:-1].astype(np.float64), axes=1)
    top = bits[-1].astype(np.float64)
    if encoding == "twos_complement":
        return low - 2.0 ** (b - 1) * top
    if encoding == "offset_binary":
        return low + 2.0 ** (b - 1) * (top - 1)
    return (1 - 2 * top) * low


@pytest.mark.parametrize("encoding", quant.ENCODINGS)
@pytest.mark.parametrize("b", [2, 4, 8])
def test_every_level_decomposes_and_composes_in_each_encoding(encoding, b):
    low, high = quant.level_range(b, encoding)
    assert high == 2 ** (b - 1) - 1 and low == (-high if encoding == "sign_magnitude" else -high - 1)
    levels = np.arange(low, high + 1).astype(quant.level_dtype(b))
    planes = quant.decompose(levels, b, encoding)
    assert planes.dtype == np.uint8
    assert planes.T.tolist() == [reference_encoded_planes(int(q), b, encoding) for q in levels]
    np.testing.assert_array_equal(quant.compose(planes, encoding), levels)
    with pytest.raises(NptwofoldError, match=f"{b}-bit {encoding} range"):
        quant.decompose(np.array([low - 1]), b, encoding)


def test_sign_magnitude_negative_zero_composes_to_zero():
    planes = np.array([[0], [0], [0], [1]], np.uint8)  # magnitude 0, sign 1
    assert quant.compose(planes, "sign_magnitude").tolist() == [0]
    assert quant.decompose(np.array([0]), 4, "sign_magnitude")[:, 0].tolist() == [0, 0, 0, 0]


def test_unknown_encoding_raises():
    with pytest.raises(NptwofoldError, match="unknown weight encoding 'gray'"):
        quant.bits_forward(np.zeros((4, 2)), 1.0, encoding="gray")


@pytest.mark.parametrize("encoding", quant.ENCODINGS)
@pytest.mark.parametrize("dropped", [0, 2])
def test_forward_and_rebinarize_of_continuous_bits_in_each_encoding(encoding, dropped):
    rng = np.random.default_rng(60 + dropped)
    bits = rng.random((8, 40, 3))
    bits[:dropped] = 0.0
    qmax, step = 127, 2**dropped
    top = step * (qmax // step)
    real = reference_encoded_real_levels(bits, encoding)
    expected = step * np.rint(np.clip(real, -top, top) / step)
    np.testing.assert_array_equal(quant.rounded_levels(bits, dropped, encoding), expected)
    np.testing.assert_allclose(quant.bits_forward(bits, 0.8, dropped, encoding),
                               0.8 * expected / qmax, rtol=1e-12)
    forward_before = quant.bits_forward(bits, 0.8, dropped, encoding)
    levels = quant.rebinarize_bits(bits, dropped, encoding)
    np.testing.assert_array_equal(levels, expected)
    assert set(np.unique(bits)) <= {0.0, 1.0} and (bits[:dropped] == 0).all()
    np.testing.assert_array_equal(quant.compose(bits.astype(np.uint8), encoding), expected)
    np.testing.assert_array_equal(quant.bits_forward(bits, 0.8, dropped, encoding),
                                  forward_before)


@pytest.mark.parametrize("encoding", quant.ENCODINGS)
def test_bit_gradient_is_derivative_of_each_encodings_surrogate(encoding):
    """dL/dbits against float64 central differences of s clip(q~) / qmax, q~ by the encoding's
    formula (the product of sign factor and magnitude in sign-magnitude)."""
    rng = np.random.default_rng(70)
    b, qmax, scale, step = 8, 127, 0.9, 1e-6
    bits = rng.random((b, 4, 5))
    bits[:, 0, 0] = 0.0  # offset binary: q~ = -128, clipped; others: q~ = 0
    bits[:, 0, 1] = [1.0] * (b - 1) + [0.45]  # sign-magnitude: a sign near its flip
    grad_output = loss_weights(bits.shape[1:], 71)
    grad_bits = quant.bits_backward(bits, scale, grad_output, 0, encoding)

    def surrogate(planes):
        return scale * np.clip(reference_encoded_real_levels(planes, encoding), -qmax, qmax) / qmax

    for index in np.ndindex(bits.shape):
        plus, minus = bits.copy(), bits.copy()
        plus[index] += step
        minus[index] -= step
        numeric = np.sum(grad_output * (surrogate(plus) - surrogate(minus))) / (2 * step)
        assert abs(grad_bits[index] - numeric) <= 1e-6 * max(1.0, abs(numeric)), index
    if encoding == "offset_binary":
        assert (grad_bits[:, 0, 0] == 0).all()  # the clip cuts the gradient outside +-qmax
