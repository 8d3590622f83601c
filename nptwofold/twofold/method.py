"""The `Twofold` state of one model: its mapped layers and masks (`masks`), the training hooks
(`regularizers`), the input activity (`activity`), post-training (`rounding`) and its report
and checkpoint group (`report`), each job in its module; this one holds the shared state.
"""
import numpy as np

from ..hardware import HardwareConfig
from ..kernels.energy import level_energy_table
from ..kernels.quant import SIGN_MAGNITUDE, decompose, encoding_code, rounded_levels
from .activity import ActivityMeasurement
from .masks import masked_layers
from .regularizers import RegularizerHooks
from .report import LayerReport
from .rounding import PostTraining


class Twofold(RegularizerHooks, ActivityMeasurement, PostTraining, LayerReport):
    """The method's state for one model: mapped layers, their masks, and the training hooks."""

    def __init__(self, model, config, seed, hardware=None):
        self.config = config.validated()
        # the array the bit planes are made for: their precision b and encoding, the input
        # bits and cell energies the energy regularizer weighs
        self.hardware = HardwareConfig() if hardware is None else hardware
        self.bits, self.encoding = self.hardware.weight_bits, self.hardware.weight_encoding
        self.model = model
        # name -> WeightLayer, LfsrKeepMask, and the mask in the weight's shape
        self.layers, self.masks, self.weight_masks = masked_layers(
            model, config, self.bits, self.encoding, seed, self.hardware.crossbar_cols)
        total = sum(layer.params["weight_bits"][0].size for layer in self.layers.values())
        self.param_share = {name: layer.params["weight_bits"][0].size / total
                            for name, layer in self.layers.items()}
        self.pruned = False  # set by hard_prune: from then on the masks are enforced every step
        self.energy_table = level_energy_table(self.bits, self.encoding,
                                               self.hardware.cell_energy_pj)
        # Reg_Bit counts the planes the array stores as cell bits: sign-magnitude's sign plane
        # only picks the column group, so it is left out
        self.sign_plane = (self.bits - 1 if encoding_code(self.encoding)
                           == SIGN_MAGNITUDE else None)
        # the planes of level 0, which a cut weight holds (not all zero in offset binary)
        self.zero_planes = decompose(np.zeros(1, np.int64), self.bits,
                                     self.encoding)[:, 0]
        self.activity_images = None  # uint8 images a_i is measured on, set by the trainer
        self.check_labels = None  # their labels: the budgeted rounding's Fisher needs them
        self.activity = None         # name -> a_i in the weight's shape; None = to be measured
        self.energy_reference = None  # E_ref, pJ per image

    def keep_mask(self, name):
        """The layer's keep-mask in its weight's shape (OIHW or (out, in)), uint8, 1 = kept."""
        return self.weight_masks[name]

    def bit_parameter_names(self):
        return {f"{name}.weight_bits" for name in self.layers}

    def levels(self, name):
        layer = self.layers[name]
        return rounded_levels(layer.params["weight_bits"], layer.dropped_planes,
                              self.encoding)

    def end_epoch(self, epoch, last):
        """Re-binarizes at the chosen epochs and after the last one (the forward is unchanged)."""
        if last or epoch in self.config.rebinarize_epochs:
            self.rebinarize(last)
        if self.activity_images is not None:
            self.measure_activity()  # the next epoch weighs the inputs of the weights it has
