"""The array's device: 2-bit cells, their states, and how each signed-weight encoding lays a
weight onto cells.

Signed-weight encodings (M = b/2 cells per magnitude; cell m holds bits (2m+1, 2m) of an
unsigned code as state 2 B(2m+1) + B(2m), 00..11):
- twos_complement: M columns hold the b-bit two's complement code u = q mod 2^b read as
  unsigned (weight 4^m), and one sign column holds 01 where q < 0 (weight -2^b): u - 2^b
  [q < 0] = q. M + 1 columns per channel.
- offset_binary (NeuroSim's weight shift): M columns hold u = q + 2^(b-1) (weight 4^m); one
  reference column per column tile holds 10 on every stored row at the top significance (weight
  -4^(M-1)), so its reading, 2 x (driven rows), removes the offset 2^(b-1) of every driven row
  from all the tile's channels. A pruned weight is stored as the offset (top cell 10).
- sign_magnitude (differential): a positive and a negative group of M columns each hold |q|
  (weights +4^m and -4^m); the idle one stores 00. 2M columns per channel.

Each kind of column is one ADC channel (`adc_channels`): the ADC ranges are calibrated per
channel. The cell energies per state are `HardwareConfig.cell_energy_pj`; the energy of a
level is `kernels.energy.level_energy_table`.
"""
import numpy as np

from ..errors import NptwofoldError
from ..kernels.quant import ENCODINGS, check_bits

CELL_BITS = 2

CELL_STATES = ("00", "01", "10", "11")

N_CELL_STATES = len(CELL_STATES)

MAX_CELL_STATE = N_CELL_STATES - 1
# bits of the array's unsigned inputs, applied bit-serially
MAX_ACTIVATION_BITS = 16


def cells_per_magnitude(bits):
    return check_bits(bits) // CELL_BITS


def adc_channels(encoding, bits):
    """Names of the ADC calibration channels of an encoding (one per kind of column)."""
    cells = range(cells_per_magnitude(bits))
    if encoding == "twos_complement":
        return [f"code{m}" for m in cells] + ["sign"]
    if encoding == "offset_binary":
        return [f"code{m}" for m in cells] + ["reference"]
    if encoding == "sign_magnitude":
        return [f"positive{m}" for m in cells] + [f"negative{m}" for m in cells]
    raise NptwofoldError(f"unknown weight encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def columns_per_output(encoding, bits):
    """(columns per output channel, shared columns per column tile) of an encoding."""
    cells = cells_per_magnitude(bits)
    adc_channels(encoding, bits)  # rejects an unknown encoding
    return {"twos_complement": (cells + 1, 0), "offset_binary": (cells, 1),
            "sign_magnitude": (2 * cells, 0)}[encoding]


def outputs_per_tile(encoding, bits, crossbar_cols):
    """Output channels one column tile holds; raises if not even one fits."""
    per_output, shared = columns_per_output(encoding, bits)
    outputs = (crossbar_cols - shared) // per_output
    if outputs < 1:
        raise NptwofoldError(f"a {bits}-bit weight in {encoding} needs {per_output + shared} "
                             f"columns, more than the crossbar's {crossbar_cols}")
    return outputs


def _cell_states(codes, bits):
    """(M, *shape) states of unsigned codes, cell m = bits (2m+1, 2m)."""
    shifts = CELL_BITS * np.arange(cells_per_magnitude(bits)).reshape(-1, *[1] * codes.ndim)
    return ((codes[None] >> shifts) & MAX_CELL_STATE).astype(np.uint8)


def encoded_columns(levels, encoding, bits):
    """Per output channel, its columns' states (C, per_output, R), coefficients and channels."""
    cells = cells_per_magnitude(bits)
    q = levels.T.astype(np.int64)  # (C, R)
    significance = 4 ** np.arange(cells, dtype=np.int64)
    if encoding == "twos_complement":
        states = np.concatenate([_cell_states(q & ((1 << bits) - 1), bits),
                                 (q < 0)[None].astype(np.uint8)])
        coefficient = np.append(significance, -(1 << bits))
    elif encoding == "offset_binary":
        states = _cell_states(q + (1 << (bits - 1)), bits)
        coefficient = significance
    else:
        states = np.concatenate([_cell_states(np.where(q > 0, q, 0), bits),
                                 _cell_states(np.where(q < 0, -q, 0), bits)])
        coefficient = np.concatenate([significance, -significance])
    return states.transpose(1, 0, 2), coefficient, np.arange(len(coefficient))


def weight_cells(levels, bits, encoding):
    """(columns per weight, *levels.shape) uint8: the state of the cell each of a weight's
    columns holds on the weight's row (offset binary's shared reference column left out)."""
    levels = np.asarray(levels)
    states = encoded_columns(levels.reshape(-1, 1), encoding, check_bits(bits))[0][0]
    return np.ascontiguousarray(states.reshape((-1,) + levels.shape))
