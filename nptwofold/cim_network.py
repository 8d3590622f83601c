"""A whole trained ResNet-20 on the simulated CIM array (SPEC sections 2, 5 and 6).

`CimNetwork` maps every conv and the FC of a model onto crossbars and runs the test set three
ways: float (the model as trained), fake-quant (quantized weights and activations, each
mapped layer's integer matmul done exactly by BLAS in float32 or float64) and CIM (the same
integer matmul bit by bit on the simulated array, through `cim_matmul_packed`). BN, ReLU,
the residual adds and pooling stay digital, in float, between the arrays: the runs reuse the
model's own forward and replace only the mapped layers' forward while they run. The CIM run
accumulates every layer's energy events, and those of a dense baseline, into per-image
reports in pJ.

Quantization of a mapped layer (SPEC 2):
- weights: integer levels q with W = s q / qmax, qmax = 2^(b-1) - 1. A twofold model gives its
  trained levels, scale buffer and LFSR keep-mask; a float model is quantized per layer to b
  bits (`quant.quantize`) and mapped dense. Pruned weights are not stored on the array, so the
  fake-quant weights are s (q K) / qmax, K the keep-mask.
- inputs: unsigned a-bit levels x_int = round(clip(x, 0, clip) / clip * (2^a - 1)), rounded
  half to even like the weights, standing for x_int * clip / (2^a - 1). The stem's input is
  pixel / 255, so its clip is 1 and, for a = 8, x_int is the pixel itself.
- **[assumption]** The clip of every other layer is the running max of its input over the
  calibration images, in the network with quantized (masked) weights and float activations:
  SPEC 2's "calibrated running max". Nothing is clipped on the calibration images. The clips
  are stored in the checkpoint (`store_clips`, group /cim) and taken back by `calibrate_checkpoint`.
- a CIM layer's float output is its integer matmul times (s / qmax) (clip / (2^a - 1)), plus
  the FC bias.

A twofold layer whose mask keeps every row (sparsity 0) is mapped dense: nothing needs
routing, so it costs no LFSR steps **[assumption]**.

Energy (SPEC 5), per image: each layer's cells / ADC / LFSR pJ and activated cell-state
histogram from `hardware.layer_energy_report`, and their sum over layers. **[assumption]** The
dense baseline stores the same masked levels q K on every row (pruned weights as 00 cells), so
it computes exactly the same outputs, has no LFSR, and is counted on the same inputs; for a
float model it is the model itself. The baseline of SPEC 3 (a separately trained dense 8-bit
network) is that network's own report on the same images, passed to `energy_report`.
"""
import dataclasses
import functools

import numpy as np
from tqdm import tqdm

from .errors import NptwofoldError
from .checkpoint import store_group
from .hardware import CELL_STATES, HardwareConfig, layer_energy_report
from .kernels.augment import to_float
from .kernels.cim import (EnergyCounts, N_CELL_STATES, cim_matmul_packed, count_events,
                          layer_matrix, map_layer)
from .kernels.conv import conv3x3_forward, conv_output_size, im2col_3x3, im2col_rows
from .kernels.linear import linear_forward
from .kernels.lfsr import weight_mask
from .kernels.quant import dequantize, max_level, quantize
from .layers import Conv3x3, WeightLayer
from .build import load_model

DEFAULT_WEIGHT_BITS = 8  # b of a float model's layers (SPEC 2 [assumption])
STEM = "conv1"           # the layer fed by the image, pixel / 255 in [0, 1]
STEM_CLIP = 1.0


def quantize_activations(x, clip, activation_bits):
    """Unsigned levels round(clip(x, 0, clip) / clip * (2^a - 1)), as floats of x's dtype."""
    return np.rint(np.clip(x, 0, clip) / clip * ((1 << activation_bits) - 1)).astype(x.dtype)


def input_matrix(module, x_levels):
    """The (P, R) int64 inputs of a mapped layer: rows in the PyTorch flatten (ci, ky, kx) of the
    array and the LFSR masks, positions in NHWC order (for the FC, P = images)."""
    if not isinstance(module, Conv3x3):
        return x_levels.astype(np.int64)
    n_positions, n_rows = im2col_rows(x_levels.shape, module.stride)
    cols = im2col_3x3(x_levels, module.stride, np.empty((n_positions, n_rows), x_levels.dtype))
    # im2col rows run (ky, kx, ci)
    in_channels = x_levels.shape[-1]
    return (cols.reshape(n_positions, 3, 3, in_channels).transpose(0, 3, 1, 2)
            .astype(np.int64, order="C").reshape(n_positions, n_rows))


def _add_counts(total, counts):
    return EnergyCounts(total.cell_state_counts + counts.cell_state_counts,
                        total.adc_conversions + counts.adc_conversions,
                        total.lfsr_steps + counts.lfsr_steps)


def _no_counts():
    return EnergyCounts(np.zeros(N_CELL_STATES, np.int64), 0, 0)


@dataclasses.dataclass
class MappedLayer:
    """One conv or the FC as the array holds it, and its activation clip."""
    name: str
    module: WeightLayer
    levels: np.ndarray  # q, integer weights in the weight's shape (pruned ones not yet zeroed)
    scale: float        # s: W = s q / qmax
    bits: int
    mask: object        # the LfsrKeepMask, or None for a dense layer
    clip: float = None  # activation clip; None until calibrated

    @property
    def kept_levels(self):
        """q K: the levels the array holds, zero where the mask prunes."""
        if self.mask is None:
            return self.levels
        return self.levels * weight_mask(self.mask.mask, self.levels.shape)

    @property
    def prunes(self):
        """False for a dense layer and for a mask that keeps every row (sparsity 0): the array
        then needs no routing, so the layer is mapped dense, without LFSR steps."""
        return self.mask is not None and self.mask.kept_rows.shape[1] < self.mask.mask.shape[0]

    def crossbar(self, rows_per_tile):
        if not self.prunes:
            return map_layer(layer_matrix(self.levels), self.bits, rows_per_tile)
        return map_layer(layer_matrix(self.levels), self.bits, rows_per_tile,
                         self.mask.kept_rows, self.mask.group, self.mask.steps)

    def output_scale(self, activation_bits):
        """Float value of one unit of the integer matmul: (s / qmax) (clip / (2^a - 1))."""
        return self.scale / max_level(self.bits) * self.clip / ((1 << activation_bits) - 1)


def mapped_layers(model, method=None, weight_bits=None):
    """{name: MappedLayer} of every conv and the FC, in forward order.

    With a Twofold `method`, its levels, scale buffers and keep-masks; else each float weight
    quantized to `weight_bits` (default 8) and mapped dense.
    """
    layers = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, WeightLayer):
            continue
        name = prefix.rstrip(".")
        if method is not None:
            if weight_bits not in (None, method.config.bits):
                raise NptwofoldError(f"the model is a twofold model with {method.config.bits}-bit "
                                     f"weights; it cannot be mapped with {weight_bits} bits")
            layer = MappedLayer(name, module, method.levels(name),
                                float(module.buffers["weight_scale"][0]), method.config.bits,
                                method.masks[name])
        else:
            bits = DEFAULT_WEIGHT_BITS if weight_bits is None else weight_bits
            levels, scale = quantize(module.params["weight"], bits)
            layer = MappedLayer(name, module, levels, scale, bits, None)
        layers[name] = layer
    layers[STEM].clip = STEM_CLIP
    return layers


class CimNetwork:
    """A model mapped onto the array: float, fake-quant and CIM forwards, and energy reports.

    `calibrate` must run before the quantized forwards. `cim_logits` adds each batch's energy
    events to the totals that `energy_report` turns into per-image pJ.
    """

    def __init__(self, model, method=None, hardware=None, weight_bits=None):
        self.model = model.eval()
        self.hardware = hardware if hardware is not None else HardwareConfig()
        self.layers = mapped_layers(model, method, weight_bits)
        rows_per_tile = self.hardware.crossbar_rows
        self.crossbars, self.dense_crossbars, self.quantized_weights = {}, {}, {}
        self.integer_weights = {}
        for name, layer in self.layers.items():
            self.hardware.cells_per_weight(layer.bits)  # the weight must fit a crossbar row
            self.crossbars[name] = layer.crossbar(rows_per_tile)
            self.dense_crossbars[name] = (
                self.crossbars[name] if not layer.prunes else
                map_layer(layer_matrix(layer.kept_levels), layer.bits, rows_per_tile))
            self.quantized_weights[name] = dequantize(layer.kept_levels, layer.scale, layer.bits)
            # float32 holds every partial sum of x_int @ (q K) exactly when no column's sum
            # of |x_int q| can reach 2^24; otherwise the fake-quant matmul runs in float64
            largest_sum = (((1 << self.activation_bits) - 1)
                           * np.abs(layer_matrix(layer.kept_levels)).sum(axis=0).max())
            exact_dtype = np.float32 if largest_sum < 2 ** 24 else np.float64
            self.integer_weights[name] = layer.kept_levels.astype(exact_dtype)
        self.reset_energy()

    @classmethod
    def from_checkpoint(cls, path, hardware=None, weight_bits=None):
        """(CimNetwork, checkpoint content) of a float or twofold checkpoint."""
        model, method, content = load_model(path)
        return cls(model, method, hardware, weight_bits), content

    def calibrate_checkpoint(self, path, content, images, batch_size=100, recalibrate=False):
        """Clips of the network loaded from checkpoint `path`: the ones stored in it if they
        were calibrated on as many images for the same activation and weight bits, else
        `calibrate` on `images`, then stored in the checkpoint. Returns whether it calibrated."""
        if not recalibrate and self._restore_clips(content, len(images)):
            return False
        self.calibrate(images, batch_size)
        self.store_clips(path, len(images))
        return True

    def _restore_clips(self, content, calibration_images):
        stored = content.get("cim")
        if not stored or stored["layers"].keys() != self.layers.keys() or (
                stored["activation_bits"], stored["weight_bits"], stored["calibration_images"]
        ) != (*self._clip_key(), calibration_images):
            return False
        for name, layer in self.layers.items():
            layer.clip = float(stored["layers"][name]["attrs"]["activation_clip"])
        return True

    def _clip_key(self):
        return self.activation_bits, self.layers[STEM].bits

    @property
    def calibrated(self):
        return all(layer.clip is not None for layer in self.layers.values())

    def store_clips(self, path, calibration_images):
        """Saves the activation clips in checkpoint `path` (group /cim), atomically."""
        self._check_calibrated()

        def fill(group):
            activation_bits, weight_bits = self._clip_key()
            group.attrs.update(activation_bits=activation_bits, weight_bits=weight_bits,
                               calibration_images=calibration_images)
            for name, layer in self.layers.items():
                group.create_group(name).attrs["activation_clip"] = layer.clip

        store_group(path, "cim", fill)

    @property
    def activation_bits(self):
        return self.hardware.activation_bits

    def reset_energy(self):
        self.n_images = 0
        self.energy = {name: _no_counts() for name in self.layers}
        self.baseline_energy = {name: _no_counts() for name in self.layers}

    # --- forwards ---------------------------------------------------------------------------

    @staticmethod
    def _network_input(images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise NptwofoldError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                                 f"{images.shape}")
        return to_float(images)

    def _forward_with(self, images, layer_forward):
        """Logits of the model on uint8 images, each mapped layer's forward replaced by
        layer_forward(layer, x): BN, ReLU, shortcuts and pooling are the model's own."""
        x = self._network_input(images)
        for layer in self.layers.values():
            # an instance attribute shadows the class's method, so the model calls this one
            layer.module.forward = functools.partial(layer_forward, layer)
        try:
            return self.model.forward(x)
        finally:
            for layer in self.layers.values():
                del layer.module.forward

    def _float_layer(self, layer, x, weight):
        """The engine's own conv or FC of float inputs x with `weight`."""
        module = layer.module
        if isinstance(module, Conv3x3):
            return conv3x3_forward(x, weight, module.stride,
                                   np.empty(im2col_rows(x.shape, module.stride), x.dtype))
        return linear_forward(x, weight, module.params["bias"])

    def _check_calibrated(self):
        if not self.calibrated:
            missing = [name for name, layer in self.layers.items() if layer.clip is None]
            raise NptwofoldError(f"activation clips of {missing[0]} and {len(missing) - 1} more "
                                 "layers are not calibrated; call calibrate first")

    def float_logits(self, images):
        """The model as trained: its own weights (unmasked), float activations."""
        return self.model.forward(self._network_input(images))

    def calibrate(self, images, batch_size=100):
        """Sets each layer's clip (the stem's stays 1) to the max of its inputs on `images`."""
        if len(images) == 0:
            raise NptwofoldError("calibration needs at least one image")
        maxima = dict.fromkeys(self.layers, 0.0)

        def observe(layer, x):
            maxima[layer.name] = max(maxima[layer.name], float(x.max()))
            return self._float_layer(layer, x, self.quantized_weights[layer.name])

        for start in range(0, len(images), batch_size):
            self._forward_with(images[start:start + batch_size], observe)
        for name, layer in self.layers.items():
            if name == STEM:
                continue
            if not maxima[name] > 0:
                raise NptwofoldError(f"the inputs of {name} were all 0 on the {len(images)} "
                                     "calibration images; calibrate with more images")
            layer.clip = maxima[name]
        return {name: layer.clip for name, layer in self.layers.items()}

    def fake_quant_logits(self, images, count_energy=False):
        """Forward with weights s (q K) / qmax and inputs x_int clip / (2^a - 1).

        Each mapped layer multiplies the integers x_int and q K in a float dtype that holds their
        sums exactly, and scales the result in float64 as `cim_logits` does: so the ideal-ADC
        CIM run must give these logits bit for bit, and a difference can only be the array's.

        With `count_energy`, each mapped layer's energy events are also counted from its
        integer inputs (SPEC 5's energy by counting, `count_events`) and added to the totals:
        the fast path to a network's energy, equal to what `cim_logits` accumulates.
        """
        self._check_calibrated()
        bits = self.activation_bits

        def fake_quant(layer, x):
            x_levels = quantize_activations(x, layer.clip, bits)
            if count_energy:
                self._add_energy(layer, input_matrix(layer.module, x_levels))
            return self._layer_output(layer, self._exact_matmul(layer, x_levels), x)

        logits = self._forward_with(images, fake_quant)
        if count_energy:
            self.n_images += len(images)
        return logits

    def count_energy(self, images, batch_size=100, progress=None):
        """Predicted classes of `images` by the fake-quant forward (the ideal-ADC CIM result),
        counting the energy events on the way; `progress`, if given, labels a progress bar."""
        predictions = []
        for start in tqdm(range(0, len(images), batch_size), desc=progress, leave=False,
                          disable=progress is None):
            batch = images[start:start + batch_size]
            predictions.append(self.fake_quant_logits(batch, count_energy=True).argmax(axis=1))
        return np.concatenate(predictions)

    def cim_logits(self, images, trace=None):
        """Logits with every mapped layer's matmul on the array (integers, bit-serial).

        Adds the batch's energy events to the totals. `trace`, if a dict, receives per layer
        (integer inputs (P, R), integer outputs (P, C)) of this batch.
        """
        self._check_calibrated()
        hardware, bits = self.hardware, self.activation_bits

        def on_array(layer, x):
            inputs = input_matrix(layer.module, quantize_activations(x, layer.clip, bits))
            y, counts = cim_matmul_packed(self.crossbars[layer.name], inputs, bits,
                                          hardware.adc_bits, hardware.skip_zero_tiles)
            self._add_energy(layer, inputs, counts)
            if trace is not None:
                trace[layer.name] = (inputs, y)
            return self._layer_output(layer, y, x)

        logits = self._forward_with(images, on_array)
        self.n_images += len(images)
        return logits

    def _exact_matmul(self, layer, x_levels):
        """x_int @ (q K) of a layer in a float dtype that holds every partial sum exactly
        (an integer below 2^24 in float32, else float64), whatever the summation order."""
        weight = self.integer_weights[layer.name]
        x_levels = x_levels.astype(weight.dtype)
        if isinstance(layer.module, Conv3x3):
            stride = layer.module.stride
            return conv3x3_forward(x_levels, weight, stride,
                                   np.empty(im2col_rows(x_levels.shape, stride), weight.dtype))
        return x_levels @ weight.T

    def _layer_output(self, layer, y, x):
        """A mapped layer's float output (x's dtype and layout) from its integer matmul y."""
        # scaled in float64 whatever y's type, so the CIM and fake-quant runs round alike
        out = np.multiply(y, layer.output_scale(self.activation_bits),
                          dtype=np.float64).astype(x.dtype)
        if isinstance(layer.module, Conv3x3):
            n_images, height, width, _ = x.shape
            stride = layer.module.stride
            return out.reshape(n_images, conv_output_size(height, stride),
                               conv_output_size(width, stride), -1)
        return out + layer.module.params["bias"]

    def _add_energy(self, layer, inputs, counts=None):
        """Adds a layer's events on integer `inputs` (counted unless the run gives them) and
        those of its dense baseline to the totals."""
        name, skip = layer.name, self.hardware.skip_zero_tiles
        crossbar, dense = self.crossbars[name], self.dense_crossbars[name]
        if counts is None:
            counts = count_events(crossbar, inputs, self.activation_bits, skip)
        self.energy[name] = _add_counts(self.energy[name], counts)
        if dense is not crossbar:
            counts = count_events(dense, inputs, self.activation_bits, skip)
        self.baseline_energy[name] = _add_counts(self.baseline_energy[name], counts)

    # --- reports ----------------------------------------------------------------------------

    def layer_summary(self):
        """Per layer: rows, kept rows per column, row tiles, network sparsity, share of zero
        bits and the stored cell-state histogram (what the array holds, not what it reads)."""
        rows = []
        for name, crossbar in self.crossbars.items():
            cells = crossbar.cells
            stored = np.bincount(cells.ravel(), minlength=N_CELL_STATES)
            ones = sum(bin(state).count("1") * int(n) for state, n in enumerate(stored))
            kept = crossbar.kept_rows.shape[1]
            rows.append(dict(layer=name, rows=crossbar.n_rows, kept=kept,
                             tiles=crossbar.n_tiles, network_sparsity=1 - kept / crossbar.n_rows,
                             zero_bit_share=1 - ones / (cells.size * 2),
                             clip=self.layers[name].clip,
                             **{f"stored_{s}": int(n) / cells.size
                                for s, n in zip(CELL_STATES, stored)}))
        return rows

    def energy_report(self, baseline=None):
        """Per-image energy of the runs so far: {"n_images", "layers": [...], "total"}.

        Each entry has cells/ADC/LFSR/total pJ per image, the activated cell-state shares, ADC
        conversions and LFSR steps per image, the baseline's pJ and the ratio baseline / this
        (how many times less energy than the baseline). The baseline is the built-in dense
        mapping of the same weights, or `baseline`: the energy_report of another network (a
        separately trained dense 8-bit model) on the same images, matched layer by layer.
        """
        if not self.n_images:
            raise NptwofoldError("no energy counted yet: call cim_logits or "
                                 "fake_quant_logits(count_energy=True) first")
        if baseline is None:
            baseline_rows = {name: self._pj_per_image(counts)
                             for name, counts in self.baseline_energy.items()}
            baseline_rows["total"] = self._pj_per_image(
                functools.reduce(_add_counts, self.baseline_energy.values(), _no_counts()))
        else:
            baseline_rows = {row["layer"]: row for row in baseline["layers"] + [baseline["total"]]}
            if set(baseline_rows) != set(self.layers) | {"total"}:
                raise NptwofoldError("the baseline network maps other layers than this one")
        rows = [self._energy_row(name, self.energy[name], baseline_rows[name])
                for name in self.layers]
        total = functools.reduce(_add_counts, self.energy.values(), _no_counts())
        return dict(n_images=self.n_images, layers=rows,
                    total=self._energy_row("total", total, baseline_rows["total"]))

    def _pj_per_image(self, counts):
        report = layer_energy_report(counts, self.hardware)
        per_image = {key: report[key] / self.n_images
                     for key in ("cells_pj", "adc_pj", "lfsr_pj", "total_pj", "adc_conversions",
                                 "lfsr_steps")}
        return dict(per_image, cell_state_share=report["cell_state_share"])

    def _energy_row(self, name, counts, baseline):
        row = self._pj_per_image(counts)
        shares = row.pop("cell_state_share")
        return dict(layer=name, **row, **{f"cells_{s}": share for s, share in shares.items()},
                    baseline_cells_pj=baseline["cells_pj"], baseline_adc_pj=baseline["adc_pj"],
                    baseline_total_pj=baseline["total_pj"],
                    baseline_ratio=baseline["total_pj"] / row["total_pj"])
