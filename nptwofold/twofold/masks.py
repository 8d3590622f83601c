"""The mapped layers of a model and their LFSR keep-masks: every conv and the FC becomes bit
planes in the array's encoding, and gets a mask of its sparsity (the stem's and the
classifier's may have their own), drawn from a seed of its own."""
import numpy as np

from ..cim.device import outputs_per_tile
from ..errors import NptwofoldError
from ..kernels.lfsr import (kept_per_column, lfsr_keep_mask_for_kept, lfsr_width_for_rows,
                            weight_mask)
from ..layers import WeightLayer

LFSR_STREAM = 2  # random stream (seed, 2, layer index) picks each layer's LFSR seed


def layer_matrix_shape(weight_shape):
    """(R, C) of a layer: R = Cin*kh*kw inputs, C = Cout outputs."""
    return int(np.prod(weight_shape[1:])), int(weight_shape[0])


def masked_layers(model, config, bits, encoding, seed, crossbar_cols):
    """({name: WeightLayer}, {name: LfsrKeepMask}, {name: the mask in the weight's shape}) of
    every mapped layer of `model`, each turned into `bits` bit planes in `encoding` (a layer
    that holds planes already must hold them in that encoding). Mask group 0 is the output
    channels of one column tile of `crossbar_cols` columns."""
    layers, masks = {}, {}
    group = config.mask_group or outputs_per_tile(encoding, bits, crossbar_cols)
    base_seed = config.lfsr_seed or seed
    mapped = [(n.rstrip("."), m) for n, m in model.named_modules() if isinstance(m, WeightLayer)]
    sparsity = {name: config.sparsity for name, _ in mapped}
    for name, own in ((mapped[0][0], config.stem_sparsity),
                      (mapped[-1][0], config.classifier_sparsity)):
        if own is not None:
            sparsity[name] = own
    for index, (name, layer) in enumerate(mapped):
        if not layer.bit_width:
            layer.use_bit_weights(bits, encoding)
        elif layer.bit_encoding != encoding:
            raise NptwofoldError(f"{name} holds {layer.bit_encoding} bit planes, the twofold "
                                 f"hardware config says {encoding}")
        rows, cols = layer_matrix_shape(layer.params["weight_bits"].shape[1:])
        width = lfsr_width_for_rows(rows)
        lfsr_seed = int(np.random.default_rng([base_seed, LFSR_STREAM, index])
                        .integers(1, 2 ** width))
        layers[name] = layer
        masks[name] = lfsr_keep_mask_for_kept(
            rows, cols, kept_per_column(rows, sparsity[name]), lfsr_seed, group)
    # the weight-shaped masks are used every step, so they are laid out once
    weight_masks = {name: np.ascontiguousarray(weight_mask(
        masks[name].mask, layer.params["weight_bits"].shape[1:]))
        for name, layer in layers.items()}
    return layers, masks, weight_masks
