"""Layers: hold parameters, gradients, buffers and the forward cache, and call the kernels.

Activations are NHWC inside the engine (contiguous channels suit the convolutions' SIMD
vectors and the per-channel kernels); weights keep the checkpoint layouts (conv OIHW, FC
(out, in)). Every layer has an explicit `forward(x)` and `backward(dy)`; `backward` fills
`grads` and returns dL/dx. Only a training forward writes the cache: in inference mode a
forward leaves the layer untouched, so several image chunks may run through the same model at
once (`steps.predict`).
"""
import contextlib

import numpy as np

from .kernels.batchnorm import batchnorm_backward, batchnorm_forward_train, channel_affine
from .kernels.conv import (conv3x3_backward, conv3x3_forward, conv3x3_matrix_forward,
                           weight_as_matrix)
from .kernels.elementwise import (global_avg_pool_backward, global_avg_pool_forward,
                                  relu_forward, shortcut_a_backward, shortcut_a_forward)
from .kernels.linear import linear_backward, linear_forward
from .kernels.quant import bits_backward, bits_forward, decompose, quantize


class Module:
    """A node of the model tree. Sub-modules are attributes; names follow attribute order."""

    training = True
    derived = None  # while the weights are fixed: values derived from them (`fixed_weights`)

    def __init__(self):
        self.params = {}   # name -> array, trained
        self.grads = {}    # name -> array, same shapes, filled by backward
        self.buffers = {}  # name -> array, saved but not trained (BN running statistics)

    def children(self):
        return [(name, value) for name, value in vars(self).items() if isinstance(value, Module)]

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        """(dotted name, parameter, gradient), in PyTorch state_dict order."""
        for prefix, module in self.named_modules():
            for name, value in module.params.items():
                yield prefix + name, value, module.grads[name]

    def state_arrays(self):
        """Every saved array (parameters and buffers) by its PyTorch state_dict name."""
        for prefix, module in self.named_modules():
            for name, value in {**module.params, **module.buffers}.items():
                yield prefix + name, value

    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    @contextlib.contextmanager
    def fixed_weights(self):
        """While open, the weights do not change, so a layer may keep what it derives from
        them: `steps.predict` folds each batch norm into its convolution once per call
        instead of once per image chunk (under the GIL, that was a third of the time of
        two-thread inference)."""
        modules = [module for _, module in self.named_modules()]
        for module in modules:
            module.derived = {}
        try:
            yield self
        finally:
            for module in modules:
                module.derived = None


class Sequential(Module):
    """Children named "0", "1", ... run in order (a ResNet stage)."""

    def __init__(self, *layers):
        super().__init__()
        for index, layer in enumerate(layers):
            setattr(self, str(index), layer)

    def forward(self, x):
        for _, layer in self.children():
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for _, layer in reversed(self.children()):
            dy = layer.backward(dy)
        return dy


class WeightLayer(Module):
    """A layer with one weight tensor, trained either directly or as bit planes.

    After `use_bit_weights(b, encoding)` the trained variable is `weight_bits`, b continuous
    planes in [0, 1] in the array's weight encoding (`kernels.quant`: two's complement, offset
    binary or sign-magnitude), so what is trained is what the array stores; the weight used in
    the forward pass is s * Round(clip(q~)) / qmax with a straight-through gradient. `dropped_planes`
    counts the low planes the Twofold method has dropped (it holds them at 0); the rounding
    then goes to multiples of 2^dropped_planes. The scale
    `weight_scale` = max|W| of the starting weights is a buffer, not trained: trained, Reg_Net
    shrinks it towards 0 (that shrinks the cut weights too), a degenerate way out that
    collapsed whole layers in our first runs.
    """

    bit_width = 0  # 0: the float weight is trained directly
    bit_encoding = "twos_complement"  # encoding of the bit planes, set by use_bit_weights
    dropped_planes = 0
    forward_op = None  # set by use_forward_op

    def use_forward_op(self, op):
        """Route `forward(x)` through `op(layer, x)`; None restores the layer's own forward.

        The hook of a simulator that runs the layer's matmul elsewhere (the CIM array,
        `nptwofold.cim.network`). op may call `layer.own_forward(x)` first, which fills the cache
        `backward` uses: a straight-through fine-tune returns its own output and trains with the
        layer's plain gradient.
        """
        self.forward_op = op

    def forward(self, x):
        if self.forward_op is None:
            return self.own_forward(x)
        return self.forward_op(self, x)

    def use_bit_weights(self, b, encoding="twos_complement"):
        weight = self.params.pop("weight")
        del self.grads["weight"]
        levels, scale = quantize(weight, b)
        self.bit_encoding = encoding
        self.params["weight_bits"] = decompose(levels, b, encoding).astype(weight.dtype)
        self.grads["weight_bits"] = np.zeros_like(self.params["weight_bits"])
        self.buffers["weight_scale"] = np.array([scale], weight.dtype)
        self.bit_width = b

    def effective_weight(self):
        if not self.bit_width:
            return self.params["weight"]
        return bits_forward(self.params["weight_bits"], self.buffers["weight_scale"][0],
                            self.dropped_planes, self.bit_encoding)

    def store_weight_grad(self, dweight):
        self.weight_grad = dweight  # dL/dW of the last backward (the rounding's Fisher reads it)
        if not self.bit_width:
            self.grads["weight"][...] = dweight
            return
        self.grads["weight_bits"][...] = bits_backward(
            self.params["weight_bits"], self.buffers["weight_scale"][0], dweight,
            self.dropped_planes, self.bit_encoding)


class Conv3x3(WeightLayer):
    """3x3 convolution, padding 1, no bias. `first` skips dL/dx (nothing consumes it)."""

    def __init__(self, in_channels, out_channels, stride, rng, dtype=np.float32, first=False):
        super().__init__()
        self.stride = stride
        self.first = first
        fan_in = in_channels * 9
        # Kaiming-normal for ReLU networks (He et al. 2015), as the reference ResNet uses
        weight = rng.standard_normal((out_channels, in_channels, 3, 3)) * np.sqrt(2.0 / fan_in)
        self.params["weight"] = weight.astype(dtype)
        self.grads["weight"] = np.zeros_like(self.params["weight"])

    def own_forward(self, x):
        weight = self.effective_weight()
        if self.training:  # the backward pass recomputes the patches from x
            self.x, self.weight = x, weight
        return conv3x3_forward(x, weight, self.stride)

    def folded_forward(self, x, batchnorm):
        """Inference: batchnorm(conv(x)) (with its ReLU), the batch norm's scale folded into
        the weight matrix and its shift added to the output (kept while the weights are
        fixed)."""
        folded = self.derived.get("folded") if self.derived is not None else None
        if folded is None:
            scale, shift = batchnorm.inference_affine(x.dtype)
            folded = weight_as_matrix(self.effective_weight() * scale[:, None, None, None]), shift
            if self.derived is not None:
                self.derived["folded"] = folded
        return conv3x3_matrix_forward(x, folded[0], self.stride, folded[1], batchnorm.relu)

    def backward(self, dy):
        dx, dweight = conv3x3_backward(dy, self.x, self.weight, self.stride,
                                       need_input_grad=not self.first)
        self.store_weight_grad(dweight)
        return dx


class BatchNorm(Module):
    """Batch norm over channels with running statistics (PyTorch momentum/eps conventions),
    followed by a ReLU if `relu` (fused into the same passes over memory)."""

    def __init__(self, channels, dtype=np.float32, momentum=0.1, eps=1e-5, relu=False):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.params["weight"] = np.ones(channels, dtype)
        self.params["bias"] = np.zeros(channels, dtype)
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}
        self.buffers["running_mean"] = np.zeros(channels, dtype)
        self.buffers["running_var"] = np.ones(channels, dtype)
        self.buffers["num_batches_tracked"] = np.zeros((), np.int64)
        self.relu = relu

    def inference_affine(self, dtype):
        """(scale, shift) per channel of the inference-mode normalisation, y = x scale + shift."""
        scale = self.params["weight"] / np.sqrt(self.buffers["running_var"] + self.eps)
        shift = self.params["bias"] - self.buffers["running_mean"] * scale
        return scale.astype(dtype), shift.astype(dtype)

    def forward(self, x):
        gamma, beta = self.params["weight"], self.params["bias"]
        if not self.training:
            y = channel_affine(x, *self.inference_affine(x.dtype))
            return relu_forward(y) if self.relu else y
        y, mean, var, inv_std = batchnorm_forward_train(x, gamma, beta, self.eps, self.relu)
        # the backward recomputes xhat from x; y (kept anyway as the next layer's input) is the
        # ReLU's mask
        self.x, self.y, self.mean, self.inv_std = x, y if self.relu else None, mean, inv_std
        rows = x.size // x.shape[-1]
        unbiased_var = var * rows / max(rows - 1, 1)
        self.buffers["running_mean"] += self.momentum * (mean - self.buffers["running_mean"])
        self.buffers["running_var"] += self.momentum * (unbiased_var - self.buffers["running_var"])
        self.buffers["num_batches_tracked"] += 1
        return y

    def backward(self, dy):
        dx, self.grads["weight"][...], self.grads["bias"][...] = batchnorm_backward(
            dy, self.x, self.mean, self.inv_std, self.params["weight"], self.y)
        self.x = self.y = None
        return dx


class ShortcutA(Module):
    """Option-A shortcut: identity, or subsample by 2 and zero-pad channels."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.identity = stride == 1 and in_channels == out_channels
        self.out_channels = out_channels

    def forward(self, x):
        if self.identity:
            return x
        if self.training:
            self.input_shape = x.shape
        return shortcut_a_forward(x, self.out_channels)

    def backward(self, dy):
        if self.identity:
            return dy
        _, height, width, in_channels = self.input_shape
        return shortcut_a_backward(dy, height, width, in_channels)


class GlobalAvgPool(Module):
    def forward(self, x):
        if self.training:
            self.input_shape = x.shape
        return global_avg_pool_forward(x)

    def backward(self, dy):
        _, height, width, _ = self.input_shape
        return global_avg_pool_backward(dy, height, width)


class Linear(WeightLayer):
    """Fully connected layer, weight (out, in), PyTorch's default uniform initialisation."""

    def __init__(self, in_features, out_features, rng, dtype=np.float32):
        super().__init__()
        bound = 1.0 / np.sqrt(in_features)
        self.params["weight"] = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        self.params["bias"] = rng.uniform(-bound, bound, out_features).astype(dtype)
        self.grads = {name: np.zeros_like(value) for name, value in self.params.items()}

    def own_forward(self, x):
        weight = self.effective_weight()
        if self.training:
            self.x, self.weight = x, weight
        return linear_forward(x, weight, self.params["bias"])

    def backward(self, dy):
        dx, dweight, self.grads["bias"][...] = linear_backward(dy, self.x, self.weight)
        self.store_weight_grad(dweight)
        return dx
