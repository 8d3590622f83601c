"""Per-layer weight quantization and the bit planes of each weight encoding (docs/method.md).

Integer weights ("levels"): q = Round(W / s * qmax) with s = max|W| and qmax = 2^(b-1) - 1,
so q lies in [-qmax, qmax] and W ~ s * q / qmax. Round is round-half-to-even (np.rint), the
IEEE default, so 3.5 -> 4 and 2.5 -> 2. Levels are stored as int8 for b <= 8 and int16 above,
the narrowest types that hold every b-bit two's complement value.

Bit planes: b planes B(0..b-1) per weight, in the encoding the CIM array stores
(`HardwareConfig.weight_encoding`; `cim.device` lays the planes onto cells):
- twos_complement: the b-bit two's complement of q, plane b-1 the sign bit:
  q = -2^(b-1) B(b-1) + sum_{n<b-1} 2^n B(n);
- offset_binary: the unsigned code u = q + 2^(b-1): q = sum_{n<b} 2^n B(n) - 2^(b-1);
- sign_magnitude: planes 0..b-2 hold |q|, plane b-1 its sign (1 = negative, the column group
  the magnitude is stored in): q = (1 - 2 B(b-1)) sum_{n<b-1} 2^n B(n); 0 has sign 0.
In every encoding the low planes are the low bits of the stored code, so dropping k planes
leaves exactly the levels that are multiples of 2^k.

Training under bit representation (BSQ-style): the planes are continuous variables in [0, 1].
The forward composes them into a real level q~ by the encoding's formula above (for
sign-magnitude the product of the relaxed sign factor and magnitude, so a weight changes sign
through 0), clips it to [-qmax, qmax], rounds it and returns W = s * q / qmax. The backward
passes the gradient straight through the rounding, and through the clip only where q~ lies
inside [-qmax, qmax] (closed: a weight re-binarized to exactly +-qmax must still be able to
move inwards); outside, the clip cuts it to zero. dq~/dB(n) is the formula's derivative:
+-2^n in two's complement, 2^n in offset binary; (1 - 2 B(b-1)) 2^n for a magnitude plane and
-2 |q~| for the sign in sign-magnitude.

Dropped planes (BSQ's precision adjustment): a layer whose k lowest planes are dropped holds
them at 0, so its levels are multiples of 2^k. Its forward rounds q~ to the nearest multiple
of 2^k inside the largest such range, +-qmax_k with qmax_k = 2^k * floor(qmax / 2^k); k = 0
is the plain rounding above.

Arithmetic runs in float64 whatever the storage dtype, so float32 and float64 arrays holding
equal values give equal results, and the training forward of exact bits equals dequantize.
Kernels work on arrays flattened to (n,) or (b, n), so one kernel serves conv OIHW and FC
weights. The training kernels (forward, backward, rounding) work weight by weight, so they run
on the engine's pool over fixed chunks of weights, with results that cannot depend on the
thread count.
"""

import numba
import numpy as np

from ..errors import NptwofoldError
from ..threads import run_parallel

ENCODINGS = ("twos_complement", "offset_binary", "sign_magnitude")
TWOS_COMPLEMENT, OFFSET_BINARY, SIGN_MAGNITUDE = range(len(ENCODINGS))  # codes the kernels take
WEIGHTS_PER_CHUNK = 4096  # weights per work item of the training kernels
MIN_BITS = 2
MAX_BITS = 16
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _over_weight_chunks(n_weights, run_chunk):
    """run_chunk(slice) over fixed chunks of n_weights weights, on the engine's pool."""
    chunks = [slice(start, start + WEIGHTS_PER_CHUNK)
              for start in range(0, n_weights, WEIGHTS_PER_CHUNK)]
    run_parallel(lambda index: run_chunk(chunks[index]), len(chunks))


def check_bits(b):
    """Return b as an int if it is a valid weight bit width (even, 2..16), else raise."""
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
        raise NptwofoldError(f"weight bit width b={b!r} is not an integer")
    if not MIN_BITS <= b <= MAX_BITS:
        raise NptwofoldError(f"weight bit width b={b} is outside {MIN_BITS}..{MAX_BITS}")
    if b % 2:
        raise NptwofoldError(f"weight bit width b={b} is odd; 2-bit cells need an even b")
    return int(b)


def encoding_code(encoding):
    """The kernels' code of a weight encoding's name; raises for an unknown one."""
    if encoding not in ENCODINGS:
        raise NptwofoldError(f"unknown weight encoding {encoding!r}; known: "
                             f"{', '.join(ENCODINGS)}")
    return ENCODINGS.index(encoding)


def level_range(b, encoding):
    """(lowest, highest) level whose b planes the encoding can hold."""
    high = 2 ** (check_bits(b) - 1) - 1
    return (-high if encoding_code(encoding) == SIGN_MAGNITUDE else -high - 1), high


def max_level(b):
    """qmax = 2^(b-1) - 1, the largest |q| of a b-bit layer."""
    return 2 ** (check_bits(b) - 1) - 1


def level_dtype(b):
    """Integer dtype of b-bit levels: int8 up to b = 8, int16 above."""
    return np.dtype(np.int8) if check_bits(b) <= 8 else np.dtype(np.int16)


def check_float_array(name, array):
    """Return array as a NumPy array if it is float32 or float64, else raise."""
    array = np.asarray(array)
    if array.dtype not in FLOAT_DTYPES:
        raise NptwofoldError(f"{name} must be float32 or float64, got {array.dtype}")
    return array


def check_bit_planes(bits):
    """Validate continuous bit planes of shape (b, *weight_shape); return (bits, b)."""
    bits = check_float_array("bit planes", bits)
    if bits.ndim < 1:
        raise NptwofoldError("bit planes need shape (b, *weight_shape), got a scalar")
    return bits, check_bits(bits.shape[0])


def check_dropped_planes(dropped, b):
    """Return the level step 2^k of a b-bit layer whose k lowest planes are dropped."""
    if isinstance(dropped, (bool, np.bool_)) or not isinstance(dropped, (int, np.integer)) \
            or not 0 <= dropped <= b - 2:
        raise NptwofoldError(f"dropped low planes must be an integer in 0..{b - 2} for b={b}, "
                             f"got {dropped!r}")
    return 2 ** int(dropped)


@numba.njit(cache=True)
def _weight_of_level(level, scale, qmax):
    return scale * level / qmax


@numba.njit(cache=True)
def _quantize_kernel(weights, scale, qmax, levels):
    for i in range(weights.size):
        levels[i] = np.int64(np.rint(np.float64(weights[i]) / scale * qmax))


@numba.njit(cache=True)
def _dequantize_kernel(levels, scale, qmax, weights):
    for i in range(levels.size):
        weights[i] = _weight_of_level(np.float64(levels[i]), scale, qmax)


@numba.njit(cache=True)
def _decompose_kernel(levels, planes, encoding):
    b = planes.shape[0]
    for i in range(levels.size):
        level = np.int64(levels[i])
        if encoding == SIGN_MAGNITUDE:
            code = abs(level) | (np.int64(level < 0) << (b - 1))
        elif encoding == OFFSET_BINARY:
            code = level + (np.int64(1) << (b - 1))
        else:
            # Arithmetic shift: for negative levels the high bits fill with ones, which is
            # exactly the b-bit two's complement sign bit.
            code = level
        for n in range(b):
            planes[n, i] = (code >> n) & 1


@numba.njit(cache=True)
def _compose_kernel(planes, levels, encoding):
    b = planes.shape[0]
    for i in range(levels.size):
        low = np.int64(0)
        for n in range(b - 1):
            low += np.int64(planes[n, i]) << n
        top = np.int64(planes[b - 1, i])
        if encoding == SIGN_MAGNITUDE:
            levels[i] = -low if top else low
        elif encoding == OFFSET_BINARY:
            levels[i] = low + ((top - 1) << (b - 1))
        else:
            levels[i] = low - (top << (b - 1))


@numba.njit(nogil=True, cache=True)
def _chunk_levels(bits, encoding, low, level):
    """Fill low[i] = sum_{n<b-1} 2^n B(n)_i (the magnitude in sign-magnitude) and level[i] =
    q~_i, before clipping and rounding. Plane by plane, so the inner loops run over
    contiguous weights and vectorize; the sums keep the order n = 0, 1, ..., b - 2."""
    b = bits.shape[0]
    low[:] = 0.0
    weight = 1.0
    for n in range(b - 1):
        for i in range(low.size):
            low[i] += weight * np.float64(bits[n, i])
        weight *= 2.0
    for i in range(low.size):  # weight is now 2^(b-1)
        top = np.float64(bits[b - 1, i])
        if encoding == SIGN_MAGNITUDE:
            level[i] = (1.0 - 2.0 * top) * low[i]
        elif encoding == OFFSET_BINARY:
            level[i] = low[i] + weight * (top - 1.0)
        else:
            level[i] = low[i] - weight * top


@numba.njit(cache=True)
def _top_level(qmax, step):
    """qmax_k: the largest multiple of step that is at most qmax."""
    return step * np.floor(qmax / step)


@numba.njit(cache=True)
def _round_level(level, top, step):
    """Round(clip(q~, -top, top)) to a multiple of step (top = qmax_k)."""
    return step * np.rint(min(max(level, -top), top) / step)


@numba.njit(nogil=True, cache=True)
def _bits_forward_kernel(bits, scale, qmax, step, encoding, weights):
    low, level = np.empty(weights.size), np.empty(weights.size)
    _chunk_levels(bits, encoding, low, level)
    top = _top_level(qmax, step)
    for i in range(weights.size):
        weights[i] = _weight_of_level(_round_level(level[i], top, step), scale, qmax)


@numba.njit(nogil=True, cache=True)
def _bits_backward_kernel(bits, scale, qmax, step, encoding, grad_weights, grad_bits,
                          accumulate):
    b = bits.shape[0]
    low, grad_level = np.empty(grad_weights.size), np.empty(grad_weights.size)
    _chunk_levels(bits, encoding, low, grad_level)
    top = _top_level(qmax, step)
    for i in range(grad_weights.size):
        inside = -top <= grad_level[i] <= top
        grad_level[i] = np.float64(grad_weights[i]) * scale / qmax if inside else 0.0
    high = 2.0 ** (b - 1)
    for i in range(grad_weights.size):
        if encoding == SIGN_MAGNITUDE:
            top_grad = -2.0 * low[i] * grad_level[i]
            low[i] = 1.0 - 2.0 * np.float64(bits[b - 1, i])  # the low planes' factor
        elif encoding == OFFSET_BINARY:
            top_grad = high * grad_level[i]
            low[i] = 1.0
        else:
            top_grad = -high * grad_level[i]
            low[i] = 1.0
        grad_bits[b - 1, i] = grad_bits[b - 1, i] + top_grad if accumulate else top_grad
    weight = 1.0
    for n in range(b - 1):
        for i in range(grad_weights.size):
            if accumulate:
                grad_bits[n, i] += low[i] * weight * grad_level[i]
            else:
                grad_bits[n, i] = low[i] * weight * grad_level[i]
        weight *= 2.0


@numba.njit(nogil=True, cache=True)
def _real_levels_kernel(bits, encoding, levels):
    _chunk_levels(bits, encoding, np.empty(levels.size), levels)


@numba.njit(nogil=True, cache=True)
def _rounded_levels_kernel(bits, qmax, step, encoding, levels):
    real = np.empty(levels.size)
    _chunk_levels(bits, encoding, np.empty(levels.size), real)
    top = _top_level(qmax, step)
    for i in range(levels.size):
        levels[i] = np.int64(_round_level(real[i], top, step))


def quantize(weights, b):
    """Quantize one layer to b bits: return (levels q as int8/int16, scale s = max|W|).

    An all-zero layer has s = 0 and gives q = 0.
    """
    weights = check_float_array("weights", weights)
    if not np.all(np.isfinite(weights)):
        raise NptwofoldError("weights contain NaN or inf; cannot quantize")
    levels = np.zeros(weights.shape, level_dtype(b))
    scale = float(np.max(np.abs(weights))) if weights.size else 0.0
    if scale > 0:
        _quantize_kernel(weights.ravel(), scale, float(max_level(b)), levels.reshape(-1))
    return levels, scale


def dequantize(levels, scale, b, dtype=np.float32):
    """Weights s * q / qmax of b-bit levels q, as dtype (float32 or float64)."""
    levels = np.asarray(levels)
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise NptwofoldError(f"dequantize dtype must be float32 or float64, got {np.dtype(dtype)}")
    weights = np.empty(levels.shape, dtype)
    _dequantize_kernel(levels.ravel(), float(scale), float(max_level(b)), weights.reshape(-1))
    return weights


def decompose(levels, b, encoding="twos_complement"):
    """Exact bit planes of integer levels in `encoding`: uint8 array (b, *levels.shape)."""
    b = check_bits(b)
    code = encoding_code(encoding)
    levels = np.asarray(levels)
    if levels.dtype.kind not in "iu":
        raise NptwofoldError(f"levels to decompose must be integers, got {levels.dtype}")
    low, high = level_range(b, encoding)
    if levels.size and (levels.min() < low or levels.max() > high):
        raise NptwofoldError(f"levels lie outside the {b}-bit {encoding} range {low}..{high}")
    planes = np.empty((b,) + levels.shape, np.uint8)
    _decompose_kernel(levels.ravel(), planes.reshape(b, -1), code)
    return planes


def compose(planes, encoding="twos_complement"):
    """Integer levels q from exact uint8 bit planes (b, *shape) in `encoding`."""
    code = encoding_code(encoding)
    planes = np.asarray(planes)
    if planes.dtype != np.uint8 or planes.ndim < 1:
        raise NptwofoldError(f"bit planes to compose must be uint8 (b, *shape), got {planes.dtype}")
    b = check_bits(planes.shape[0])
    if planes.size and planes.max() > 1:
        raise NptwofoldError("bit planes to compose hold values other than 0 and 1")
    levels = np.empty(planes.shape[1:], level_dtype(b))
    _compose_kernel(np.ascontiguousarray(planes).reshape(b, -1), levels.reshape(-1), code)
    return levels


def bits_forward(bits, scale, dropped=0, encoding="twos_complement"):
    """Training forward: W = s * q / qmax in the dtype of bits, q = rounded_levels(bits,
    dropped, encoding).

    The backward needs only bits and scale, so nothing is carried between the two calls.
    """
    bits, b = check_bit_planes(bits)
    step = check_dropped_planes(dropped, b)
    weights = np.empty(bits.shape[1:], bits.dtype)
    flat_bits, flat_weights = np.ascontiguousarray(bits).reshape(b, -1), weights.reshape(-1)
    settings = (float(scale), float(max_level(b)), float(step), encoding_code(encoding))
    _over_weight_chunks(flat_weights.size, lambda chunk: _bits_forward_kernel(
        flat_bits[:, chunk], *settings, flat_weights[chunk]))
    return weights


def bits_backward(bits, scale, grad_weights, dropped=0, encoding="twos_complement", out=None):
    """Training backward: given dL/dW, return dL/dbits in the dtype of bits; with `out` (an
    array like bits, C-contiguous) add it into `out` in place instead and return `out`.

    dL/dB(n) = dL/dW * s / qmax * dq~/dB(n) (module docstring) where q~ is inside
    [-qmax, qmax], else 0. The scale s is a buffer, not trained (`layers.WeightLayer`), so no
    gradient is formed for it. With dropped planes the clip range is +-qmax_k; the dropped
    planes get a gradient like any other (the caller holds them at 0).
    """
    bits, b = check_bit_planes(bits)
    step = check_dropped_planes(dropped, b)
    grad_weights = check_float_array("weight gradient", grad_weights)
    if grad_weights.shape != bits.shape[1:]:
        raise NptwofoldError(
            f"weight gradient shape {grad_weights.shape} does not match bit planes {bits.shape}"
        )
    if out is not None and (out.shape != bits.shape or out.dtype != bits.dtype
                            or not out.flags.c_contiguous):
        raise NptwofoldError(f"out must be a C-contiguous {bits.dtype} array of shape "
                             f"{bits.shape}")
    grad_bits = np.empty_like(bits, order="C") if out is None else out
    flat_bits, flat_grad_bits = np.ascontiguousarray(bits).reshape(b, -1), grad_bits.reshape(b, -1)
    flat_grad_weights = grad_weights.ravel()
    settings = (float(scale), float(max_level(b)), float(step), encoding_code(encoding))
    _over_weight_chunks(flat_grad_weights.size, lambda chunk: _bits_backward_kernel(
        flat_bits[:, chunk], *settings, flat_grad_weights[chunk], flat_grad_bits[:, chunk],
        out is not None))
    return grad_bits


def clamp_bits(bits):
    """Clamp continuous bit planes to [0, 1] in place (after every optimizer step)."""
    np.clip(bits, 0.0, 1.0, out=bits)


def rounded_levels(bits, dropped=0, encoding="twos_complement"):
    """Integer levels Round(clip(q~)) that continuous bit planes in `encoding` stand for,
    multiples of 2^dropped (see the module docstring)."""
    bits, b = check_bit_planes(bits)
    step = check_dropped_planes(dropped, b)
    levels = np.empty(bits.shape[1:], level_dtype(b))
    flat_bits, flat_levels = np.ascontiguousarray(bits).reshape(b, -1), levels.reshape(-1)
    settings = (float(max_level(b)), float(step), encoding_code(encoding))
    _over_weight_chunks(flat_levels.size, lambda chunk: _rounded_levels_kernel(
        flat_bits[:, chunk], *settings, flat_levels[chunk]))
    return levels


def real_levels(bits, encoding="twos_complement"):
    """q~ of continuous bit planes in `encoding`, before clipping and rounding (float64)."""
    bits, b = check_bit_planes(bits)
    levels = np.empty(bits.shape[1:], np.float64)
    flat_bits, flat_levels = np.ascontiguousarray(bits).reshape(b, -1), levels.reshape(-1)
    code = encoding_code(encoding)
    _over_weight_chunks(flat_levels.size, lambda chunk: _real_levels_kernel(
        flat_bits[:, chunk], code, flat_levels[chunk]))
    return levels


def rebinarize_bits(bits, dropped=0, encoding="twos_complement"):
    """Overwrite continuous bit planes in place with the exact {0, 1} planes of their rounded
    levels; return those levels. The training forward is unchanged by this, and the dropped
    planes come out 0."""
    levels = rounded_levels(bits, dropped, encoding)
    bits[...] = decompose(levels, bits.shape[0], encoding)
    return levels


# The network's input is pixel / 255 in [0, 1], so the stem's activation clip is 1 and
# its a-bit levels are the 8-bit pixels themselves.
STEM_CLIP = 1.0


def quantize_activations(x, clip, activation_bits):
    """Unsigned levels round(clip(x, 0, clip) / clip * (2^a - 1)) of the inputs a CIM-mapped
    layer sees, as floats of x's dtype (rounding half to even, like the weights). A clip of 0
    (a layer whose inputs were all 0 on the calibration images) gives all-zero levels."""
    if clip == 0:
        return np.zeros_like(x)
    return np.rint(np.clip(x, 0, clip) / clip * ((1 << activation_bits) - 1)).astype(x.dtype)
