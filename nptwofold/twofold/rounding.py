"""Post-training, the method's last phase: hard-prune with the masks,
drop the low bit planes the loss can spare, and re-binarize, energy-aware if asked; and the
post-training entry point the trainer calls (`start_post_training`).
"""
import numpy as np
from tqdm import tqdm

from ..kernels.energy import budgeted_moves, energy_rounding_candidates
from ..kernels.quant import decompose, max_level, real_levels, rebinarize_bits
from ..steps import evaluate
from .fisher import plane_check_loss, weight_fisher


class PostTraining:
    """Hard pruning, plane drop and re-binarization of `Twofold` (part of it)."""

    def hard_prune(self):
        """Sets the planes of every weight outside the keep-masks to those of level 0.

        Idempotent; afterwards `after_step` repeats it, so a fine-tune keeps the masks fixed.
        """
        self.pruned = True
        for name, layer in self.layers.items():
            bits, keep = layer.params["weight_bits"], self.keep_mask(name)
            zero = self.zero_planes.reshape((-1,) + (1,) * keep.ndim).astype(bits.dtype)
            np.copyto(bits, zero, where=~keep.astype(bool))

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
        fisher = weight_fisher(self)
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


def start_post_training(method, model, data, eval_batch_size):
    """Accuracy before, then hard-prune with the masks, drop the bit planes the loss can spare
    (if `plane_drop_tolerance`; checked on the pruned model) and re-binarize.

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
