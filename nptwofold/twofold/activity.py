"""The input activity a_i the energy regularizer weighs (docs/energy-regularizer.md): per
mapped weight, the driven count of its row per image on the first `activity_images` training
images, and E_ref.
"""
import numpy as np

from ..cim.calibration import input_maxima
from ..cim.mapping import in_weight_layout
from ..errors import NptwofoldError
from ..kernels.augment import to_float
from ..kernels.cim_events import activation_ones
from ..kernels.conv import im2col_column_sums
from ..kernels.energy import level_energy_table
from ..kernels.quant import STEM_CLIP, max_level, quantize_activations


ACTIVITY_BATCH = 100  # images per forward of the activity measurement


class ActivityMeasurement:
    """The input activity a_i of every mapped weight and the cell energy it prices (part of
    `Twofold`)."""

    def measure_activity(self):
        """Measures a_i of every mapped layer's weights on `activity_images` (module docstring)
        and E_ref; the model's training mode is restored afterwards."""
        if self.activity_images is None or not len(self.activity_images):
            raise NptwofoldError("the energy regularizer needs activity images; none were given")
        images = self.activity_images[:self.config.activity_images]
        first = next(iter(self.layers))
        names = {id(layer): name for name, layer in self.layers.items()}
        driven = dict.fromkeys(self.layers, 0.0)  # 1-bits per matrix row, summed over images

        def count(module, x):
            name = names[id(module)]
            clip = STEM_CLIP if name == first else maxima[name]
            levels = quantize_activations(x, clip, self.hardware.activation_bits)
            ones = activation_ones(levels)
            if x.ndim == 4:  # conv: rows in the im2col order (ky, kx, ci)
                driven[name] = driven[name] + im2col_column_sums(ones, module.stride)
            else:
                driven[name] = driven[name] + ones.sum(axis=0)
            # the layer sees its quantized inputs, so the next layer's are those of the array
            return module.own_forward(levels * x.dtype.type(clip / full_scale))

        full_scale = (1 << self.hardware.activation_bits) - 1
        training = self.model.training
        self.model.eval()
        try:
            # the clips of the model as trained (the CIM's calibration uses the masked levels)
            maxima = input_maxima(self.model, self.layers, images,
                                  lambda module, x: module.own_forward(x), ACTIVITY_BATCH)
            for layer in self.layers.values():
                layer.use_forward_op(count)
            for start in range(0, len(images), ACTIVITY_BATCH):
                self.model.forward(to_float(images[start:start + ACTIVITY_BATCH]))
        finally:
            for layer in self.layers.values():
                layer.use_forward_op(None)
            self.model.train(training)
        activity = {}
        for name, layer in self.layers.items():
            shape = layer.params["weight_bits"].shape[1:]
            per_row = in_weight_layout(driven[name] / len(images), shape)
            activity[name] = np.ascontiguousarray(
                np.broadcast_to(per_row, shape) * self.keep_mask(name))
        if not self._set_activity(activity):
            raise NptwofoldError("no input bit was 1 on the activity images; the energy "
                                 "regularizer has nothing to weigh")

    def restore_activity(self, stored, path):
        """Takes a_i from a checkpoint's /twofold group (read by `load_checkpoint`, shapes
        checked by `load_h5`), so a run resumed inside an epoch weighs the regularizer with the
        a_i that epoch began with, as the uninterrupted run did; re-measuring it from the
        mid-epoch weights would not be the same. Checkpoints written before a_i was stored
        leave it to be measured when next needed."""
        present = [name for name, entry in stored.items() if "activity" in entry]
        if not present:
            return
        if len(present) != len(self.layers):
            missing = sorted(set(self.layers) - set(present))
            raise NptwofoldError(f"{path}: /twofold/{missing[0]}/activity is missing while "
                                 "other layers store theirs")
        for name in self.layers:
            if (stored[name]["activity"] < 0).any():
                raise NptwofoldError(f"{path}: /twofold/{name}/activity has negative values")
        if not self._set_activity({name: stored[name]["activity"].astype(np.float64)
                                   for name in self.layers}):
            raise NptwofoldError(f"{path}: /twofold/<layer>/activity is zero everywhere")

    def _set_activity(self, activity):
        """Sets a_i and the E_ref it gives; False when E_ref is not positive."""
        self.activity = activity
        two_complement_mean = level_energy_table(self.bits, "twos_complement",
                                                 self.hardware.cell_energy_pj).mean()
        self.energy_reference = two_complement_mean * sum(a.sum() for a in activity.values())
        return self.energy_reference > 0

    def cell_energy_pj(self, name):
        """sum_i a_i e(q_i) of a layer: its cell energy per image (None until measured)."""
        if self.activity is None:
            return None
        return float(np.sum(self.activity[name] * self.level_energy(self.levels(name))))

    def level_energy(self, levels):
        """e(q) in pJ of integer levels in the config's bits and encoding (float64)."""
        return self.energy_table[levels.astype(np.int64) + max_level(self.bits)]
