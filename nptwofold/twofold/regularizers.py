"""Reg_Net, Reg_Bit and the energy regularizer on a model's bit planes, and the clamp after
each update: the hooks the trainer calls (`RegularizerHooks`, part of `Twofold`).
"""
from ..kernels.energy import energy_regularizer
from ..kernels.quant import bits_backward, clamp_bits
from ..kernels.regularizers import reg_net
from ..threads import run_parallel
from .config import REG_BIT_FORMS


class RegularizerHooks:
    """The training hooks of `Twofold`: `regularize` after each backward pass, `after_step`
    after each update. Uses the state `Twofold.__init__` sets up."""

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

    def after_step(self):
        for layer in self.layers.values():
            clamp_bits(layer.params["weight_bits"])
            layer.params["weight_bits"][:layer.dropped_planes] = 0.0
        if self.pruned:
            self.hard_prune()
