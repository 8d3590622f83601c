"""CIM hardware parameters (SPEC section 5) and per-layer energy reports in picojoules.

`HardwareConfig` is the one object that names every hardware number, the poster's and the
assumed ones; it validates itself and round-trips through JSON. `layer_energy_report` turns the
integer event counts of `nptwofold.kernels.cim` into pJ: counts times table entries, so equal
counts always give equal energies.
"""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .errors import NptwofoldError
from .kernels.cim import CELL_BITS, MAX_ACTIVATION_BITS, N_CELL_STATES
from .kernels.quant import check_bits

CELL_STATES = ("00", "01", "10", "11")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
    """The CIM array and its energy table.

    cell_energy_pj: pJ per activated cell in state 00, 01, 10, 11 (poster).
    adc_energy_pj: pJ per ADC conversion (poster).
    adc_bits: ADC resolution; 0 = ideal. The model is in `nptwofold.kernels.cim` **[option]**.
    crossbar_rows, crossbar_cols: cells per crossbar column and row; a column's kept rows are
        split into row tiles of crossbar_rows, each converted separately **[assumption]**.
    cell_bits: bits per cell; the kernels support 2 only.
    lfsr_step_energy_pj: pJ per LFSR step, a ~10-flip-flop register **[assumption]**.
    skip_zero_tiles: no conversion for a row tile whose inputs are all 0 for that bit **[option]**.
    activation_bits: a, bits of the unsigned inputs, applied bit-serially **[assumption]**.
    """
    cell_energy_pj: tuple = (0.079, 0.36, 0.73, 1.49)
    adc_energy_pj: float = 0.208
    adc_bits: int = 0
    crossbar_rows: int = 128
    crossbar_cols: int = 128
    cell_bits: int = 2
    lfsr_step_energy_pj: float = 0.02
    skip_zero_tiles: bool = False
    activation_bits: int = 8

    def __post_init__(self):
        if not _is_int(self.cell_bits):
            raise NptwofoldError(f"cell_bits must be an integer, got {self.cell_bits!r}")
        if self.cell_bits != CELL_BITS:
            kind = "odd" if self.cell_bits % 2 else "unsupported"
            raise NptwofoldError(f"cell_bits={self.cell_bits} is {kind}: the CIM kernels support "
                                 f"only {CELL_BITS}-bit cells")
        for name, minimum, maximum in (("adc_bits", 0, None), ("crossbar_rows", 1, None),
                                       ("crossbar_cols", 1, None),
                                       ("activation_bits", 1, MAX_ACTIVATION_BITS)):
            value = getattr(self, name)
            if not _is_int(value):
                raise NptwofoldError(f"{name} must be an integer, got {value!r}")
            if value < minimum or (maximum is not None and value > maximum):
                upper = "" if maximum is None else f"..{maximum}"
                raise NptwofoldError(f"{name} must be in {minimum}{upper}, got {value}")
            object.__setattr__(self, name, int(value))  # NumPy integers would not reach JSON
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
                     ("lfsr_step_energy_pj", self.lfsr_step_energy_pj)]
        for name, energy in energies:
            real = isinstance(energy, (int, float, np.integer, np.floating))
            if (isinstance(energy, (bool, np.bool_)) or not real or not math.isfinite(energy)
                    or energy <= 0):
                raise NptwofoldError(f"{name} must be a positive number of pJ, got {energy!r}")
        # Frozen, so normalise through object.__setattr__: a JSON list then equals the tuple.
        object.__setattr__(self, "skip_zero_tiles", bool(self.skip_zero_tiles))
        object.__setattr__(self, "cell_energy_pj", tuple(float(e) for e in self.cell_energy_pj))
        for name in ("adc_energy_pj", "lfsr_step_energy_pj"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def cells_per_weight(self, weight_bits):
        """Cells of one b-bit weight; raises if b is invalid or a crossbar row cannot hold it."""
        cells = check_bits(weight_bits) // self.cell_bits
        if self.crossbar_cols < cells:
            raise NptwofoldError(f"a {weight_bits}-bit weight needs {cells} cells, more than "
                                 f"the crossbar's {self.crossbar_cols} columns")
        return cells

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
    adc_pj = counts.adc_conversions * config.adc_energy_pj
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
