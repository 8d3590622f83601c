"""Twofold Sparsity applied to a model (SPEC sections 3 and 4).

`Twofold` gives every mapped layer (all convs and the FC) an LFSR keep-mask and turns its
weight into trained bit planes, in the array's weight encoding (`weight_encoding`: two's
complement, offset binary or sign-magnitude; `kernels.quant`), so what is trained is what the
array stores. The trainer calls its hooks: `regularize` after each backward pass (adds the
Reg_Net, Reg_Bit and energy regularizer gradients), `after_step` after each update (clamps bits
to [0, 1], and once the model is hard-pruned keeps the cut weights at 0) and `end_epoch`
(re-binarizes at the chosen epochs and re-measures the input activity). Post-training is
`hard_prune`, then optionally `drop_planes` (the low bit planes the loss can spare), then
`rebinarize` (energy-aware with `energy_rounding`; with `energy_rounding_budget` only the
moves that save the most energy per Fisher-predicted loss, `weight_fisher`); `layer_report`
gives the per-layer sparsity table.

Energy regularizer (issue 13, docs/energy-regularizer.md): with `lambda_energy` > 0 the
objective gains R_E = lambda_E * sum_i a_i e(q_i) / E_ref over all mapped layers together, e(q)
the cell energy of level q in `weight_encoding` (`kernels.energy`) and a_i the driven count of
weight i's row per image: sum over the layer's output positions of the number of 1-bits of the
a-bit quantized input on that row (zero padding counts as 0), averaged over the first
`activity_images` training images in inference mode. The inputs are quantized as the array
sees them (`kernels.quant.quantize_activations`): the stem's clip is 1, every other layer's is
the max of its input over those images with float activations (`CimNetwork.calibrate`'s
clips); the counting pass then feeds each layer its quantized inputs, as the fake-quant and
CIM forwards do. So sum_i a_i e(q_i) is the cell energy per image of
the stored weights (offset binary's shared reference column aside), and a stem weight, applied
at 16x more positions than a layer3 one, weighs accordingly. E_ref = sum_i a_i * (mean of the
two's complement e(q) over all levels): fixed by the activity, not by the weights, and the
same for every encoding, so lambda_E means the same across encodings. The activity is measured
when first needed and again at the end of every epoch.
"""
import contextlib
import dataclasses

import numpy as np
from tqdm import tqdm

from .errors import NptwofoldError
from .cim.calibration import input_maxima
from .cim.device import CELL_STATES
from .cim.mapping import in_weight_layout
from .hardware import HardwareConfig
from .kernels.lfsr import (kept_per_column, lfsr_keep_mask_for_kept, lfsr_width_for_rows,
                           weight_mask)
from .kernels.quant import (ENCODINGS, STEM_CLIP, SIGN_MAGNITUDE, bits_backward, check_bits,
                            clamp_bits, decompose, encoding_code, max_level,
                            quantize_activations, real_levels, rebinarize_bits,
                            rounded_levels)
from .kernels.regularizers import reg_bit, reg_bit_plane_lasso, reg_net
from .kernels.augment import to_float
from .cim.device import weight_cells
from .kernels.cim_events import activation_ones
from .kernels.conv import im2col_column_sums
from .kernels.energy import (budgeted_moves, energy_regularizer, energy_rounding_candidates,
                             level_energy_table)
from .kernels.loss import softmax_cross_entropy
from .layers import WeightLayer
from .options import at_least, between, check_fields, option
from .steps import evaluate
from .threads import run_parallel

BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
LFSR_STREAM = 2  # random stream (seed, 2, layer index) picks each layer's LFSR seed
REG_BIT_FORMS = {"poster": reg_bit, "plane_lasso": reg_bit_plane_lasso}
ACTIVITY_BATCH = 100  # images per forward of the activity measurement
FISHER_BATCH = 50  # images per backward of the rounding's Fisher estimate


def _check_energy_rounding(radius):
    if 0 < radius < 0.5:
        raise NptwofoldError("is below 0.5: a radius under half a step can never move a weight "
                             "off its nearest level (use 0 for plain rounding)")


@dataclasses.dataclass
class TwofoldConfig:
    """Parameters of the method; the defaults marked [assumption] are not given by the poster.

    Each field is declared once, with its help and range: the CLI flags, their checks and the
    checkpoint's config follow from it (`options`).
    """
    sparsity: float = option(0.5, "network sparsity p of every mapped layer",
                             between(0, 1, high_open=True))
    lambda_net: float = option(10.0, "Reg_Net strength lambda [assumption]", at_least(0))
    beta_bit: float = option(20.0, "Reg_Bit strength beta [assumption]", at_least(0))
    reg_bit_form: str = option("poster", "Reg_Bit form: poster = ||sum_n B(n)||_2, plane_lasso "
                               "= BSQ's sum_n ||B(n)||_2", choices=tuple(REG_BIT_FORMS))
    plane_drop_tolerance: float = option(
        0.0, "post-training precision adjustment [deviation, see the README]: after hard "
        "pruning, layers in turn drop their lowest kept bit plane (levels rounded to multiples "
        "of 2^dropped, at most b - 2 planes) while the cross-entropy on the check images stays "
        "within this many nats of its value before the first drop; 0 = never drop",
        at_least(0))
    plane_drop_images: int = option(500, "training images (the first ones, not augmented) "
                                    "the plane-drop check uses", at_least(1))
    mask_group: int = option(1, "output columns sharing one LFSR index set (1 = per output "
                             "channel)", at_least(1))
    lfsr_seed: int = option(0, "base LFSR seed; 0 = derive each layer's from the training seed",
                            at_least(0))
    rebinarize_epochs: list[int] = option([], "epochs (1-based) after which the bits are "
                                          "re-binarized (always after the last one too)",
                                          at_least(1))
    stem_sparsity: float | None = option(
        None, "network sparsity of the stem (the first mapped layer, 27 inputs); none = "
        "--sparsity, 0 = dense", between(0, 1, high_open=True))
    classifier_sparsity: float | None = option(
        None, "network sparsity of the classifier (the last mapped layer, 64 inputs); none = "
        "--sparsity, 0 = dense", between(0, 1, high_open=True))
    lambda_energy: float = option(
        0.0, "energy regularizer strength lambda_E: R_E = lambda_E sum_i a_i e(q_i) / E_ref "
        "(docs/energy-regularizer.md); 0 = off", at_least(0))
    activity_images: int = option(500, "training images (the first ones, not augmented) the "
                                  "input activity a_i is measured on, each epoch", at_least(1))
    energy_rounding: float = option(
        0.0, "post-training re-binarizations round energy-aware: a weight takes the cheaper (in "
        "cell energy e(q) of --weight-encoding) of the two grid levels around q~ when it lies "
        "within this many grid steps of q~; 0 = plain rounding, else in [0.5, 1) "
        "(docs/energy-regularizer.md)", between(0, 1, high_open=True),
        check=_check_energy_rounding)
    energy_rounding_last: float | None = option(
        None, "radius of the energy-aware rounding after the last epoch, which no fine-tune "
        "follows; none = --energy-rounding, 0 = plain rounding", between(0, 1, high_open=True),
        check=_check_energy_rounding)
    energy_rounding_budget: float = option(
        0.0, "loss budget in nats of the energy-aware rounding: the moves to the cheaper level "
        "are taken in order of cell energy saved per predicted loss increase 1/2 F_i dW_i^2 "
        "(F_i: diagonal empirical Fisher on the --plane-drop-images check images) while their "
        "summed prediction stays within it; 0 = take every move within the radius",
        at_least(0))

    def validated(self):
        check_fields(self)
        if self.energy_rounding_budget and not (self.energy_rounding
                                                or self.energy_rounding_last):
            raise NptwofoldError("--energy-rounding-budget needs --energy-rounding or "
                                 "--energy-rounding-last (the radius of the moves it chooses "
                                 "from)")
        return self


def layer_matrix_shape(weight_shape):
    """(R, C) of a layer: R = Cin*kh*kw inputs, C = Cout outputs (SPEC 4)."""
    return int(np.prod(weight_shape[1:])), int(weight_shape[0])


class Twofold:
    """The method's state for one model: mapped layers, their masks, and the training hooks."""

    def __init__(self, model, config, seed, hardware=None):
        self.config = config.validated()
        # the array the bit planes are made for: their precision b and encoding, the input
        # bits and cell energies the energy regularizer weighs
        self.hardware = HardwareConfig() if hardware is None else hardware
        self.bits, self.encoding = self.hardware.weight_bits, self.hardware.weight_encoding
        self.model = model
        self.layers = {}  # name -> WeightLayer
        self.masks = {}   # name -> LfsrKeepMask
        base_seed = config.lfsr_seed or seed
        mapped = [(n.rstrip("."), m) for n, m in model.named_modules()
                  if isinstance(m, WeightLayer)]
        sparsity = {name: config.sparsity for name, _ in mapped}
        for name, own in ((mapped[0][0], config.stem_sparsity),
                          (mapped[-1][0], config.classifier_sparsity)):
            if own is not None:
                sparsity[name] = own
        for index, (name, layer) in enumerate(mapped):
            if not layer.bit_width:
                layer.use_bit_weights(self.bits, self.encoding)
            elif layer.bit_encoding != self.encoding:
                raise NptwofoldError(f"{name} holds {layer.bit_encoding} bit planes, the twofold "
                                     f"hardware config says {self.encoding}")
            rows, cols = layer_matrix_shape(layer.params["weight_bits"].shape[1:])
            width = lfsr_width_for_rows(rows)
            lfsr_seed = int(np.random.default_rng([base_seed, LFSR_STREAM, index])
                            .integers(1, 2 ** width))
            self.layers[name] = layer
            self.masks[name] = lfsr_keep_mask_for_kept(
                rows, cols, kept_per_column(rows, sparsity[name]), lfsr_seed, config.mask_group)
        # the weight-shaped masks are used every step, so they are laid out once
        self.weight_masks = {name: np.ascontiguousarray(weight_mask(
            self.masks[name].mask, layer.params["weight_bits"].shape[1:]))
            for name, layer in self.layers.items()}
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

    def regularize(self):
        """Adds the Reg_Net, Reg_Bit and energy regularizer gradients to the layers' grads;
        returns their values.

        The layers are independent, so they run on the pool, one task per layer; the values
        are summed in layer order afterwards, the same at any thread count."""
        if self.config.lambda_energy and self.activity is None:
            self.measure_activity()
        names = list(self.layers)
        values = [None] * len(names)

        def regularize_layer(index):
            values[index] = self._regularize_layer(names[index])

        run_parallel(regularize_layer, len(names))
        totals = {"reg_net": 0.0, "reg_bit": 0.0, "reg_energy": 0.0}
        for layer_values in values:
            for key, value in layer_values.items():
                totals[key] += value
        return totals

    def _regularize_layer(self, name):
        layer = self.layers[name]
        encoding = self.encoding
        bits, scale = layer.params["weight_bits"], layer.buffers["weight_scale"][0]
        values = {}
        if self.config.lambda_net:
            values["reg_net"], dweight = reg_net(layer.weight, self.keep_mask(name),
                                                 self.config.lambda_net)
            # Reg_Net acts on W = s q / qmax, so its gradient reaches the bits the STE way
            bits_backward(bits, scale, dweight, layer.dropped_planes, encoding,
                          out=layer.grads["weight_bits"])
        if self.config.beta_bit:
            values["reg_bit"], dbits = self.reg_bit(name)
            layer.grads["weight_bits"] += dbits
        if self.config.lambda_energy:
            values["reg_energy"], dweight = energy_regularizer(
                self.levels(name), self.activity[name], self.energy_table, scale,
                layer.dropped_planes, self.config.lambda_energy / self.energy_reference,
                bits.dtype)
            # straight through the rounding to W, then to the bits like Reg_Net's, so the
            # relaxed bits cannot absorb it (docs/energy-regularizer.md)
            bits_backward(bits, scale, dweight, layer.dropped_planes, encoding,
                          out=layer.grads["weight_bits"])
        return values

    def reg_bit(self, name):
        """(Reg_Bit, its gradient on the planes) of a layer, over its cell planes."""
        bits = self.layers[name].params["weight_bits"]
        if self.sign_plane is not None:
            bits = bits.copy()
            bits[self.sign_plane] = 0.0
        value, dbits = REG_BIT_FORMS[self.config.reg_bit_form](bits, self.config.beta_bit,
                                                               self.param_share[name])
        if self.sign_plane is not None:
            dbits[self.sign_plane] = 0.0
        return value, dbits

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
            levels = (quantize_activations(x, clip, self.hardware.activation_bits) if clip > 0
                      else np.zeros_like(x))
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
        self.activity = {}
        for name, layer in self.layers.items():
            shape = layer.params["weight_bits"].shape[1:]
            per_row = in_weight_layout(driven[name] / len(images), shape)
            self.activity[name] = np.ascontiguousarray(
                np.broadcast_to(per_row, shape) * self.keep_mask(name))
        two_complement_mean = level_energy_table(self.bits, "twos_complement",
                                                 self.hardware.cell_energy_pj).mean()
        self.energy_reference = two_complement_mean * sum(a.sum() for a in self.activity.values())
        if not self.energy_reference > 0:
            raise NptwofoldError("no input bit was 1 on the activity images; the energy "
                                 "regularizer has nothing to weigh")

    def cell_energy_pj(self, name):
        """sum_i a_i e(q_i) of a layer: its cell energy per image (None until measured)."""
        if self.activity is None:
            return None
        return float(np.sum(self.activity[name] * self.level_energy(self.levels(name))))

    def level_energy(self, levels):
        """e(q) in pJ of integer levels in the config's bits and encoding (float64)."""
        return self.energy_table[levels.astype(np.int64) + max_level(self.bits)]

    def after_step(self):
        for layer in self.layers.values():
            clamp_bits(layer.params["weight_bits"])
            layer.params["weight_bits"][:layer.dropped_planes] = 0.0
        if self.pruned:
            self.hard_prune()

    def end_epoch(self, epoch, last):
        """Re-binarizes at the chosen epochs and after the last one (the forward is unchanged)."""
        if last or epoch in self.config.rebinarize_epochs:
            self.rebinarize(last)
        if self.activity_images is not None:
            self.measure_activity()  # the next epoch weighs the inputs of the weights it has

    def drop_planes(self, check_loss):
        """Round-robin over the layers: each drops its next lowest plane if `check_loss()`
        stays within the tolerance of where it started; a layer whose drop is refused is done.
        Post-training calls it on the hard-pruned model, the one the array will hold.

        Dropping rounds q~ to the nearest multiple of 2^dropped, the closest level the lower
        precision has, rather than cutting the plane's bits. Returns the check loss before and
        after, and how many planes were dropped.
        """
        loss_before = loss_after = check_loss()
        budget = loss_before + self.config.plane_drop_tolerance
        planes_dropped = 0
        open_layers = [layer for layer in self.layers.values()
                       if layer.dropped_planes < self.bits - 2]
        while open_layers:
            for layer in list(open_layers):
                layer.dropped_planes += 1
                loss = check_loss()
                if loss > budget:
                    layer.dropped_planes -= 1
                    open_layers.remove(layer)
                    continue
                loss_after, planes_dropped = loss, planes_dropped + 1
                if layer.dropped_planes == self.bits - 2:
                    open_layers.remove(layer)
        return dict(check_loss_before=loss_before, check_loss_after=loss_after,
                    planes_dropped=planes_dropped)

    def rebinarize(self, last=False):
        """Rounds every layer's bits to exact {0, 1} planes of its levels (dropped planes 0);
        once hard-pruned (post-training), energy-aware with radius `energy_rounding` (after
        the `last` epoch `energy_rounding_last`, if set) and within `energy_rounding_budget` if
        that is set. Logs and returns the rounding's figures (none for a plain one)."""
        b, encoding = self.bits, self.encoding
        radius = self.config.energy_rounding
        if last and self.config.energy_rounding_last is not None:
            radius = self.config.energy_rounding_last
        if not (self.pruned and radius):
            for layer in self.layers.values():
                rebinarize_bits(layer.params["weight_bits"], layer.dropped_planes, encoding)
            return {}
        candidates = {name: energy_rounding_candidates(
            real_levels(layer.params["weight_bits"], encoding), self.energy_table,
            layer.dropped_planes, radius)
            for name, layer in self.layers.items()}
        take = {name: cheaper != nearest for name, (nearest, cheaper) in candidates.items()}
        figures = dict(rounding_candidates=int(sum(t.sum() for t in take.values())))
        if self.config.energy_rounding_budget:
            take, predicted = self._budgeted_rounding(candidates)
            figures["rounding_predicted_loss"] = predicted
        for name, layer in self.layers.items():
            nearest, cheaper = candidates[name]
            layer.params["weight_bits"][...] = decompose(np.where(take[name], cheaper, nearest),
                                                         b, encoding)
        figures["rounding_moved"] = int(sum(t.sum() for t in take.values()))
        tqdm.write(f"energy-aware rounding: {figures['rounding_moved']} of "
                   f"{figures['rounding_candidates']} candidate weights moved"
                   + (f", predicted loss +{figures['rounding_predicted_loss']:.4f} nats"
                      if self.config.energy_rounding_budget else ""))
        return figures

    def _budgeted_rounding(self, candidates):
        """Which candidate moves to take within the loss budget (`budgeted_moves` over all
        layers together): the gain of moving weight i from its nearest level to the cheaper one
        is a_i (e(nearest) - e(cheaper)), its predicted cost 1/2 F_i dW_i^2, F_i from
        `weight_fisher`. Returns the per-layer choice and the summed predicted cost."""
        if self.activity is None:
            self.measure_activity()
        fisher = self.weight_fisher()
        qmax = max_level(self.bits)
        gains, costs = [], []
        for name, (nearest, cheaper) in candidates.items():
            scale = float(self.layers[name].buffers["weight_scale"][0])
            moved_weight = (cheaper.astype(np.float64) - nearest) * scale / qmax
            energy_saved = self.level_energy(nearest) - self.level_energy(cheaper)
            gains.append((self.activity[name] * energy_saved).ravel())
            costs.append((0.5 * fisher[name] * moved_weight ** 2).ravel())
        gain, cost = np.concatenate(gains), np.concatenate(costs)
        chosen = budgeted_moves(gain, cost, self.config.energy_rounding_budget)
        take, start = {}, 0
        for name, (nearest, _) in candidates.items():
            take[name] = chosen[start:start + nearest.size].reshape(nearest.shape)
            start += nearest.size
        return take, float(cost[chosen].sum())

    def weight_fisher(self):
        """Diagonal empirical Fisher F_i of the mean cross-entropy in every mapped weight W_i,
        on the first `plane_drop_images` training images: B times the mean over batches of B =
        FISHER_BATCH images of the squared batch gradient (a batch gradient's square averages
        to 1/B of a single image's when the mean gradient is small). BN runs on batch
        statistics and its running statistics are left as they were."""
        if (self.activity_images is None or self.check_labels is None
                or not len(self.activity_images)):
            raise NptwofoldError("the budgeted energy rounding needs training images and labels; "
                                 "none were given")
        count = self.config.plane_drop_images
        images, labels = self.activity_images[:count], self.check_labels[:count]
        fisher = {name: np.zeros(layer.params["weight_bits"].shape[1:])
                  for name, layer in self.layers.items()}
        batches = range(0, len(images), FISHER_BATCH)
        with kept_bn_statistics(self.model):
            for start in batches:
                logits = self.model.forward(to_float(images[start:start + FISHER_BATCH]))
                dlogits = softmax_cross_entropy(logits, labels[start:start + FISHER_BATCH])[1]
                self.model.backward(dlogits)
                for name, layer in self.layers.items():
                    fisher[name] += np.square(layer.weight_grad, dtype=np.float64)
        for value in fisher.values():
            value *= FISHER_BATCH / len(batches)
        return fisher

    def hard_prune(self):
        """Sets the planes of every weight outside the keep-masks to those of level 0.

        Idempotent; afterwards `after_step` repeats it, so a fine-tune keeps the masks fixed.
        """
        self.pruned = True
        for name, layer in self.layers.items():
            bits, keep = layer.params["weight_bits"], self.keep_mask(name)
            zero = self.zero_planes.reshape((-1,) + (1,) * keep.ndim).astype(bits.dtype)
            np.copyto(bits, zero, where=~keep.astype(bool))

    def levels(self, name):
        layer = self.layers[name]
        return rounded_levels(layer.params["weight_bits"], layer.dropped_planes,
                              self.encoding)

    def layer_report(self):
        """Per-layer rows (and a total row) of network and bit sparsity and cell states.

        Bits and cells are counted over the kept weights only: those are what the CIM array
        stores. `zero_weight_share` counts all weights whose level is 0.
        """
        b = self.bits
        rows, totals = [], None
        for name, layer in self.layers.items():
            keep = self.keep_mask(name)
            levels = self.levels(name)
            encoding = self.encoding
            planes = decompose(levels, b, encoding)[:, keep.astype(bool)]  # (b, kept weights)
            cells = weight_cells(levels, b, encoding)[:, keep.astype(bool)]
            counts = dict(
                weights=levels.size, kept=int(keep.sum()), zero_weights=int((levels == 0).sum()),
                dropped_planes=layer.dropped_planes,
                zero_bits_by_position=(planes == 0).sum(axis=1).tolist(),
                cell_states=[int((cells == s).sum()) for s in range(len(CELL_STATES))],
                reg_net=reg_net(layer.effective_weight(), keep, self.config.lambda_net)[0],
                reg_bit=self.reg_bit(name)[0])
            if self.activity is not None:
                counts["cell_pj"] = self.cell_energy_pj(name)
            rows.append(self._report_row(name, counts, b))
            totals = counts if totals is None else {
                key: [a + c for a, c in zip(totals[key], value)] if isinstance(value, list)
                else totals[key] + value for key, value in counts.items()}
        rows.append(self._report_row("total", totals, b))
        return rows

    @staticmethod
    def _report_row(name, counts, b):
        kept, cells = counts["kept"], sum(counts["cell_states"])
        row = dict(layer=name, weights=counts["weights"], kept=kept,
                   network_sparsity=1 - kept / counts["weights"],
                   zero_weight_share=counts["zero_weights"] / counts["weights"],
                   zero_bit_share=sum(counts["zero_bits_by_position"]) / max(kept * b, 1),
                   dropped_planes=counts["dropped_planes"],
                   reg_net=counts["reg_net"], reg_bit=counts["reg_bit"])
        if "cell_pj" in counts:  # sum_i a_i e(q_i) in the config's encoding, pJ per image
            row["cell_pj"] = counts["cell_pj"]
        row.update({f"zero_bit_{n}": z / max(kept, 1)
                    for n, z in enumerate(counts["zero_bits_by_position"])})
        row.update({f"cells_{state}": count / max(cells, 1)
                    for state, count in zip(CELL_STATES, counts["cell_states"])})
        return row

    @staticmethod
    def format_report(rows):
        """The per-layer report as a fixed-width text table."""
        header = (f"{'layer':<16}{'kept':>8}{'net sp.':>9}{'drop':>5}{'0 bits':>8}"
                  + "".join(f"{'c' + s:>7}" for s in CELL_STATES) + f"{'Reg_Net':>11}{'Reg_Bit':>11}"
                  + (f"{'cell uJ':>11}" if "cell_pj" in rows[0] else ""))
        lines = [header]
        for row in rows:
            lines.append(f"{row['layer']:<16}{row['kept']:>8}{row['network_sparsity']:>9.3f}"
                         f"{row['dropped_planes']:>5}{row['zero_bit_share']:>8.3f}"
                         + "".join(f"{row['cells_' + s]:>7.3f}" for s in CELL_STATES)
                         + f"{row['reg_net']:>11.4g}{row['reg_bit']:>11.4g}"
                         + (f"{row['cell_pj'] / 1e6:>11.4g}" if "cell_pj" in row else ""))
        return "\n".join(lines)

    def write_h5(self, group):
        """The integer weights, exact bit planes, scale, keep-mask and LFSR parameters per layer."""
        b, encoding = self.bits, self.encoding
        for name, layer in self.layers.items():
            levels = self.levels(name)
            scale = float(layer.buffers["weight_scale"][0])
            mask = self.masks[name]
            sub = group.create_group(name)
            sub.create_dataset("levels", data=levels)
            sub.create_dataset("bit_planes", data=decompose(levels, b, encoding))
            sub.create_dataset("cells", data=weight_cells(levels, b, encoding))
            sub.create_dataset("weight", data=(scale * levels / max_level(b)).astype(np.float32))
            sub.create_dataset("keep_mask", data=self.keep_mask(name))
            sub.attrs.update(bits=b, scale=scale, lfsr_width=mask.width, lfsr_taps=list(mask.taps),
                             lfsr_seed=mask.seed, kept=mask.kept, group=mask.group,
                             rows=mask.mask.shape[0], cols=mask.mask.shape[1],
                             lfsr_steps=mask.steps, dropped_planes=layer.dropped_planes,
                             encoding=encoding)

    def load_h5(self, stored, path):
        """Takes each layer's dropped planes from a stored /twofold group (read and type-checked
        by `load_checkpoint`), after the model's weight_bits were restored. Everything stored
        must agree exactly: the keep-mask with the one its LFSR parameters generate and with
        this run's config, the levels with weight_bits, the bit planes and the weight with the
        levels."""
        if set(stored) != set(self.layers):
            raise NptwofoldError(f"{path}: /twofold layers {sorted(stored)[:3]}... do not "
                                 "match the model's mapped layers")
        b, encoding = self.bits, self.encoding
        for name, entry in stored.items():
            attrs, layer, where = entry["attrs"], self.layers[name], f"{path}: /twofold/{name}"
            shape = layer.params["weight_bits"].shape[1:]
            if attrs["bits"] != b:
                raise NptwofoldError(f"{where}/@bits is {attrs['bits']}, the hardware config says "
                                     f"{b}")
            if attrs["encoding"] != encoding:
                raise NptwofoldError(f"{where}/@encoding is {attrs['encoding']}, the hardware "
                                     f"config says {encoding}")
            if not attrs["dropped_planes"] <= b - 2:
                raise NptwofoldError(f"{where}/@dropped_planes {attrs['dropped_planes']} is "
                                     f"more than b - 2 = {b - 2}")
            if (attrs["rows"], attrs["cols"]) != layer_matrix_shape(shape):
                raise NptwofoldError(f"{where}/@rows, @cols are {attrs['rows']} x "
                                     f"{attrs['cols']}, the layer is "
                                     f"{layer_matrix_shape(shape)}")
            for key in ("levels", "weight", "keep_mask"):
                if entry[key].shape != shape:
                    raise NptwofoldError(f"{where}/{key} has shape {entry[key].shape}, the layer "
                                         f"needs {shape}")
            try:
                regenerated = lfsr_keep_mask_for_kept(
                    attrs["rows"], attrs["cols"], attrs["kept"], attrs["lfsr_seed"],
                    attrs["group"], attrs["lfsr_width"], attrs["lfsr_taps"])
            except NptwofoldError as exc:
                raise NptwofoldError(f"{where}: bad LFSR parameters: {exc}") from None
            if attrs["lfsr_steps"] != regenerated.steps or not np.array_equal(
                    weight_mask(regenerated.mask, shape), entry["keep_mask"]):
                raise NptwofoldError(f"{where}: the stored keep-mask (or @lfsr_steps) differs "
                                     "from the one its LFSR parameters generate")
            if not np.array_equal(regenerated.mask, self.masks[name].mask):
                raise NptwofoldError(f"{where}: the keep-mask does not match this run's "
                                     "twofold config (sparsity, group or seed)")
            layer.dropped_planes = attrs["dropped_planes"]
            levels = self.levels(name)
            scale = float(layer.buffers["weight_scale"][0])
            expected = dict(levels=levels, bit_planes=decompose(levels, b, encoding),
                            weight=(scale * levels / max_level(b)).astype(np.float32))
            if "cells" in entry:  # absent in checkpoints older than the encoded planes
                expected["cells"] = weight_cells(levels, b, encoding)
            for key, value in expected.items():
                if entry[key].dtype != value.dtype or not np.array_equal(entry[key], value):
                    raise NptwofoldError(f"{where}/{key} does not agree with the model's "
                                         "weight_bits (it must be exactly what they give)")
            if attrs["scale"] != scale:
                raise NptwofoldError(f"{where}/@scale {attrs['scale']} is not the model's "
                                     f"weight_scale {scale}")


def start_post_training(method, model, data, eval_batch_size):
    """Accuracy before, then hard-prune with the masks, drop the bit planes the loss can spare
    (if `plane_drop_tolerance`; checked on the pruned model) and re-binarize (SPEC 3).

    The fine-tune that follows trains the kept bits under the same objective; the masks stay
    enforced and the bits are re-binarized after its last epoch, so precision is fixed.
    Returns the figures the run records (accuracies, and the precision adjustment's).
    """
    def test_accuracy():
        return evaluate(model, data.test_images, data.test_labels, eval_batch_size)[1]

    before = test_accuracy()
    method.hard_prune()
    dropping = {}
    if method.config.plane_drop_tolerance:
        count = method.config.plane_drop_images
        dropping = method.drop_planes(lambda: plane_check_loss(
            model, data.train_images[:count], data.train_labels[:count]))
        tqdm.write(f"precision adjustment: {dropping['planes_dropped']} bit planes dropped, "
                   f"check loss {dropping['check_loss_before']:.4f} -> "
                   f"{dropping['check_loss_after']:.4f}")
    rounding = method.rebinarize()
    after_prune = test_accuracy()
    tqdm.write(f"post-training: test accuracy {before:.4f} before, {after_prune:.4f} after "
               "hard pruning" + (", precision adjustment" if dropping else "")
               + " and re-binarization")
    return dict(accuracy_before=before, accuracy_after_prune=after_prune, **dropping, **rounding)


@contextlib.contextmanager
def kept_bn_statistics(model):
    """Runs the block with the model in training mode (BN on each batch's own statistics) and
    puts the BN running statistics and the model's mode back afterwards: right after hard
    pruning the running statistics are stale until the fine-tune re-estimates them, and would
    judge the model on a broken network."""
    bn_state = {name: value.copy() for name, value in model.state_arrays()
                if name.rsplit(".", 1)[-1] in BN_STATISTICS}
    training = model.training
    model.train()
    try:
        yield
    finally:
        for name, value in model.state_arrays():
            if name in bn_state:
                value[...] = bn_state[name]
        model.train(training)


def plane_check_loss(model, images, labels):
    """Cross-entropy on uint8 `images`, with BN on the images' own batch statistics
    (`kept_bn_statistics`)."""
    with kept_bn_statistics(model):
        logits = model.forward(to_float(images))
    return softmax_cross_entropy(logits, labels)[0]
