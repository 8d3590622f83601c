"""Twofold Sparsity applied to a model (docs/method.md).

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
the max of its input over those images with float activations and the weights as trained
(`cim.calibration.input_maxima`, which the CIM calibration runs on the masked levels); the
counting pass then feeds each layer its quantized inputs, as the fake-quant and
CIM forwards do. So sum_i a_i e(q_i) is the cell energy per image of
the stored weights (offset binary's shared reference column aside), and a stem weight, applied
at 16x more positions than a layer3 one, weighs accordingly. E_ref = sum_i a_i * (mean of the
two's complement e(q) over all levels): fixed by the activity, not by the weights, and the
same for every encoding, so lambda_E means the same across encodings. The activity is measured
when first needed and again at the end of every epoch.

Modules, one job each: `config` (TwofoldConfig), `masks` (mapped layers and LFSR keep-masks),
`regularizers` (the training hooks), `activity` (a_i and E_ref), `fisher` (the Fisher and the
check loss post-training decides with), `rounding` (hard pruning, plane drop, re-binarization,
`start_post_training`), `report` (the per-layer table and the /twofold checkpoint group) and
`method` (`Twofold`, the state they share).
"""
from .config import TwofoldConfig
from .fisher import kept_bn_statistics, plane_check_loss
from .masks import layer_matrix_shape
from .method import Twofold
from .rounding import start_post_training

__all__ = ["Twofold", "TwofoldConfig", "kept_bn_statistics", "layer_matrix_shape",
           "plane_check_loss", "start_post_training"]
