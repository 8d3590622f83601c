"""What a twofold model reports and stores: the per-layer sparsity table (`layer_report`) and
the /twofold group of a checkpoint (`write_h5`, `load_h5`) and what a compact checkpoint
holds of it (`compact_layers`; docs/checkpoint-format.md).
"""
import numpy as np

from ..cim.device import CELL_STATES, weight_cells
from ..errors import NptwofoldError
from ..kernels.lfsr import lfsr_keep_mask_for_kept, weight_mask
from ..kernels.quant import decompose, max_level
from ..kernels.regularizers import reg_net
from .masks import layer_matrix_shape


class LayerReport:
    """The per-layer table and the /twofold checkpoint group of `Twofold` (part of it)."""

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
        """The integer weights, exact bit planes, scale, keep-mask, LFSR parameters and (once
        measured) the input activity a_i per layer."""
        b, encoding = self.bits, self.encoding
        for name in self.layers:
            levels = self.levels(name)
            sub = group.create_group(name)
            sub.create_dataset("levels", data=levels)
            sub.create_dataset("bit_planes", data=decompose(levels, b, encoding))
            sub.create_dataset("cells", data=weight_cells(levels, b, encoding))
            sub.create_dataset("weight", data=self._stored_weight(name, levels))
            sub.create_dataset("keep_mask", data=self.keep_mask(name))
            if self.activity is not None:  # what a resume inside an epoch goes on with
                sub.create_dataset("activity", data=self.activity[name])
            sub.attrs.update(self._stored_attrs(name))

    def compact_layers(self):
        """{layer: (levels, /twofold attributes)}, what a compact checkpoint stores (its loader
        rebuilds the planes and the mask from them). Refuses a model that is not finished,
        whose planes the levels would not give back exactly: one with cut weights off level 0
        (not hard-pruned) or with bits not exactly 0 or 1 (not re-binarized)."""
        stored = {}
        for name, layer in self.layers.items():
            levels = self.levels(name)
            if levels[self.keep_mask(name) == 0].any():
                raise NptwofoldError(f"{name} has cut weights off level 0: the model is not "
                                     "hard-pruned (a compact checkpoint holds a finished "
                                     "model, e.g. a run's post/last.h5)")
            if not np.array_equal(layer.params["weight_bits"],
                                  decompose(levels, self.bits, self.encoding)):
                raise NptwofoldError(f"{name}.weight_bits are not exactly the 0/1 planes of its "
                                     "levels: the model is not re-binarized (a compact "
                                     "checkpoint holds a finished model, e.g. a run's "
                                     "post/last.h5)")
            stored[name] = levels, self._stored_attrs(name)
        return stored

    def _stored_weight(self, name, levels):
        scale = float(self.layers[name].buffers["weight_scale"][0])
        return (scale * levels / max_level(self.bits)).astype(np.float32)

    def _stored_attrs(self, name):
        """The attributes of /twofold/<layer>: bits, scale, LFSR, shape and dropped planes."""
        mask = self.masks[name]
        return dict(bits=self.bits, scale=float(self.layers[name].buffers["weight_scale"][0]),
                    lfsr_width=mask.width, lfsr_taps=list(mask.taps), lfsr_seed=mask.seed,
                    kept=mask.kept, group=mask.group, rows=mask.mask.shape[0],
                    cols=mask.mask.shape[1], lfsr_steps=mask.steps,
                    dropped_planes=self.layers[name].dropped_planes, encoding=self.encoding)

    def load_h5(self, stored, path):
        """Takes each layer's dropped planes from a stored /twofold group (read and type-checked
        by `load_checkpoint`), after the model's weight_bits were restored. Everything stored
        must agree exactly: the keep-mask with the one its LFSR parameters generate and with
        this run's config, the levels with weight_bits, the bit planes and the weight with the
        levels. A compact checkpoint's entry holds only the levels and attributes (its planes
        are made from the levels): its mask is the regenerated one, and every weight it cuts
        must be at level 0, since a compact file holds a finished model."""
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
            for key in ("levels", "weight", "keep_mask", "activity"):
                if key in entry and entry[key].shape != shape:
                    raise NptwofoldError(f"{where}/{key} has shape {entry[key].shape}, the layer "
                                         f"needs {shape}")
            try:
                regenerated = lfsr_keep_mask_for_kept(
                    attrs["rows"], attrs["cols"], attrs["kept"], attrs["lfsr_seed"],
                    attrs["group"], attrs["lfsr_width"], attrs["lfsr_taps"])
            except NptwofoldError as exc:
                raise NptwofoldError(f"{where}: bad LFSR parameters: {exc}") from None
            keep = weight_mask(regenerated.mask, shape)
            if attrs["lfsr_steps"] != regenerated.steps or not np.array_equal(
                    keep, entry.get("keep_mask", keep)):
                raise NptwofoldError(f"{where}: the stored keep-mask (or @lfsr_steps) differs "
                                     "from the one its LFSR parameters generate")
            if not np.array_equal(regenerated.mask, self.masks[name].mask):
                raise NptwofoldError(f"{where}: the keep-mask does not match this run's "
                                     "twofold config (sparsity, group or seed)")
            layer.dropped_planes = attrs["dropped_planes"]
            levels = self.levels(name)
            scale = float(layer.buffers["weight_scale"][0])
            if "keep_mask" not in entry and levels[keep == 0].any():
                raise NptwofoldError(f"{where}/levels: a weight the keep-mask cuts has a "
                                     "non-zero level (a compact checkpoint holds a hard-pruned "
                                     "model)")
            # cells: absent in checkpoints older than the encoded planes; bit_planes, cells
            # and weight: absent in compact ones
            expected = dict(levels=levels, bit_planes=decompose(levels, b, encoding),
                            weight=self._stored_weight(name, levels),
                            cells=weight_cells(levels, b, encoding))
            for key, value in expected.items():
                if key in entry and (entry[key].dtype != value.dtype
                                     or not np.array_equal(entry[key], value)):
                    raise NptwofoldError(f"{where}/{key} does not agree with the model's "
                                         "weight_bits (it must be exactly what they give)")
            if attrs["scale"] != scale:
                raise NptwofoldError(f"{where}/@scale {attrs['scale']} is not the model's "
                                     f"weight_scale {scale}")
