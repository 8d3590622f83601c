"""Sparsity regularizers of the twofold objective J = L_CE + Reg_Net + Reg_Bit (docs/method.md).

Each function covers one layer and returns (value, gradient); the caller sums over layers.
Reg_Net shrinks the weights the LFSR keep-mask will cut, so pruning them later costs little;
Reg_Bit pushes bits towards 0, so 2-bit cells end in the cheap 00 state.

An L2 norm has no gradient at 0; there it is taken as 0 (the least-norm subgradient), so a
group already at zero stays there instead of receiving NaN. Sums run in float64 whatever the
storage dtype; gradients come back in the dtype of their input.
"""

import math

import numba
import numpy as np

from ..errors import NptwofoldError
from .quant import check_bit_planes, check_float_array


def _check_coefficient(name, value, upper=math.inf):
    value = float(value)
    if not 0.0 <= value <= upper:
        raise NptwofoldError(f"{name}={value} must lie in [0, {upper}]")
    return value


@numba.njit(nogil=True, cache=True)
def _cut_weight_norm_kernel(weights, keep_mask, strength):
    sum_sq = 0.0
    for i in range(weights.size):
        if keep_mask[i] == 0:
            sum_sq += np.float64(weights[i]) ** 2
    norm = np.sqrt(sum_sq)
    grad = np.zeros_like(weights)
    if norm > 0.0:
        for i in range(weights.size):
            if keep_mask[i] == 0:
                grad[i] = strength * np.float64(weights[i]) / norm
    return strength * norm, grad


@numba.njit(nogil=True, cache=True)
def _bit_count_norm_kernel(bits, strength):
    planes, size = bits.shape
    bit_counts = np.zeros(size)
    for n in range(planes):
        for i in range(size):
            bit_counts[i] += bits[n, i]
    norm = np.sqrt(np.sum(bit_counts**2))
    grad = np.zeros_like(bits)
    if norm > 0.0:
        for i in range(size):
            bit_counts[i] = strength * bit_counts[i] / norm
        for n in range(planes):  # plane-major: contiguous inner loop
            for i in range(size):
                grad[n, i] = bit_counts[i]
    return strength * norm, grad


@numba.njit(nogil=True, cache=True)
def _plane_norms_kernel(bits, strength):
    planes, size = bits.shape
    norm_sum = 0.0
    grad = np.zeros_like(bits)
    for n in range(planes):
        sum_sq = 0.0
        for i in range(size):
            sum_sq += np.float64(bits[n, i]) ** 2
        norm = np.sqrt(sum_sq)
        norm_sum += norm
        if norm > 0.0:
            for i in range(size):
                grad[n, i] = strength * np.float64(bits[n, i]) / norm
    return strength * norm_sum, grad


def reg_net(weights, keep_mask, lam):
    """Reg_Net of one layer: lam * ||W (.) (1 - K)||_2 and its gradient w.r.t. W.

    keep_mask K has W's shape, 1 = kept; the gradient is lam * W (.) (1 - K) / norm.
    """
    weights = check_float_array("weights", weights)
    keep_mask = np.asarray(keep_mask)
    if keep_mask.shape != weights.shape:
        raise NptwofoldError(
            f"keep-mask shape {keep_mask.shape} does not match weights {weights.shape}"
        )
    value, grad = _cut_weight_norm_kernel(
        np.ascontiguousarray(weights).ravel(), keep_mask.ravel(), _check_coefficient("lambda", lam)
    )
    return float(value), grad.reshape(weights.shape)


def reg_bit(bits, beta, share):
    """Reg_Bit of one layer (poster form): beta * share * ||sum_n B(n)||_2 and its gradient.

    bits are continuous planes (b, *shape); sum_n B(n) is each weight's bit count and the norm
    runs over the layer. share = #param(layer) / #param(all layers).
    """
    return _plane_regularizer(_bit_count_norm_kernel, bits, beta, share)


def reg_bit_plane_lasso(bits, beta, share):
    """Reg_Bit option (BSQ group lasso): beta * share * sum_n ||B(n)||_2 and its gradient."""
    return _plane_regularizer(_plane_norms_kernel, bits, beta, share)


def _plane_regularizer(kernel, bits, beta, share):
    bits, b = check_bit_planes(bits)
    strength = _check_coefficient("beta", beta) * _check_coefficient("share", share, upper=1.0)
    value, grad = kernel(np.ascontiguousarray(bits).reshape(b, -1), strength)
    return float(value), grad.reshape(bits.shape)
