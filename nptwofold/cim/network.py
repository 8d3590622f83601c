"""A whole trained ResNet-20 on the simulated CIM array (docs/cim-model.md).

`CimNetwork` maps every conv and the FC of a model onto crossbars (`cim.mapping.map_layer`,
with the encoding, crossbar size and ADC of its `HardwareConfig`) and runs images three ways:
float (the model as trained), fake-quant (quantized weights and activations, each mapped layer's
integer matmul done exactly by BLAS in float32 or float64) and CIM (the same matmul on the
simulated array). BN, ReLU, the residual adds and pooling stay digital, in float, between the
arrays.

The hook: every mapped layer is a `WeightLayer`, whose `forward(x)` goes through the op set by
its own `use_forward_op` method. A run sets one op on every mapped layer for its duration
(`routed`) and clears it afterwards; the op finds the layer's `MappedLayer` by identity. So
the path from `HardwareConfig.adc_bits` to the kernel is: `CimNetwork.cim_logits` ->
`routed(op)` -> `MappedLayer.array_output` -> `PackedCrossbar.matmul(adc=
HardwareConfig.adc_for(crossbar, full scales))`; a conv whose ADC reads every partial sum
exactly takes the fake-quant path instead, which gives the same output and events bit for bit.

Quantization of a mapped layer:
- weights: integer levels q with W = s q / qmax, qmax = 2^(b-1) - 1. A twofold model gives its
  trained levels, scale buffer and LFSR keep-mask; a float model is quantized per layer to b
  bits (`quant.quantize`) and mapped dense, or pruned with fresh LFSR masks (`prune`). Pruned
  weights are stored as the level 0 where their column tile stores the row, so the fake-quant
  weights are s (q K) / qmax, K the keep-mask.
- inputs: unsigned a-bit levels x_int = round(clip(x, 0, clip) / clip * (2^a - 1)), rounded
  half to even like the weights. The stem's input is pixel / 255, so its clip is 1 and, for
  a = 8, x_int is the pixel itself.
- **[assumption]** The clip of every other layer is the running max of its input over the
  calibration images, in the network with quantized (masked) weights and float activations.
  A layer whose inputs were all 0 there (a block that training switched off) gets the clip 0:
  the array reads nothing for it, and its output is 0 whatever it is given.
- a layer's float output is its integer matmul times (s / qmax) (clip / (2^a - 1)), plus the FC
  bias.

ADC calibration: with `adc_range = "calibrated"`, each layer's partial sums on the
calibration images (fake-quant forward, every physical crossbar converted separately) are
counted per ADC channel; the full scale of a channel is their `adc_percentile`-th percentile.
The histograms are cached with the clips in the checkpoint's calibration file
(`cim.calibration`, one dataset per encoding and crossbar size), so any percentile and ADC
width can be taken from them later.

LFSR steps on the physical mapping **[assumption]**: a column tile routes the rows of every mask
group it holds, so it walks those groups' stretches of the layer's LFSR sequence, once per output
position; a group split over two tiles is walked by both. A dense layer, or a mask keeping every
row, routes nothing.

Energy, per image, per layer and in total: cells / ADC / LFSR pJ and activated
cell-state histogram (`hardware.layer_energy_report`). **[assumption]** The dense baseline stores
the same levels q K on every row of every tile, in the same encoding, and is counted on the same
inputs; the poster's baseline (a separately trained dense 8-bit network) is that network's own
report, passed to `energy_report`.
"""
import contextlib
import dataclasses
import functools

import numpy as np
from tqdm import tqdm

from ..build import checkpoint_hardware, load_model
from ..errors import NptwofoldError
from ..hardware import HardwareConfig
from ..kernels.augment import to_float
from ..kernels.cim_bitserial import combine
from ..kernels.cim_events import (EnergyCounts, activation_ones, count_events,
                                  count_events_of_row_ones)
from ..kernels.cim_packed import PackedCrossbar
from ..kernels.conv import (conv3x3_forward, conv_output_size, im2col_batch, im2col_column_sums,
                           rows_matmul)
from ..kernels.lfsr import lfsr_keep_mask, weight_mask
from ..kernels.quant import (STEM_CLIP, decompose, dequantize, max_level, quantize,
                            quantize_activations)
from ..layers import WeightLayer
from ..steps import predict
from .adc import full_scale_at_percentile
from .calibration import histogram_key, input_maxima
from .device import CELL_STATES, N_CELL_STATES
from .ledger import EnergyLedger, layer_energy_report
from .mapping import layer_matrix, lfsr_steps_per_position, map_layer, matrix_rows
from .variation import Chip, is_ideal_device

STEM = "conv1"           # the layer fed by the image, pixel / 255 in [0, 1]



@dataclasses.dataclass
class MappedLayer:
    """One conv or the FC: its levels, mask, activation clip, crossbars and ADC ranges."""
    name: str
    module: WeightLayer
    levels: np.ndarray  # q, integer weights in the weight's shape (pruned ones not yet zeroed)
    scale: float        # s: W = s q / qmax
    bits: int
    mask: object        # the LfsrKeepMask, or None for a dense layer
    clip: float = None  # activation clip; None until calibrated
    adc_histogram: np.ndarray = None  # (ADC channels, 3T + 1) partial sums on calibration images

    @property
    def kept_levels(self):
        """q K: the levels the array holds, zero where the mask prunes."""
        if self.mask is None:
            return self.levels
        return self.levels * weight_mask(self.mask.mask, self.levels.shape)

    @property
    def prunes(self):
        """False for a dense layer and for a mask that keeps every row (sparsity 0)."""
        return self.mask is not None and self.mask.kept < self.mask.mask.shape[0]

    @property
    def is_conv(self):
        return self.levels.ndim == 4

    def map(self, hardware):
        """Sets the crossbar, its dense baseline (every row stored) and the exact matmul
        weights of this layer for `hardware`."""
        matrix = layer_matrix(self.kept_levels)
        arguments = (self.bits, hardware.crossbar_rows, hardware.crossbar_cols,
                     hardware.weight_encoding)
        self.dense_crossbar = map_layer(matrix, *arguments)
        self.crossbar = self.dense_crossbar
        if self.prunes:
            keep = np.zeros(matrix.shape, bool)
            pytorch_rows = self.mask.kept_rows[np.arange(matrix.shape[1]) // self.mask.group]
            keep[matrix_rows(pytorch_rows, self.levels.shape).T, np.arange(matrix.shape[1])] = True
            self.crossbar = map_layer(matrix, *arguments, keep, lfsr_steps_per_position(
                self.mask, self.crossbar.outputs_per_tile))
        self.packed = PackedCrossbar(self.crossbar)
        # float32 holds every partial sum of x_int @ (q K) exactly when no column's sum of
        # |x_int q| can reach 2^24; otherwise the fake-quant matmul runs in float64
        largest_sum = ((1 << hardware.activation_bits) - 1) * np.abs(matrix).sum(axis=0).max()
        self.exact_matrix = matrix.astype(np.float32 if largest_sum < 2 ** 24 else np.float64)
        self.exact_levels = self.kept_levels.astype(self.exact_matrix.dtype)  # the same, OIHW
        self.quantized_weight = dequantize(self.kept_levels, self.scale, self.bits)

    def activation_levels(self, x, activation_bits):
        """The integer inputs (as floats of the exact matmul's dtype) in x's layout."""
        return quantize_activations(x, self.clip, activation_bits).astype(self.exact_matrix.dtype)

    def input_levels(self, x, activation_bits):
        """(P, R) integer inputs (as floats) of the array: im2col patches of a conv (rows in the
        matrix order, positions NHWC) or the FC's inputs."""
        levels = self.activation_levels(x, activation_bits)
        if not self.is_conv:
            return levels
        return im2col_batch(levels, self.module.stride)

    def float_output(self, y, x, activation_bits):
        """The layer's float output (x's dtype and layout) from its integer matmul y (P, C)."""
        scale = self.scale / max_level(self.bits) * self.clip / ((1 << activation_bits) - 1)
        # scaled in float64 whatever y's type, so the CIM and fake-quant runs round alike
        out = np.multiply(y, scale, dtype=np.float64).astype(x.dtype)
        if not self.is_conv:
            return out + self.module.params["bias"]
        n_images, height, width, _ = x.shape
        stride = self.module.stride
        return out.reshape(n_images, conv_output_size(height, stride),
                           conv_output_size(width, stride), -1)

    def full_scale(self, percentile):
        if self.adc_histogram is None:
            return None
        return full_scale_at_percentile(self.adc_histogram, percentile)



def mapped_layers(model, method, weight_bits):
    """{name: MappedLayer} of every conv and the FC, in forward order.

    With a Twofold `method`, its levels, scale buffers and keep-masks (its bits must be
    `weight_bits`); else each float weight quantized to `weight_bits` and mapped dense.
    """
    layers = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, WeightLayer):
            continue
        name = prefix.rstrip(".")
        if method is not None:
            if weight_bits != method.bits:
                raise NptwofoldError(f"the model is a twofold model with {method.bits}-bit "
                                     f"weights; it cannot be mapped with {weight_bits} bits")
            layer = MappedLayer(name, module, method.levels(name),
                                float(module.buffers["weight_scale"][0]), method.bits,
                                method.masks[name])
        else:
            levels, scale = quantize(module.params["weight"], weight_bits)
            layer = MappedLayer(name, module, levels, scale, weight_bits, None)
        layers[name] = layer
    layers[STEM].clip = STEM_CLIP
    return layers


class CimNetwork:
    """A model mapped onto the array: float, fake-quant and CIM forwards, and energy reports.

    `calibrate` (or `calibrate_checkpoint`) must run before the quantized forwards. The CIM
    and counting runs add their energy events to `ledger`, which `energy_report` turns into
    per-image pJ.
    """

    def __init__(self, model, method=None, hardware=None, layers=None):
        self.model = model.eval()
        self.method = method
        if hardware is None:  # a twofold model's own array, else the default one
            hardware = method.hardware if method is not None else HardwareConfig()
        self.hardware = hardware
        self.layers = layers if layers is not None else mapped_layers(model, method,
                                                                      hardware.weight_bits)
        self._by_module = {id(layer.module): layer for layer in self.layers.values()}
        for layer in self.layers.values():
            layer.map(self.hardware)
        self.chip = None
        self.reset_energy()

    @classmethod
    def from_checkpoint(cls, path, hardware=None):
        """(CimNetwork, checkpoint content) of a float or twofold checkpoint, on `hardware`
        (default: the array the checkpoint stores, `checkpoint_hardware`)."""
        model, method, content = load_model(path)
        if hardware is None:
            hardware = checkpoint_hardware(content)
        return cls(model, method, hardware), content

    def with_hardware(self, hardware):
        """This network (same model, clips and stored ADC histograms) on other hardware."""
        layers = {name: dataclasses.replace(layer) for name, layer in self.layers.items()}
        other = CimNetwork(self.model, self.method, hardware, layers=layers)
        other.adc_histograms = {key: dict(value) for key, value in self.adc_histograms.items()}
        other.select_adc_histograms()
        return other

    def prune(self, sparsity, group, seed=1):
        """Cuts every layer with fresh LFSR keep-masks (sparsity p, `group` columns per mask),
        weights unchanged: to study a mapping's energy on a float model's activations."""
        for index, layer in enumerate(self.layers.values()):
            out_channels = layer.levels.shape[0]
            rows = layer.levels.size // out_channels
            layer.mask = lfsr_keep_mask(rows, out_channels, sparsity, seed + index, group)
            layer.map(self.hardware)
        self.chip = None
        self.reset_energy()

    def draw_chip(self, seed):
        """The CIM runs from now on are on one chip of the hardware's device model, drawn from
        `seed` (an int or a tuple of ints, `cim.variation.Chip`); with the ideal device every
        chip is the nominal array, and the runs stay on the exact integer path."""
        self.chip = None if is_ideal_device(self.hardware) else Chip(
            {name: layer.crossbar for name, layer in self.layers.items()}, self.hardware, seed)

    def layer_of(self, module):
        """The MappedLayer of a mapped WeightLayer (found by identity)."""
        return self._by_module[id(module)]

    @property
    def activation_bits(self):
        return self.hardware.activation_bits

    def reset_energy(self):
        self.ledger = EnergyLedger(self.layers)

    # --- calibration ---------------------------------------------------------------------

    adc_histograms = {}  # {histogram key: {layer: histogram}}, set by calibration or a checkpoint

    def select_adc_histograms(self):
        found = self.adc_histograms.get(histogram_key(self.hardware), {})
        for name, layer in self.layers.items():
            layer.adc_histogram = found.get(name)

    @property
    def calibrated(self):
        return all(layer.clip is not None for layer in self.layers.values())

    @property
    def adc_calibrated(self):
        return all(layer.adc_histogram is not None for layer in self.layers.values())

    def _check_calibrated(self):
        if not self.calibrated:
            missing = [name for name, layer in self.layers.items() if layer.clip is None]
            raise NptwofoldError(f"activation clips of {missing[0]} and {len(missing) - 1} more "
                                 "layers are not calibrated; call calibrate first")
        if self.hardware.needs_adc_ranges and not self.adc_calibrated:
            raise NptwofoldError("the ADC ranges of this encoding and crossbar size are not "
                                 "calibrated; call calibrate first")

    def calibrate(self, images, batch_size=100):
        """Sets each layer's clip (the stem's stays 1) to the max of its inputs on `images`,
        then counts the partial sums the ADC ranges are taken from. Returns the clips."""
        if len(images) == 0:
            raise NptwofoldError("calibration needs at least one image")
        self._network_input(images[:1])  # checks the images' type and shape
        maxima = input_maxima(self.model, {name: layer.module for name, layer in
                                           self.layers.items()}, images,
                              lambda module, x: self.dequantized_layer(self.layer_of(module), x),
                              batch_size)
        for name, layer in self.layers.items():
            if name == STEM:
                continue
            layer.clip = maxima[name]
        self.adc_histograms = {}
        self.calibrate_adc(images, batch_size)
        return {name: layer.clip for name, layer in self.layers.items()}

    def calibrate_adc(self, images, batch_size=100):
        """Counts each layer's partial sums per ADC channel on `images` (fake-quant forward)
        for this network's encoding and crossbar size."""
        histograms = {name: 0 for name in self.layers}
        bits = self.activation_bits

        def count(module, x):
            layer = self._by_module[id(module)]
            inputs = layer.input_levels(x, bits)
            histograms[layer.name] = histograms[layer.name] + layer.packed.partial_sum_histograms(
                inputs, bits, validate=False)
            return layer.float_output(rows_matmul(inputs, layer.exact_matrix), x, bits)

        with self.routed(count):
            for start in range(0, len(images), batch_size):
                self.model.forward(self._network_input(images[start:start + batch_size]))
        self.adc_histograms = {**self.adc_histograms, histogram_key(self.hardware): histograms}
        self.select_adc_histograms()

    def set_calibration(self, clips, histograms):
        """Takes clips ({layer: clip}) and ADC histograms ({histogram key: {layer: counts}})
        read back from a calibration (`cim.calibration`)."""
        for name, layer in self.layers.items():
            if name != STEM:
                layer.clip = clips[name]
        self.adc_histograms = {key: dict(value) for key, value in histograms.items()}
        self.select_adc_histograms()

    # --- forwards ---------------------------------------------------------------------------

    @staticmethod
    def _network_input(images):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise NptwofoldError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                                 f"{images.shape}")
        return to_float(images)

    @contextlib.contextmanager
    def routed(self, op):
        """Every mapped layer's forward goes through op(module, x) inside the block."""
        for layer in self.layers.values():
            layer.module.use_forward_op(op)
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.module.use_forward_op(None)

    def _run(self, images, op):
        self._check_calibrated()
        with self.routed(op):
            return self.model.forward(self._network_input(images))

    @staticmethod
    def dequantized_layer(layer, x):
        """The float layer of float x with the quantized (masked) weights s (q K) / qmax."""
        weight = layer.quantized_weight.astype(x.dtype)
        if layer.is_conv:
            stride = layer.module.stride
            cols = im2col_batch(x, stride)
            n_images, height, width, _ = x.shape
            return (cols @ layer_matrix(weight)).reshape(
                n_images, conv_output_size(height, stride), conv_output_size(width, stride), -1)
        return x @ weight.T + layer.module.params["bias"]

    def float_logits(self, images):
        """The model as trained: its own weights (unmasked), float activations."""
        self._network_input(images[:1])  # checks the images' type and shape
        return predict(self.model, images)

    def fake_quant_logits(self, images, count_energy=False):
        """Forward with weights s (q K) / qmax and inputs x_int clip / (2^a - 1).

        Each mapped layer multiplies the integers x_int and q K in a float dtype that holds their
        sums exactly and scales the result in float64 as `cim_logits` does: so the ideal-ADC CIM
        run gives these logits bit for bit, and a difference can only be the array's.
        With `count_energy`, each layer's energy events are counted from its integer inputs
        (the counting path) and added to the ledger: equal to what `cim_logits` adds.
        """
        bits = self.activation_bits

        def fake_quant(module, x):
            layer = self._by_module[id(module)]
            if layer.is_conv and not (count_energy and self.hardware.skip_zero_tiles):
                return self._integer_conv_output(layer, x, count_energy)
            inputs = layer.input_levels(x, bits)
            if count_energy:
                self._count(layer, inputs)
            return layer.float_output(rows_matmul(inputs, layer.exact_matrix), x, bits)

        logits = self._run(images, fake_quant)
        if count_energy:
            self.ledger.n_images += len(images)
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

    def _integer_conv_output(self, layer, x, count):
        """A conv layer's float output from the engine's convolution of its integer input levels
        with its integer weights (exact in any order, in cache), its events counted from each
        row's summed 1-bits if `count` (no tile skipping: that needs every patch)."""
        bits, stride = self.activation_bits, layer.module.stride
        levels = layer.activation_levels(x, bits)
        y = conv3x3_forward(levels, layer.exact_levels, stride)
        if count:
            self._count_row_ones(layer, im2col_column_sums(activation_ones(levels), stride),
                                 y.size // y.shape[-1])
        return layer.float_output(y.reshape(-1, y.shape[-1]), x, bits)

    def array_output(self, layer, x, count=True, trace=None):
        """A mapped layer's float output with its matmul on the array; adds its events to the
        ledger if `count`, and (integer inputs, integer outputs) to `trace` if a dict.

        Where the layer's ADC reads every partial sum exactly (`AdcSteps.is_ideal`), the
        array's output is x @ q exactly (`kernels.cim_packed`), so a conv without a trace or tile
        skipping takes the fake-quant path, which gives the same output and events bit for
        bit without building the batch's patches."""
        bits, hardware = self.activation_bits, self.hardware
        adc = hardware.adc_for(layer.crossbar, layer.full_scale(hardware.adc_percentile))
        if self.chip is not None:
            inputs = layer.input_levels(x, bits)
            y = combine(layer.crossbar, self.chip.layers[layer.name].codes(
                inputs, bits, adc, self.chip.images_read, len(x)), adc)
            counts = None
        elif (layer.is_conv and trace is None and not hardware.skip_zero_tiles
                and adc.is_ideal(layer.crossbar, layer.packed.largest_sums)):
            return self._integer_conv_output(layer, x, count)
        else:
            inputs = layer.input_levels(x, bits)
            y, counts = layer.packed.matmul(inputs, bits, adc, hardware.skip_zero_tiles,
                                            validate=False, count=count)
        if count:
            self._count(layer, inputs, counts)
        if trace is not None:
            trace[layer.name] = (inputs.astype(np.int64), y)
        return layer.float_output(y, x, bits)

    def cim_logits(self, images, trace=None):
        """Logits with every mapped layer's matmul on the array (bit-serial, through the ADC).

        On a chip (`draw_chip`), the array is that chip's. Adds the batch's energy events to
        the ledger. `trace`, if a dict, receives per layer (integer inputs (P, R), outputs
        (P, C)) of this batch.
        """
        logits = self._run(images, lambda module, x: self.array_output(
            self._by_module[id(module)], x, trace=trace))
        self.ledger.n_images += len(images)
        if self.chip is not None:
            self.chip.images_read += len(images)
        return logits

    def _count(self, layer, inputs, counts=None):
        """Adds a layer's events on `inputs` (counted unless given) and its dense baseline's."""
        bits, skip = self.activation_bits, self.hardware.skip_zero_tiles
        if counts is None:
            counts = count_events(layer.crossbar, inputs, bits, skip, validate=False)
        baseline = counts if layer.dense_crossbar is layer.crossbar else count_events(
            layer.dense_crossbar, inputs, bits, skip, validate=False)
        self.ledger.add(layer.name, counts, baseline)

    def _count_row_ones(self, layer, row_ones, n_positions):
        """`_count` from the inputs' 1-bits per matrix row (no tile skipping)."""
        bits = self.activation_bits
        counts, baseline = (count_events_of_row_ones(crossbar, row_ones, n_positions, bits)
                            for crossbar in (layer.crossbar, layer.dense_crossbar))
        self.ledger.add(layer.name, counts, baseline)

    # --- reports ----------------------------------------------------------------------------

    def layer_summary(self):
        """Per layer: rows, kept rows per column, column tiles, stored rows per tile (mean and
        max), network sparsity, share of zero bits of the kept weights, the stored cell-state
        histogram (what the array holds, sign / reference / idle columns included), clip."""
        rows = []
        for name, layer in self.layers.items():
            crossbar = layer.crossbar
            kept = layer.mask.kept if layer.prunes else crossbar.n_rows
            exists = crossbar.stored[crossbar.column_tile]
            stored = np.bincount(crossbar.cells[exists], minlength=N_CELL_STATES)
            per_tile = crossbar.kept_rows_per_tile
            rows.append(dict(
                layer=name, rows=crossbar.n_rows, kept=kept, column_tiles=crossbar.n_column_tiles,
                rows_per_tile_mean=float(per_tile.mean()), rows_per_tile_max=int(per_tile.max()),
                crossbars=int(crossbar.n_row_tiles.sum()),
                network_sparsity=1 - kept / crossbar.n_rows,
                zero_bit_share=1 - float(decompose(layer.kept_levels, layer.bits,
                                                        self.hardware.weight_encoding).mean()),
                clip=layer.clip,
                **{f"stored_{s}": int(n) / max(int(exists.sum()), 1)
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
        ledger = self.ledger
        if not ledger.n_images:
            raise NptwofoldError("no energy counted yet: call cim_logits or "
                                 "fake_quant_logits(count_energy=True) first")
        if baseline is None:
            baseline_rows = {name: self._pj_per_image(counts)
                             for name, counts in ledger.baseline.items()}
            baseline_rows["total"] = self._pj_per_image(
                functools.reduce(EnergyCounts.__add__, ledger.baseline.values()))
        else:
            baseline_rows = {row["layer"]: row for row in baseline["layers"] + [baseline["total"]]}
            if set(baseline_rows) != set(self.layers) | {"total"}:
                raise NptwofoldError("the baseline network maps other layers than this one")
        rows = [self._energy_row(name, ledger.design[name], baseline_rows[name])
                for name in self.layers]
        total = functools.reduce(EnergyCounts.__add__, ledger.design.values())
        return dict(n_images=ledger.n_images, layers=rows,
                    total=self._energy_row("total", total, baseline_rows["total"]))

    def _pj_per_image(self, counts):
        report = layer_energy_report(counts, self.hardware)
        per_image = {key: report[key] / self.ledger.n_images
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
