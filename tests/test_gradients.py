"""Every layer's backward, and the whole ResNet-20's, against float64 central differences.

A layer's scalar loss is L = sum(forward(x) * R) for a fixed random R, so dL/dy = R. The
finite differences perturb the input or parameter array in place (layers hold references to
their parameter arrays) and call forward again.

ReLU kinks: a central difference that straddles a kink measures neither one-sided slope. Where
a network has ReLUs, every perturbed forward pass also records which units are active; a
coordinate whose +eps and -eps passes switch any unit is skipped (and at most a few may be).
"""

import numpy as np
import pytest

from nptwofold.kernels.loss import distillation_loss, softmax_cross_entropy
from nptwofold.layers import BatchNorm, Conv3x3, GlobalAvgPool, Linear, ShortcutA
from nptwofold.model import BasicBlock, ResNet20

STEP = 1e-6
TOL = 1e-6


def central_differences(loss, array, indices, pattern=None, step=STEP):
    """d loss() / d array[index] for each index; NaN where the ReLU pattern changes."""
    base = None
    if pattern is not None:
        loss()  # the layer's cached state must describe the unperturbed point
        base = pattern()
    numeric = np.empty(len(indices))
    for k, index in enumerate(indices):
        original = array[index]
        array[index] = original + step
        plus = loss()
        same = pattern is None or all(np.array_equal(a, b) for a, b in zip(pattern(), base))
        array[index] = original - step
        minus = loss()
        same = same and (pattern is None
                         or all(np.array_equal(a, b) for a, b in zip(pattern(), base)))
        array[index] = original
        numeric[k] = (plus - minus) / (2 * step) if same else np.nan
    return numeric


def assert_gradient_matches(analytic, numeric, what, max_skipped=0):
    analytic = np.asarray(analytic, dtype=np.float64).ravel()
    numeric = np.asarray(numeric, dtype=np.float64).ravel()
    kept = ~np.isnan(numeric)
    assert np.count_nonzero(~kept) <= max_skipped, f"{what}: too many coordinates at a kink"
    analytic, numeric = analytic[kept], numeric[kept]
    assert analytic.size > 0
    scale = max(np.abs(numeric).max(), np.abs(analytic).max())
    assert scale > 0, f"{what}: gradient identically zero, the check would prove nothing"
    error = np.abs(analytic - numeric).max() / scale
    assert error < TOL, f"{what}: max |analytic - numeric| / max |grad| = {error:.3g}"


def all_indices(shape):
    return list(np.ndindex(shape))


def some_indices(shape, count, rng):
    """`count` distinct random coordinates (all of them if the array is smaller)."""
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(count, size), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def check_layer(layer, x, rng, pattern=None, max_skipped=0):
    """Backward of `layer` against central differences of sum(forward(x) * R), for x and params."""
    y = layer.forward(x)
    weights = rng.standard_normal(y.shape)
    dx = layer.backward(weights.copy())
    analytic_params = {name: grad.copy() for name, grad in layer.grads.items()}

    def loss():
        return float(np.sum(layer.forward(x) * weights))

    # read right after a loss() call, the pattern describes the point loss() just evaluated
    pattern_fn = None if pattern is None else (lambda: pattern(layer))
    indices = all_indices(x.shape)
    numeric = central_differences(loss, x, indices, pattern_fn)
    if dx is not None:
        assert dx.shape == x.shape and dx.dtype == np.float64
        assert_gradient_matches([dx[i] for i in indices], numeric, "dL/dx", max_skipped)
    for name, param in layer.params.items():
        assert analytic_params[name].shape == param.shape
        indices = all_indices(param.shape)
        numeric = central_differences(loss, param, indices, pattern_fn)
        assert_gradient_matches([analytic_params[name][i] for i in indices], numeric,
                                f"dL/d{name}", max_skipped)
    return dx


# --------------------------------------------------------------------------------------------
# Single layers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_img, height, width, in_ch, out_ch, stride", [
    (2, 5, 5, 3, 4, 1),
    (1, 7, 5, 3, 5, 2),
    (2, 6, 6, 2, 3, 2),
    (1, 9, 9, 5, 3, 1),
    (2, 3, 4, 3, 2, 2),
    # channels that fill whole float64 vectors (8 lanes): the register-blocked kernels
    (2, 5, 6, 8, 8, 1),
    (1, 6, 5, 16, 8, 2),
    (1, 4, 11, 3, 16, 1),
])
def test_conv3x3(n_img, height, width, in_ch, out_ch, stride):
    rng = np.random.default_rng(100 + height * stride)
    layer = Conv3x3(in_ch, out_ch, stride, rng, dtype=np.float64)
    assert layer.params["weight"].dtype == np.float64
    x = rng.standard_normal((n_img, height, width, in_ch))
    dx = check_layer(layer, x, rng)
    assert dx is not None


def test_conv3x3_first_layer_skips_input_grad():
    rng = np.random.default_rng(101)
    layer = Conv3x3(3, 4, 1, rng, dtype=np.float64, first=True)
    x = rng.standard_normal((2, 5, 7, 3))
    assert check_layer(layer, x, rng) is None  # the weight gradient is still checked


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 3), (4, 2, 2, 5), (1, 7, 7, 2)])
def test_batchnorm_training(shape, relu):
    rng = np.random.default_rng(102)
    layer = BatchNorm(shape[-1], dtype=np.float64, relu=relu)
    assert layer.training
    layer.params["weight"][...] = rng.uniform(0.5, 2.0, shape[-1])
    layer.params["bias"][...] = rng.standard_normal(shape[-1])
    x = 0.7 + 1.3 * rng.standard_normal(shape)
    # with the ReLU, entries whose output crosses 0 within a step are skipped (their one-sided
    # differences are not the gradient)
    check_layer(layer, x, rng, pattern=(lambda bn: [bn.y > 0]) if relu else None,
                max_skipped=2 if relu else 0)


@pytest.mark.parametrize("shape, out_ch", [((2, 8, 8, 4), 8), ((2, 5, 7, 3), 7),
                                           ((1, 3, 1, 2), 6)])
def test_shortcut_a_downsample(shape, out_ch):
    rng = np.random.default_rng(104)
    layer = ShortcutA(shape[-1], out_ch, stride=2)
    assert not layer.identity
    check_layer(layer, rng.standard_normal(shape), rng)


def test_shortcut_a_identity():
    rng = np.random.default_rng(105)
    layer = ShortcutA(4, 4, stride=1)
    assert layer.identity
    check_layer(layer, rng.standard_normal((2, 3, 5, 4)), rng)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 1, 1, 2), (2, 8, 8, 6)])
def test_global_avg_pool(shape):
    rng = np.random.default_rng(106)
    check_layer(GlobalAvgPool(), rng.standard_normal(shape), rng)


@pytest.mark.parametrize("n_rows, in_features, out_features", [(3, 7, 5), (1, 64, 10), (4, 1, 3)])
def test_linear(n_rows, in_features, out_features):
    rng = np.random.default_rng(107)
    layer = Linear(in_features, out_features, rng, dtype=np.float64)
    assert layer.params["weight"].shape == (out_features, in_features)
    assert layer.params["weight"].dtype == np.float64
    check_layer(layer, rng.standard_normal((n_rows, in_features)), rng)


def relu_pattern_of_block(block):
    return [block.bn1.y > 0, block.y > 0]


@pytest.mark.parametrize("in_ch, out_ch, stride, size", [(4, 4, 1, 5), (3, 3, 1, 4),
                                                         (4, 8, 2, 7), (2, 6, 2, 6)])
def test_basic_block(in_ch, out_ch, stride, size):
    rng = np.random.default_rng(108)
    block = BasicBlock(in_ch, out_ch, stride, rng, np.float64)
    assert block.shortcut.identity == (stride == 1 and in_ch == out_ch)
    for bn in (block.bn1, block.bn2):  # away from the initial gamma=1, beta=0
        bn.params["weight"][...] = rng.uniform(0.5, 1.5, out_ch)
        bn.params["bias"][...] = 0.3 * rng.standard_normal(out_ch)
    x = rng.standard_normal((2, size, size, in_ch))
    check_layer(block, x, rng, pattern=relu_pattern_of_block, max_skipped=2)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_softmax_cross_entropy(scale):
    rng = np.random.default_rng(109)
    logits = scale * rng.standard_normal((5, 10))
    labels = rng.integers(0, 10, 5)
    _, dlogits, _ = softmax_cross_entropy(logits, labels)
    assert dlogits.dtype == np.float64
    numeric = central_differences(lambda: softmax_cross_entropy(logits, labels)[0], logits,
                                  all_indices(logits.shape))
    assert_gradient_matches(dlogits, numeric, "dL/dlogits")


@pytest.mark.parametrize("temperature, weight", [(1.0, 0.5), (4.0, 0.9), (10.0, 1.0)])
def test_distillation_loss(temperature, weight):
    rng = np.random.default_rng(110)
    logits, teacher_logits = 3 * rng.standard_normal((5, 10)), 6 * rng.standard_normal((5, 10))
    labels = rng.integers(0, 10, 5)

    def loss():
        return distillation_loss(logits, teacher_logits, labels, temperature, weight)[0]

    _, dlogits, _ = distillation_loss(logits, teacher_logits, labels, temperature, weight)
    numeric = central_differences(loss, logits, all_indices(logits.shape))
    assert_gradient_matches(dlogits, numeric, "dL/dlogits")


# --------------------------------------------------------------------------------------------
# The whole network
# --------------------------------------------------------------------------------------------

def test_resnet20_whole_network():
    rng = np.random.default_rng(110)
    model = ResNet20(rng, dtype=np.float64)
    params = list(model.named_parameters())
    assert len(params) == 1 + 2 + 9 * 2 * 3 + 2  # stem conv, stem BN, 9 blocks, fc
    for name, param, _ in params:
        assert param.dtype == np.float64, name
    for name, param, _ in params:  # make BN affine parameters non-trivial
        if name.endswith("bn1.weight") or name.endswith("bn2.weight"):
            param[...] = rng.uniform(0.6, 1.4, param.shape)
        elif name.endswith("bn1.bias") or name.endswith("bn2.bias"):
            param[...] = 0.2 * rng.standard_normal(param.shape)
    x = rng.uniform(0, 1, (2, 8, 8, 3))
    labels = np.array([3, 7])

    def loss():
        return softmax_cross_entropy(model.forward(x), labels)[0]

    def pattern():
        return [module.y > 0 for _, module in model.named_modules()
                if getattr(module, "y", None) is not None]

    model.train()
    # two passes, so gradients that accumulate instead of being overwritten show up
    for _ in range(2):
        _, dlogits, _ = softmax_cross_entropy(model.forward(x), labels)
        assert model.backward(dlogits) is None  # the stem returns no input gradient
    analytic = {name: grad.copy() for name, _, grad in params}
    model.forward(x)
    n_relu = len(pattern())
    assert n_relu == 1 + 9 * 2  # stem ReLU, then relu1 and the output of every block

    for name, param, _ in params:
        if name == "conv1.weight":
            # the stem's weight: its backward takes the need_input_grad=False path
            indices = some_indices(param.shape, 108, rng)
            max_skipped = 2
        else:
            indices = some_indices(param.shape, 5, rng)
            max_skipped = 1
        numeric = central_differences(loss, param, indices, pattern)
        assert_gradient_matches([analytic[name][i] for i in indices], numeric, name,
                                max_skipped)
