"""Reg_Net and Reg_Bit values against NumPy references, gradients against central differences."""

import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.kernels import regularizers


def reference_reg_net(weights, keep_mask, lam):
    return lam * np.sqrt(np.sum((weights * (1 - keep_mask)) ** 2))


def reference_reg_bit(bits, beta, share):
    return beta * share * np.sqrt(np.sum(np.sum(bits, axis=0) ** 2))


def reference_plane_lasso(bits, beta, share):
    return beta * share * sum(np.sqrt(np.sum(plane**2)) for plane in bits)


def central_differences(function, point, step=1e-6):
    grad = np.zeros_like(point)
    for index in np.ndindex(point.shape):
        plus, minus = point.copy(), point.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad


def assert_gradient_close(analytic, numeric):
    scale = max(1.0, np.abs(numeric).max())
    assert np.abs(analytic - numeric).max() <= 1e-7 * scale


def random_keep_mask(shape, rng):
    return (rng.random(shape) < 0.6).astype(np.uint8)


def test_reg_net_value_and_gradient():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((4, 3, 3, 3))
    keep_mask = random_keep_mask(weights.shape, rng)
    value, grad = regularizers.reg_net(weights, keep_mask, 0.3)
    assert value == pytest.approx(reference_reg_net(weights, keep_mask, 0.3), rel=1e-13)
    numeric = central_differences(lambda w: reference_reg_net(w, keep_mask, 0.3), weights)
    assert grad.shape == weights.shape and grad.dtype == np.float64
    assert_gradient_close(grad, numeric)
    assert np.all(grad[keep_mask == 1] == 0.0)


def test_reg_net_hand_worked_example():
    # Cut weights 3 and -4: norm 5, value 2 * 5 = 10, gradient 2 * [3, -4] / 5 on them.
    weights = np.array([[3.0, 7.0], [-4.0, 1.0]])
    keep_mask = np.array([[0, 1], [0, 1]], np.uint8)
    value, grad = regularizers.reg_net(weights, keep_mask, 2.0)
    assert value == pytest.approx(10.0, rel=1e-15)
    np.testing.assert_allclose(grad, [[1.2, 0.0], [-1.6, 0.0]], rtol=1e-15)


def test_reg_net_zero_norm_gives_zero_gradient():
    weights = np.array([0.0, 5.0, 0.0])
    value, grad = regularizers.reg_net(weights, np.array([0, 1, 0], np.uint8), 1.0)
    assert value == 0.0
    assert grad.tolist() == [0.0, 0.0, 0.0]


def test_reg_net_float32_matches_float64():
    rng = np.random.default_rng(2)
    weights = rng.standard_normal((8, 4, 3, 3))
    keep_mask = random_keep_mask(weights.shape, rng)
    value64, grad64 = regularizers.reg_net(weights, keep_mask, 0.1)
    value32, grad32 = regularizers.reg_net(weights.astype(np.float32), keep_mask, 0.1)
    assert grad32.dtype == np.float32
    assert value32 == pytest.approx(value64, rel=1e-6)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_reg_bit_value_and_gradient(b):
    rng = np.random.default_rng(10 + b)
    bits = rng.random((b, 3, 2, 3, 3))
    value, grad = regularizers.reg_bit(bits, 0.7, 0.25)
    assert value == pytest.approx(reference_reg_bit(bits, 0.7, 0.25), rel=1e-13)
    assert grad.shape == bits.shape
    numeric = central_differences(lambda x: reference_reg_bit(x, 0.7, 0.25), bits)
    assert_gradient_close(grad, numeric)


def test_reg_bit_hand_worked_example():
    # Bit counts per weight: [1+1, 0+1] = [2, 1]; norm sqrt(5); value 1 * 0.5 * sqrt(5).
    # Gradient 0.5 * count / sqrt(5), the same on both planes of a weight.
    bits = np.array([[1.0, 0.0], [1.0, 1.0]])
    value, grad = regularizers.reg_bit(bits, 1.0, 0.5)
    assert value == pytest.approx(0.5 * np.sqrt(5.0), rel=1e-15)
    expected = 0.5 * np.array([[2.0, 1.0], [2.0, 1.0]]) / np.sqrt(5.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-15)


@pytest.mark.parametrize("b", [2, 4, 8])
def test_plane_lasso_value_and_gradient(b):
    rng = np.random.default_rng(20 + b)
    bits = rng.random((b, 3, 2, 3, 3))
    bits[1] = 0.0  # an all-zero plane takes the zero subgradient and adds nothing
    value, grad = regularizers.reg_bit_plane_lasso(bits, 0.7, 0.25)
    assert value == pytest.approx(reference_plane_lasso(bits, 0.7, 0.25), rel=1e-13)
    assert np.all(grad[1] == 0.0)
    live = np.arange(b) != 1
    numeric = central_differences(lambda x: reference_plane_lasso(x, 0.7, 0.25), bits)
    assert_gradient_close(grad[live], numeric[live])


def test_bit_regularizers_of_all_zero_bits_are_zero():
    bits = np.zeros((4, 5), np.float32)
    for regularizer in (regularizers.reg_bit, regularizers.reg_bit_plane_lasso):
        value, grad = regularizer(bits, 1.0, 1.0)
        assert value == 0.0 and grad.dtype == np.float32
        assert not grad.any()


def test_bit_regularizers_float32_match_float64():
    rng = np.random.default_rng(3)
    bits = rng.random((8, 16, 3, 3))
    for regularizer in (regularizers.reg_bit, regularizers.reg_bit_plane_lasso):
        value64, grad64 = regularizer(bits, 0.5, 0.1)
        value32, grad32 = regularizer(bits.astype(np.float32), 0.5, 0.1)
        assert grad32.dtype == np.float32
        assert value32 == pytest.approx(value64, rel=1e-6)
        np.testing.assert_allclose(grad32, grad64, rtol=1e-5, atol=1e-9)


def test_bad_arguments_raise():
    weights = np.ones((2, 3))
    with pytest.raises(NptwofoldError, match="keep-mask shape"):
        regularizers.reg_net(weights, np.ones((3, 2), np.uint8), 1.0)
    with pytest.raises(NptwofoldError, match="lambda"):
        regularizers.reg_net(weights, np.ones((2, 3), np.uint8), -1.0)
    with pytest.raises(NptwofoldError, match="share"):
        regularizers.reg_bit(np.zeros((4, 3)), 1.0, 1.5)
    with pytest.raises(NptwofoldError, match="beta"):
        regularizers.reg_bit_plane_lasso(np.zeros((4, 3)), float("nan"), 0.5)
    with pytest.raises(NptwofoldError, match="odd"):
        regularizers.reg_bit(np.zeros((3, 3)), 1.0, 0.5)
    with pytest.raises(NptwofoldError, match="float32 or float64"):
        regularizers.reg_net(np.ones(3, np.int32), np.zeros(3, np.uint8), 1.0)
