"""The ADC of a crossbar column: ideal, fixed full scale, or calibrated ranges, and the energy
of one conversion at a width.

code(S) = min(round_half_even(S / step), top_code), the reading code x step: uniform steps,
round to nearest, clip at the top code (`AdcSteps`, one step and top code per physical column).
Ideal: step 1, no top code. `adc_steps` is the one place that decides which ADC a column gets
from the hardware's adc_bits and adc_range: 0 bits is the ideal ADC; a fixed ADC of at least
the bits of the largest partial sum reads every sum exactly, so it is the ideal one too.
Calibrated full scales come from partial-sum histograms counted on calibration images
(`full_scale_at_percentile`, `cim.calibration`).
"""
from typing import NamedTuple

import numpy as np

from ..checks import check_integer
from ..errors import NptwofoldError
from .device import MAX_CELL_STATE, adc_channels

ADC_RANGES = ("fixed", "calibrated")
MAX_ADC_BITS = 30
IDEAL_TOP_CODE = np.iinfo(np.int64).max


class AdcSteps(NamedTuple):
    """Per physical column: the reading of one code (step) and the top code."""
    step: np.ndarray  # (K,) float64
    top: np.ndarray   # (K,) int64

    def is_ideal(self, crossbar, largest_sums=None):
        """True if every partial sum the crossbar can produce is read exactly: steps of 1 and
        top codes at or above 3T, or above each column's `largest_sums` when given."""
        largest = MAX_CELL_STATE * crossbar.rows_per_tile if largest_sums is None else \
            largest_sums
        return bool(np.all(self.step == 1.0) and np.all(self.top >= largest))


def check_adc_bits(adc_bits):
    """adc_bits as an int in 0..MAX_ADC_BITS (0 = ideal), else NptwofoldError: the one range
    check of an ADC width."""
    return check_integer("adc_bits", adc_bits, 0, MAX_ADC_BITS)


def adc_steps(crossbar, adc_bits, adc_range, full_scale=None):
    """The `AdcSteps` of a crossbar for an ADC of `adc_bits` (0 = ideal) and `adc_range`
    ("fixed", or "calibrated" from `full_scale` per ADC channel)."""
    if not check_adc_bits(adc_bits):
        return ideal_adc(crossbar)
    if adc_range == "fixed":
        return fixed_adc(crossbar, adc_bits)
    if full_scale is None:
        raise NptwofoldError("a calibrated ADC needs the partial-sum ranges; calibrate first")
    return calibrated_adc(crossbar, adc_bits, full_scale)


def needs_ranges(adc_bits, adc_range):
    """True if the ADC needs calibrated partial-sum ranges (finite and calibrated)."""
    return bool(adc_bits) and adc_range == "calibrated"


def conversion_energy_pj(adc_bits, energy_pj, reference_bits, energy_per_bit):
    """pJ of one conversion at adc_bits, the reference width (costing energy_pj) for an ideal
    ADC: energy_pj * energy_per_bit ** (bits - reference_bits)."""
    bits = adc_bits or reference_bits
    return energy_pj * energy_per_bit ** (bits - reference_bits)


def adc_range_bits(rows_per_tile):
    """Bits of the largest partial sum of a tile, 3 * rows_per_tile."""
    return (MAX_CELL_STATE * rows_per_tile).bit_length()


def ideal_adc(crossbar):
    return AdcSteps(np.ones(crossbar.n_columns), np.full(crossbar.n_columns, IDEAL_TOP_CODE))


def fixed_adc(crossbar, adc_bits):
    """ADC of fixed full scale 0..3T (it does not know a layer's ranges): step 2^(range_bits -
    n), ideal for n = 0 or n >= range_bits."""
    adc_bits = check_adc_bits(adc_bits)
    range_bits = adc_range_bits(crossbar.rows_per_tile)
    if adc_bits == 0 or adc_bits >= range_bits:
        return ideal_adc(crossbar)
    return AdcSteps(np.full(crossbar.n_columns, float(1 << (range_bits - adc_bits))),
                    np.full(crossbar.n_columns, (1 << adc_bits) - 1))


def calibrated_adc(crossbar, adc_bits, full_scale):
    """ADC whose top code reads `full_scale[channel]` (partial-sum units, one per ADC channel):
    step = max(1, full_scale / (2^n - 1)); a step below 1 would resolve nothing more."""
    adc_bits = check_adc_bits(adc_bits)
    if adc_bits == 0:
        return ideal_adc(crossbar)
    full_scale = np.asarray(full_scale, np.float64)
    if full_scale.shape != (len(adc_channels(crossbar.encoding, crossbar.bits)),):
        raise NptwofoldError(f"full scales have shape {full_scale.shape}, the encoding "
                             f"{crossbar.encoding} has {len(adc_channels(crossbar.encoding, crossbar.bits))} ADC channels")
    top = (1 << adc_bits) - 1
    step = np.maximum(1.0, full_scale / top)[crossbar.channel]
    return AdcSteps(step, np.full(crossbar.n_columns, top))


def full_scale_at_percentile(histogram, percentile):
    """Smallest partial sum at or below which `percentile` % of the counted readings lie, per
    channel, from (channels, 3T + 1) histograms; at least 1."""
    histogram = np.asarray(histogram, np.int64)
    cumulative = np.cumsum(histogram, axis=1)
    totals = cumulative[:, -1:]
    reached = cumulative * 100.0 >= percentile * np.maximum(totals, 1)
    return np.maximum(reached.argmax(axis=1), 1).astype(np.float64)


def check_adc(crossbar, adc):
    if adc is None:
        return ideal_adc(crossbar)
    if not isinstance(adc, AdcSteps) or adc.step.shape != (crossbar.n_columns,):
        raise NptwofoldError("the ADC must be AdcSteps with one step per physical column")
    return adc
