"""CIM hardware parameters (SPEC sections 5 and 7) and per-layer energy reports in picojoules.

`HardwareConfig` is the one object that names every hardware knob, the poster's numbers and the
assumed ones; it validates itself, round-trips through JSON, and turns itself into the ADC of a
crossbar (`adc_for`). `layer_energy_report` turns the integer event counts of
`nptwofold.kernels.cim` into pJ: counts times table entries, so equal counts always give equal
energies. docs/cim-model.md explains each assumption.
"""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .checks import check_integer
from .errors import NptwofoldError
from .kernels.cim import (CELL_BITS, CELL_STATES, ENCODINGS, MAX_ACTIVATION_BITS, N_CELL_STATES,
                          calibrated_adc, fixed_adc, ideal_adc, outputs_per_tile)

ADC_RANGES = ("fixed", "calibrated")
# word and bit lines of one crossbar at most: real RRAM crossbars have 64 to 1024; the tile
# buffers and the ADC histograms grow with them (100,000 rows ask for terabytes)
MAX_CROSSBAR_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """The CIM array and its energy table.

    cell_energy_pj: pJ per activated cell in state 00, 01, 10, 11 (poster).
    adc_energy_pj: pJ per ADC conversion of an adc_reference_bits-bit ADC (poster: 0.208).
    adc_reference_bits: the width that costs adc_energy_pj **[assumption: 8]**; an ideal ADC
        (adc_bits = 0) is charged at this width.
    adc_energy_per_bit: factor of the conversion energy per added bit **[assumption: 2, a
        SAR/flash ADC's energy roughly doubles per bit]**: E(n) = adc_energy_pj *
        adc_energy_per_bit ** (n - adc_reference_bits).
    adc_bits: ADC resolution; 0 = ideal **[option]**.
    adc_range: "calibrated" (default, SPEC 7): per layer and ADC channel (cell significance and
        kind of column), the adc_percentile-th percentile of the partial sums on calibration
        images; "fixed": full scale 0..3 x crossbar_rows for every column (the ADC does not
        know a layer's ranges).
    adc_percentile: percentile of the calibrated ranges **[assumption: 99.99]**.
    weight_encoding: how signed weights are stored: twos_complement (with a sign column),
        offset_binary (reference column, offset removed digitally) or sign_magnitude
        (differential positive and negative columns); see `nptwofold.kernels.cim`.
    crossbar_rows, crossbar_cols: word lines and bit lines of one crossbar **[assumption:
        128 x 128]**; a column tile stores the union of its channels' kept rows, in row tiles of
        crossbar_rows, each converted separately.
    cell_bits: bits per cell; the kernels support 2 only.
    lfsr_step_energy_pj: pJ per LFSR step, a ~10-flip-flop register **[assumption]**.
    skip_zero_tiles: no conversion for a row tile whose inputs are all 0 for that bit **[option]**.
    activation_bits: a, bits of the unsigned inputs, applied bit-serially **[assumption]**.
    """
    cell_energy_pj: tuple = (0.079, 0.36, 0.73, 1.49)
    adc_energy_pj: float = 0.208
    adc_reference_bits: int = 8
    adc_energy_per_bit: float = 2.0
    adc_bits: int = 0
    adc_range: str = "calibrated"
    adc_percentile: float = 99.99
    weight_encoding: str = "twos_complement"
    crossbar_rows: int = 128
    crossbar_cols: int = 128
    cell_bits: int = 2
    lfsr_step_energy_pj: float = 0.02
    skip_zero_tiles: bool = False
    activation_bits: int = 8

    def __post_init__(self):
        if check_integer("cell_bits", self.cell_bits, 1) != CELL_BITS:
            kind = "odd" if self.cell_bits % 2 else "unsupported"
            raise NptwofoldError(f"cell_bits={self.cell_bits} is {kind}: the CIM kernels support "
                                 f"only {CELL_BITS}-bit cells")
        for name, minimum, maximum in (("adc_bits", 0, 30), ("adc_reference_bits", 1, 30),
                                       ("crossbar_rows", 1, MAX_CROSSBAR_SIZE),
                                       ("crossbar_cols", 1, MAX_CROSSBAR_SIZE),
                                       ("activation_bits", 1, MAX_ACTIVATION_BITS)):
            # NumPy integers would not reach JSON
            object.__setattr__(self, name, check_integer(name, getattr(self, name), minimum,
                                                         maximum))
        for name, known in (("weight_encoding", ENCODINGS), ("adc_range", ADC_RANGES)):
            if getattr(self, name) not in known:
                raise NptwofoldError(f"{name} must be one of {', '.join(known)}, "
                                     f"got {getattr(self, name)!r}")
        percentile = self.adc_percentile
        if (isinstance(percentile, (bool, np.bool_)) or not isinstance(
                percentile, (int, float, np.integer, np.floating)) or not 0 < percentile <= 100):
            raise NptwofoldError(f"adc_percentile must be a number in (0, 100], got {percentile!r}")
        object.__setattr__(self, "adc_percentile", float(percentile))
        if not isinstance(self.skip_zero_tiles, (bool, np.bool_)):
            raise NptwofoldError(f"skip_zero_tiles must be true or false, "
                                 f"got {self.skip_zero_tiles!r}")
        if isinstance(self.cell_energy_pj, (str, bytes)) or not hasattr(self.cell_energy_pj,
                                                                        "__len__"):
            raise NptwofoldError(f"cell_energy_pj must be a list of {N_CELL_STATES} energies")
        if len(self.cell_energy_pj) != N_CELL_STATES:
            raise NptwofoldError(f"cell_energy_pj needs {N_CELL_STATES} energies (states "
                                 f"{', '.join(CELL_STATES)}), got {len(self.cell_energy_pj)}")
        energies = [(f"cell_energy_pj[{state}]", e)
                    for state, e in zip(CELL_STATES, self.cell_energy_pj)]
        energies += [("adc_energy_pj", self.adc_energy_pj),
                     ("adc_energy_per_bit", self.adc_energy_per_bit),
                     ("lfsr_step_energy_pj", self.lfsr_step_energy_pj)]
        for name, energy in energies:
            real = isinstance(energy, (int, float, np.integer, np.floating))
            if (isinstance(energy, (bool, np.bool_)) or not real or not math.isfinite(energy)
                    or energy <= 0):
                raise NptwofoldError(f"{name} must be a positive number of pJ, got {energy!r}")
        # Frozen, so normalise through object.__setattr__: a JSON list then equals the tuple.
        object.__setattr__(self, "skip_zero_tiles", bool(self.skip_zero_tiles))
        object.__setattr__(self, "cell_energy_pj", tuple(float(e) for e in self.cell_energy_pj))
        for name in ("adc_energy_pj", "adc_energy_per_bit", "lfsr_step_energy_pj"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def outputs_per_tile(self, weight_bits):
        """Output channels of b-bit weights one column tile holds in this encoding: the mask
        group that makes masks cost nothing beyond their kept rows; raises if none fits."""
        return outputs_per_tile(self.weight_encoding, weight_bits, self.crossbar_cols)

    @property
    def adc_conversion_energy_pj(self):
        """pJ of one conversion at adc_bits (the reference width for an ideal ADC)."""
        bits = self.adc_bits or self.adc_reference_bits
        return self.adc_energy_pj * self.adc_energy_per_bit ** (bits - self.adc_reference_bits)

    def adc_for(self, crossbar, full_scale=None):
        """The `AdcSteps` of a crossbar: ideal, fixed full scale, or calibrated from
        `full_scale` (per ADC channel, `calibrated_full_scale`)."""
        if not self.adc_bits:
            return ideal_adc(crossbar)
        if self.adc_range == "fixed":
            return fixed_adc(crossbar, self.adc_bits)
        if full_scale is None:
            raise NptwofoldError("a calibrated ADC needs the partial-sum ranges; calibrate first")
        return calibrated_adc(crossbar, self.adc_bits, full_scale)

    def to_dict(self):
        return {**dataclasses.asdict(self), "cell_energy_pj": list(self.cell_energy_pj)}

    def to_json(self, path=None):
        """JSON text of the config; also written to `path` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source):
        """Config from a dict or a JSON file path; missing keys take their defaults."""
        if isinstance(source, dict):
            data = source
        else:
            try:
                data = json.loads(Path(source).read_text())
            except (OSError, ValueError) as error:
                raise NptwofoldError(f"cannot read hardware config {source}: {error}") from None
        if not isinstance(data, dict):
            raise NptwofoldError(
                f"hardware config must be a JSON object, got {type(data).__name__}")
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise NptwofoldError(f"unknown hardware config keys {unknown}; known keys: {known}")
        return cls(**data)


def layer_energy_report(counts, config):
    """pJ of one layer from its `cim.EnergyCounts`: cells / ADC / LFSR / total, the activated
    cell-state histogram (counts and shares of 00, 01, 10, 11) and the raw event counts."""
    cell_counts = [int(n) for n in counts.cell_state_counts]
    cells_pj = sum(n * energy for n, energy in zip(cell_counts, config.cell_energy_pj))
    adc_pj = counts.adc_conversions * config.adc_conversion_energy_pj
    lfsr_pj = counts.lfsr_steps * config.lfsr_step_energy_pj
    activated = sum(cell_counts)
    return {
        "cells_pj": cells_pj,
        "adc_pj": adc_pj,
        "lfsr_pj": lfsr_pj,
        "total_pj": cells_pj + adc_pj + lfsr_pj,
        "cell_state_counts": dict(zip(CELL_STATES, cell_counts)),
        "cell_state_share": {state: n / activated if activated else 0.0
                             for state, n in zip(CELL_STATES, cell_counts)},
        "adc_conversions": int(counts.adc_conversions),
        "lfsr_steps": int(counts.lfsr_steps),
    }
