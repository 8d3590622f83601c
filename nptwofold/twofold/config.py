"""The parameters of the method, `TwofoldConfig`; the array's (weight bits, encoding,
input bits, cell energies) are the `HardwareConfig`'s.
"""
import dataclasses

from ..errors import NptwofoldError
from ..kernels.regularizers import reg_bit, reg_bit_plane_lasso
from ..options import at_least, between, check_fields, option


REG_BIT_FORMS = {"poster": reg_bit, "plane_lasso": reg_bit_plane_lasso}


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
        0.0, "post-training precision adjustment (docs/method.md): after hard "
        "pruning, layers in turn drop their lowest kept bit plane (levels rounded to multiples "
        "of 2^dropped, at most b - 2 planes) while the cross-entropy on the check images stays "
        "within this many nats of its value before the first drop; 0 = never drop",
        at_least(0))
    plane_drop_images: int = option(500, "training images (the first ones, not augmented) "
                                    "the plane-drop check uses", at_least(1))
    mask_group: int = option(1, "output columns sharing one LFSR index set (1 = per output "
                             "channel; 0 = the output channels of one column tile of the "
                             "array, the group a crossbar can be built for)", at_least(0))
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
