"""Stateless Numba kernels over arrays, importable without the training code.

    from nptwofold.kernels import conv3x3_forward, quantize, decompose, lfsr_keep_mask

Each module keeps one topic: conv (register-blocked 3x3 convolutions, im2col), simd (the
SIMD register blocks they use), batchnorm, elementwise (ReLU, option-A shortcut, pooling),
linear, loss, optim (SGD), augment, quant (scale, quantize, bit planes), regularizers
(Reg_Net, Reg_Bit), lfsr (keep-masks), and the crossbar simulation: cim_bitserial (the bit-by-bit reference),
cim_events (energy events from input popcounts) and cim_packed (the bit-packed simulation);
the crossbar they simulate is built by `nptwofold.cim.mapping` (they are imported from
their modules, not from here: they need the `nptwofold.cim` types).
"""
from .augment import crop_flip_to_float, to_float
from .batchnorm import batchnorm_backward, batchnorm_forward_train, channel_affine
from .conv import conv3x3_backward, conv3x3_forward, im2col_3x3, col2im_3x3, im2col_rows
from .elementwise import (add_relu_forward, global_avg_pool_backward, global_avg_pool_forward,
                          relu_backward, relu_forward, shortcut_a_backward, shortcut_a_forward)
from .lfsr import LFSR_TAPS, lfsr_in_range_rows, lfsr_keep_mask, lfsr_keep_mask_for_kept, lfsr_step
from .linear import linear_backward, linear_forward
from .loss import softmax_cross_entropy
from .optim import sgd_momentum_update
from .quant import (bits_backward, bits_forward, compose, decompose, dequantize, quantize,
                    rebinarize_bits)
from .regularizers import reg_bit, reg_bit_plane_lasso, reg_net

__all__ = [
    "LFSR_TAPS",
    "add_relu_forward",
    "batchnorm_backward",
    "batchnorm_forward_train",
    "bits_backward",
    "bits_forward",
    "channel_affine",
    "col2im_3x3",
    "compose",
    "conv3x3_backward",
    "conv3x3_forward",
    "crop_flip_to_float",
    "decompose",
    "dequantize",
    "global_avg_pool_backward",
    "global_avg_pool_forward",
    "im2col_3x3",
    "im2col_rows",
    "lfsr_in_range_rows",
    "lfsr_keep_mask",
    "lfsr_keep_mask_for_kept",
    "lfsr_step",
    "linear_backward",
    "linear_forward",
    "quantize",
    "rebinarize_bits",
    "reg_bit",
    "reg_bit_plane_lasso",
    "reg_net",
    "relu_backward",
    "relu_forward",
    "sgd_momentum_update",
    "shortcut_a_backward",
    "shortcut_a_forward",
    "softmax_cross_entropy",
    "to_float",
]
