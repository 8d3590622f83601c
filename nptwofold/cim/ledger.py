"""The energy ledger: the integer events of the runs so far, per layer, of a design and its
dense baseline, and their price in picojoules.

`layer_energy_report` turns the event counts of `kernels.cim_events` into pJ with the
`HardwareConfig`'s table: counts times table entries, so equal counts always give equal
energies.
"""
from ..kernels.cim_events import EnergyCounts
from .device import CELL_STATES


class EnergyLedger:
    """Energy events of the runs so far, per layer, of the design and its dense baseline."""

    def __init__(self, names):
        self.n_images = 0
        self.design = {name: EnergyCounts.zero() for name in names}
        self.baseline = {name: EnergyCounts.zero() for name in names}

    def add(self, name, design, baseline):
        self.design[name] += design
        self.baseline[name] += baseline


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
