"""ADC-aware fine-tuning: train a float model through the simulated array's ADC (issue 12).

Every mapped layer's forward goes through the `WeightLayer.use_forward_op` hook to `ste_forward`:
- forward: the layer's output computed on the array (`CimNetwork.array_output`: quantized inputs,
  quantized weights, bit-serial partial sums through the ADC of the network's `HardwareConfig`);
- backward: the layer's own float backward, unchanged (straight-through estimator): the op first
  runs `layer.own_forward(x)`, which fills the cache `backward` reads, and discards its value.
So the loss sees the ADC's error, and the gradient is the one of the float layer at the same
inputs. BN, ReLU and the residual adds stay float and train as usual (BN in training mode, so its
statistics adapt to the array's outputs).

After every update the float weights are quantized and mapped again (`refresh_mapping`): the
array always holds the current weights. The activation clips and ADC full scales stay those of
the calibration made before training (they are hardware settings, fixed for the fine-tune), and
are stored in the output checkpoint's calibration file (`cim.calibration`), so
`scripts/cim_eval.py` evaluates the model with the ranges it was adapted to.

Float (dense) models only: a twofold model's levels live in its bit planes and LFSR masks.
"""
import numpy as np

from ..errors import NptwofoldError
from ..kernels.augment import CROP_PAD, crop_flip_to_float
from ..kernels.quant import quantize
from ..optim import SGD
from ..steps import train_step


def ste_forward(network):
    """The forward op of `network`'s mapped layers: array output, float layer's gradient."""
    def forward(module, x):
        module.own_forward(x)  # fills the float layer's backward cache; its value is unused
        return network.array_output(network.layer_of(module), x, count=False)
    return forward


def refresh_mapping(network):
    """Quantizes every mapped layer's current float weights and maps them again."""
    for layer in network.layers.values():
        layer.levels, layer.scale = quantize(layer.module.params["weight"], layer.bits)
        layer.map(network.hardware)


def check_trainable(network):
    if network.method is not None:
        raise NptwofoldError("ADC-aware fine-tuning takes a float checkpoint; this one is a "
                             "twofold model")
    if not network.calibrated or (network.hardware.needs_adc_ranges and not network.adc_calibrated):
        raise NptwofoldError("calibrate the network (clips and ADC ranges) before fine-tuning")


def finetune(network, images, labels, epochs, lr, batch_size=128, momentum=0.9,
             weight_decay=5e-4, seed=0, on_step=None):
    """Fine-tunes `network.model` in place through the ADC (module docstring) with SGD, random
    crops and flips. `on_step(epoch, step, loss, correct, n)` is called after every step.
    Returns the mean loss of each epoch."""
    check_trainable(network)
    model = network.model
    optimizer = SGD(model, momentum, weight_decay)
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        total = 0.0
        for step, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            n = len(batch)
            inputs = crop_flip_to_float(images[batch], rng.integers(0, 2 * CROP_PAD + 1, n),
                                        rng.integers(0, 2 * CROP_PAD + 1, n),
                                        rng.random(n) < 0.5)
            with network.routed(ste_forward(network)):
                loss, correct, _ = train_step(model, optimizer, inputs, labels[batch], lr)
            refresh_mapping(network)
            total += loss * n
            if on_step is not None:
                on_step(epoch, step, loss, correct, n)
        epoch_losses.append(total / len(images))
    model.eval()
    return epoch_losses

