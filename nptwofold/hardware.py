"""The CIM array a model is made for, and per-layer energy reports in picojoules.

`HardwareConfig` is the one carrier of the array's facts: the weight encoding, the weight and
activation bits, the crossbar size, the ADC, the energy table (the poster's numbers and the
assumed ones) and the device model (conductances, their spread, read noise and stuck-at cells,
`cim.variation`; ideal by default). It is declared with `options.option` like the training
options, nested in the training config (`TrainConfig.hardware`), stored in every checkpoint,
and the default of every tool that maps a model (`scripts/cim_eval.py`,
`scripts/adc_finetune.py`, `scripts/cim_mask_groups.py`) and of the energy regularizer. The
five knobs a study varies have flags of their own (`--weight-encoding`, `--weight-bits`,
`--activation-bits`, `--adc-bits`, `--adc-range`); the constants and the device model are set
with `--hw KEY=VALUE` or `--hw-config FILE`.
`resolve_hardware` applies them to a checkpoint's stored config and says what it used.

docs/cim-model.md explains each assumption.
"""
import dataclasses
import json
from pathlib import Path

from .errors import NptwofoldError
from .cim.adc import ADC_RANGES, adc_steps, check_adc_bits, conversion_energy_pj, needs_ranges
from .cim.device import (CELL_BITS, CELL_STATES, MAX_ACTIVATION_BITS, N_CELL_STATES,
                         outputs_per_tile)
from .cim.variation import (IDEAL_CONDUCTANCE, check_conductances, check_sigmas,
                            check_stuck_rates, describe_device)
from .kernels.quant import ENCODINGS
from .kernels.quant import check_bits
from .options import (Bound, above, add_flags, at_least, between, check_fields, flag_name,
                      given_values, option)

# word and bit lines of one crossbar at most: real RRAM crossbars have 64 to 1024; the tile
# buffers and the ADC histograms grow with them (100,000 rows ask for terabytes)
MAX_CROSSBAR_SIZE = 4096


def _check_cell_bits(bits):
    if bits != CELL_BITS:
        raise NptwofoldError(f"is {'odd' if bits % 2 else 'unsupported'}: the CIM kernels "
                             f"support only {CELL_BITS}-bit cells")


def _check_cell_energies(energies):
    if len(energies) != N_CELL_STATES:
        raise NptwofoldError(f"needs {N_CELL_STATES} energies (states {', '.join(CELL_STATES)}),"
                             f" got {len(energies)}")


@dataclasses.dataclass
class HardwareConfig:
    """The CIM array and its energy table; the defaults marked [assumption] are not the
    poster's. Each field is declared once, with its help and range (`options`)."""
    weight_encoding: str = option(
        "twos_complement", "how the array stores signed weights: twos_complement (with a sign "
        "column), offset_binary (reference column, offset removed digitally) or sign_magnitude "
        "(differential positive and negative columns); a twofold model's bit planes are trained "
        "and stored in it", choices=ENCODINGS)
    weight_bits: int = option(8, "weight precision b, even, 2..16 [assumption: 8]: the "
                              "twofold bit planes, or a float model quantized for the array",
                              check=check_bits)
    activation_bits: int = option(8, "a, bits of the array's unsigned inputs, applied "
                                  "bit-serially [assumption: 8]",
                                  between(1, MAX_ACTIVATION_BITS))
    adc_bits: int = option(0, "ADC resolution in bits; 0 = ideal (reads every partial sum)",
                           check=check_adc_bits)
    adc_range: str = option(
        "calibrated", "ADC full scale: calibrated = per layer and ADC channel, the "
        "adc_percentile-th percentile of the partial sums on calibration images; fixed = 0..3 x "
        "crossbar_rows for every column", choices=ADC_RANGES)
    adc_percentile: float = option(99.99, "percentile of the calibrated ADC ranges "
                                   "[assumption]", Bound(0, 100, low_open=True),
                                   flag=False)
    crossbar_rows: int = option(128, "word lines of one crossbar [assumption]",
                                between(1, MAX_CROSSBAR_SIZE), flag=False)
    crossbar_cols: int = option(128, "bit lines of one crossbar [assumption]",
                                between(1, MAX_CROSSBAR_SIZE), flag=False)
    cell_bits: int = option(CELL_BITS, "bits per cell (the kernels support 2 only)", at_least(1),
                            flag=False, check=_check_cell_bits)
    cell_energy_pj: list[float] = option([0.079, 0.36, 0.73, 1.49], "pJ per activated cell in "
                                         "state 00, 01, 10, 11 (poster)", above(0), flag=False,
                                         check=_check_cell_energies)
    adc_energy_pj: float = option(0.208, "pJ per conversion of an adc_reference_bits-bit ADC "
                                  "(poster)", above(0), flag=False)
    adc_reference_bits: int = option(8, "the ADC width that costs adc_energy_pj; an ideal ADC "
                                     "is charged at it [assumption]", at_least(1),
                                     flag=False)
    adc_energy_per_bit: float = option(2.0, "factor of the conversion energy per added bit "
                                       "[assumption: a SAR/flash ADC's energy roughly doubles "
                                       "per bit]", above(0), flag=False)
    lfsr_step_energy_pj: float = option(0.02, "pJ per LFSR step, a ~10-flip-flop register "
                                        "[assumption]", above(0), flag=False)
    skip_zero_tiles: bool = option(False, "no conversion for a row tile whose inputs are all 0 "
                                   "for that bit", flag=False)
    # the device model (cim/variation.py); the defaults are the ideal array
    cell_conductance: list[float] = option(
        list(IDEAL_CONDUCTANCE), "conductance of a cell in state 00, 01, 10, 11 in units of one "
        "state step (the ADC's unit), increasing; the first is the high-resistance state's "
        "G_off, whose nominal current the periphery subtracts per driven row", at_least(0),
        flag=False, check=check_conductances)
    conductance_sigma: list[float] = option(
        [0.0], "device-to-device spread: sigma of the lognormal factor (mean 1) of a cell's "
        "conductance, one for every state or one per state; drawn once per simulated chip",
        at_least(0), flag=False, check=check_sigmas)
    read_noise: float = option(0.0, "cycle-to-cycle read noise: sigma of a read's Gaussian "
                               "error relative to the cell's conductance, drawn per read",
                               at_least(0), flag=False)
    stuck_low_rate: float = option(0.0, "share of cells stuck in state 00 (drawn per chip)",
                                   between(0, 1), flag=False)
    stuck_high_rate: float = option(0.0, "share of cells stuck in state 11 (drawn per chip)",
                                    between(0, 1), flag=False)

    def __post_init__(self):
        check_fields(self)
        check_stuck_rates(self.stuck_low_rate, self.stuck_high_rate)

    def outputs_per_tile(self, weight_bits=None):
        """Output channels of b-bit weights (default: this array's) one column tile holds in
        this encoding: the mask group that makes masks cost nothing beyond their kept rows."""
        bits = self.weight_bits if weight_bits is None else weight_bits
        return outputs_per_tile(self.weight_encoding, bits, self.crossbar_cols)

    @property
    def adc_conversion_energy_pj(self):
        """pJ of one conversion at adc_bits (the reference width for an ideal ADC)."""
        return conversion_energy_pj(self.adc_bits, self.adc_energy_pj, self.adc_reference_bits,
                                    self.adc_energy_per_bit)

    @property
    def needs_adc_ranges(self):
        """True if the ADC is finite and calibrated: it needs the partial-sum ranges."""
        return needs_ranges(self.adc_bits, self.adc_range)

    def adc_for(self, crossbar, full_scale=None):
        """The `AdcSteps` of a crossbar (`cim.adc.adc_steps`; `full_scale` per ADC channel
        for a calibrated ADC)."""
        return adc_steps(crossbar, self.adc_bits, self.adc_range, full_scale)

    def to_dict(self):
        return dataclasses.asdict(self)

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


FLAGGED = tuple(field.name for field in dataclasses.fields(HardwareConfig)
                if field.metadata["flag"])


def hardware_overrides(pairs):
    """{key: value} of --hw KEY=VALUE flags, values parsed as JSON; a key with a flag of its
    own is refused, so that each field has one name on the command line."""
    overrides = {}
    known = [field.name for field in dataclasses.fields(HardwareConfig)]
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip()
        if not separator:
            raise NptwofoldError(f"--hw takes KEY=VALUE, got {pair!r}")
        if key in FLAGGED:
            raise NptwofoldError(f"--hw {key}: use {flag_name(key)}")
        if key not in known:
            raise NptwofoldError(f"unknown hardware config keys ['{key}']; known keys: {known}")
        try:
            overrides[key] = json.loads(text)
        except ValueError:
            raise NptwofoldError(f"--hw {key}: {text!r} is not a JSON value") from None
    return overrides


def add_hardware_flags(parser, skip=(), shown_default=None):
    """The flags of the array: one per flagged field (except `skip`, which a script declares
    its own way), --hw KEY=VALUE and --hw-config FILE. `shown_default` is what the help says an
    omitted flag means (default: the field's default)."""
    group = parser.add_argument_group(
        "the CIM array" + (f" (an omitted flag means {shown_default})" if shown_default else ""))
    defaults = None if shown_default is None else {
        name: shown_default for name in FLAGGED}
    add_flags(group, HardwareConfig, skip=skip, shown_defaults=defaults)
    group.add_argument("--hw", action="append", default=[], metavar="KEY=VALUE",
                       help="set a constant of the array (crossbar_rows, cell_energy_pj, "
                       "adc_energy_pj, ...; see docs/cim-model.md), the value in JSON; "
                       "repeatable, e.g. --hw crossbar_rows=256 --hw "
                       "'cell_energy_pj=[0.08,0.36,0.73,1.49]' (default: none)")
    group.add_argument("--hw-config", metavar="FILE", help="a JSON file of hardware fields, "
                       "applied before --hw and the flags (default: none)")
    return group


def given_hardware(args, skip=()):
    """{field: value} the command line sets: the --hw-config file, then the --hw pairs, then
    the flags of `add_hardware_flags`."""
    given = {}
    if args.hw_config:
        given.update(HardwareConfig.from_json(args.hw_config).to_dict())
    given.update(hardware_overrides(args.hw))
    given.update(given_values(args, HardwareConfig, skip=skip))
    return given


def resolve_hardware(stored, given, where="the checkpoint"):
    """(HardwareConfig, notes) of a run: `given` ({field: value}, `given_hardware`) over the
    `stored` config (a checkpoint's). Each note names a given value that contradicts the
    stored one."""
    settings = stored.to_dict()
    hardware = HardwareConfig.from_json({**settings, **given})  # validates keys and values
    notes = [f"{flag_name(key) if key in FLAGGED else '--hw ' + key} "
             f"{_shown(getattr(hardware, key))} overrides {where}'s {_shown(settings[key])}"
             for key in given if getattr(hardware, key) != settings[key]]
    return hardware, notes


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def describe(hardware):
    """One line naming the array a run used."""
    return (f"{hardware.weight_encoding}, {hardware.weight_bits}-bit weights, "
            f"{hardware.activation_bits}-bit inputs, {hardware.crossbar_rows}x"
            f"{hardware.crossbar_cols} crossbars, "
            + (f"{hardware.adc_bits}-bit {hardware.adc_range} ADC" if hardware.adc_bits
               else "ideal ADC") + describe_device(hardware))
