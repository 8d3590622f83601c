"""The device model of the array's cells, and one simulated chip drawn from it
(docs/cim-model.md, "Device model").

A cell in state s conducts G_s (`HardwareConfig.cell_conductance`, in units of one state step,
the unit the ADC reads; ideal: 0, 1, 2, 3). A real chip differs from the nominal array in three
ways, all set in the `HardwareConfig`:
- stuck-at faults: a share of the cells is stuck in state 00 (`stuck_low_rate`) or 11
  (`stuck_high_rate`) whatever is written;
- device-to-device spread: a cell's conductance is G_s L, L lognormal of mean 1 with the
  state's sigma (`conductance_sigma`), L = exp(sigma z - sigma^2 / 2), z ~ N(0, 1). It scales
  the conductance, so a state of conductance 0 stays an open cell; a high-resistance state that
  varies is a G_off = cell_conductance[0] > 0;
- cycle-to-cycle read noise: each read of a cell adds G rho z' (`read_noise` = rho).
Stuck states and spreads are drawn once per chip (`Chip`, from its seed); read noise per read.

A column's partial sum is the current of its driven cells: S = sum over driven rows of
(G - G_off), plus the reads' noise. The periphery knows how many rows it drives (the input
bits), so it subtracts their nominal off-current G_off per driven row before the ADC: with the
nominal conductances G_s = G_off + s, S is the ideal array's partial sum, and only the spread of
the off cells remains. The read noise of a column is a sum of independent Gaussians over its
driven cells, so it is one Gaussian of variance rho^2 sum (G^2) over them: the simulation draws
one number per partial sum from that variance (a second matmul, of the input bits with G^2),
which has exactly the distribution of the per-cell draws.

The ADC ranges stay those calibrated on the nominal array: a design setting, not redone per
chip. An ideal ADC (`adc_bits` 0) reads the analog sum as it is; a finite one rounds it to its
steps and clips it to 0..top.
"""
import numpy as np

from ..errors import NptwofoldError
from ..kernels.cim_analog import analog_kernel
from ..threads import CHUNK_IMAGES, run_parallel
from .adc import IDEAL_TOP_CODE
from .device import CELL_STATES, MAX_CELL_STATE, N_CELL_STATES

IDEAL_CONDUCTANCE = (0.0, 1.0, 2.0, 3.0)


def check_conductances(values):
    """The per-state conductances: one per state, strictly increasing."""
    if len(values) != N_CELL_STATES:
        raise NptwofoldError(f"needs {N_CELL_STATES} conductances (states "
                             f"{', '.join(CELL_STATES)}), got {len(values)}")
    if any(high <= low for low, high in zip(values, values[1:])):
        raise NptwofoldError("must increase from state 00 to state 11")


def check_sigmas(values):
    """One lognormal sigma for every state, or one per state."""
    if len(values) not in (1, N_CELL_STATES):
        raise NptwofoldError(f"needs 1 sigma (every state) or {N_CELL_STATES} (states "
                             f"{', '.join(CELL_STATES)}), got {len(values)}")


def check_stuck_rates(low, high):
    if low + high > 1:
        raise NptwofoldError(f"stuck_low_rate + stuck_high_rate must be <= 1 (got {low} + "
                             f"{high})")


def state_sigmas(hardware):
    """(4,) the lognormal sigma of each state."""
    return np.broadcast_to(np.asarray(hardware.conductance_sigma, np.float64),
                           N_CELL_STATES).copy()


def is_ideal_device(hardware):
    """True if every chip is the nominal array: ideal conductances, no spread, noise or fault."""
    return (tuple(hardware.cell_conductance) == IDEAL_CONDUCTANCE
            and not any(hardware.conductance_sigma) and not hardware.read_noise
            and not hardware.stuck_low_rate and not hardware.stuck_high_rate)


def describe_device(hardware):
    """'' for the ideal device, else '; device: ...' naming what differs from it."""
    if is_ideal_device(hardware):
        return ""
    parts = []
    if tuple(hardware.cell_conductance) != IDEAL_CONDUCTANCE:
        parts.append("G " + " ".join(f"{g:g}" for g in hardware.cell_conductance))
    if any(hardware.conductance_sigma):
        parts.append("sigma " + " ".join(f"{100 * s:g} %" for s in hardware.conductance_sigma))
    if hardware.read_noise:
        parts.append(f"read noise {100 * hardware.read_noise:g} %")
    if hardware.stuck_low_rate or hardware.stuck_high_rate:
        parts.append(f"stuck at 00 / 11 {100 * hardware.stuck_low_rate:g} / "
                     f"{100 * hardware.stuck_high_rate:g} %")
    return "; device: " + ", ".join(parts)


def cell_error_moments(hardware):
    """((4,), (4,)) per written state s: the mean and variance over chips of a cell's error,
    (G - G_off) - s, what the column reads of it less its ideal value (read noise aside). The
    cell is stuck low, stuck high or holds s, then G = G_state L with E[L] = 1 and
    Var[L] = exp(sigma^2) - 1."""
    nominal = np.asarray(hardware.cell_conductance, np.float64)
    spread = np.expm1(state_sigmas(hardware) ** 2)
    low, high = hardware.stuck_low_rate, hardware.stuck_high_rate
    held = np.arange(N_CELL_STATES)
    mean, second = np.zeros(N_CELL_STATES), np.zeros(N_CELL_STATES)
    for chance, state in ((low, np.zeros_like(held)), (high, np.full_like(held, MAX_CELL_STATE)),
                          (1 - low - high, held)):
        offset = nominal[state] - nominal[0] - held
        mean += chance * offset
        second += chance * (offset ** 2 + nominal[state] ** 2 * spread[state])
    return mean, second - mean ** 2


def per_weight(crossbar, per_cell):
    """(C, R): per output channel and matrix row, the sum over that weight's cells of a (K, R)
    per-cell value; a tile's shared reference column (offset binary) counts for every channel
    of the tile."""
    totals = np.zeros((crossbar.n_outputs, crossbar.n_rows))
    own = crossbar.output_of >= 0
    np.add.at(totals, crossbar.output_of[own], per_cell[own])
    tile_of_output = np.arange(crossbar.n_outputs) // crossbar.outputs_per_tile
    for column in np.flatnonzero(~own):
        totals[tile_of_output == crossbar.column_tile[column]] += per_cell[column]
    return totals


def relative_weight_error(crossbars, hardware):
    """The RMS error of the weights (integer levels) that a chip of `hardware` reads from these
    crossbars over the RMS of the weights, expected over chips, all layers pooled: sqrt(sum
    E[e^2]) / sqrt(sum q^2). A weight's error is the sum of its cells' errors times their
    columns' coefficients c, independent between cells, so E[e^2] = (sum c m)^2 + sum c^2 v
    with (m, v) the cell's `cell_error_moments`. Read noise and the ADC are left out."""
    cell_mean, cell_variance = cell_error_moments(hardware)
    squared_error = squared_level = 0.0
    for crossbar in crossbars:
        exists = crossbar.stored[crossbar.column_tile]
        coefficient = crossbar.coefficient[:, None].astype(np.float64)
        mean = per_weight(crossbar, np.where(exists, coefficient * cell_mean[crossbar.cells], 0))
        variance = per_weight(crossbar, np.where(
            exists, coefficient ** 2 * cell_variance[crossbar.cells], 0))
        squared_error += float((mean ** 2 + variance).sum())
        squared_level += float((per_weight(crossbar, coefficient * crossbar.cells) ** 2).sum())
    return float(np.sqrt(squared_error / squared_level)) if squared_level else 0.0


class ChipCrossbar:
    """One layer's crossbars on one chip: the states its cells hold (stuck ones forced) and
    their drawn conductances, and the bit-serial array output computed with them.

    The crossbars are grouped by the rows they store (every column tile of a dense layer
    stores the same rows): a group is one row tile of column tiles that store the same rows, with
    its (rows, columns) matrices of G - G_off and G^2, so an input bit's partial sums are the sum
    of the matrix rows it drives (`kernels.cim_analog`).
    """

    def __init__(self, crossbar, hardware, seed):
        rng = np.random.default_rng(seed)
        self.crossbar = crossbar
        self.seed = tuple(seed)
        exists = crossbar.stored[crossbar.column_tile]  # (K, R): the physical cells
        draw = rng.random(crossbar.cells.shape)
        spread = rng.standard_normal(crossbar.cells.shape)
        low, high = hardware.stuck_low_rate, hardware.stuck_high_rate
        states = np.where(draw < low, 0, np.where(draw < low + high, MAX_CELL_STATE,
                                                  crossbar.cells))
        self.states = np.where(exists, states, 0).astype(np.uint8)
        nominal = np.asarray(hardware.cell_conductance, np.float64)
        sigma = state_sigmas(hardware)[self.states]
        # (K, R) float64: each physical cell's conductance on this chip, 0 where no cell
        self.conductance = np.where(
            exists, nominal[self.states] * np.exp(sigma * spread - sigma ** 2 / 2), 0.0)
        self.read_noise = hardware.read_noise
        excess = np.where(exists, self.conductance - nominal[0], 0.0)
        self.groups = []  # (rows, columns, G - G_off, G^2) per group of crossbars
        for rows_stored, tiles in _row_sets(crossbar):
            columns = np.flatnonzero(np.isin(crossbar.column_tile, tiles))
            for first in range(0, rows_stored.size, crossbar.rows_per_tile):
                rows = rows_stored[first:first + crossbar.rows_per_tile]
                self.groups.append((rows, columns,
                                    np.ascontiguousarray(excess[columns][:, rows].T, np.float32),
                                    np.ascontiguousarray(
                                        self.conductance[columns][:, rows].T ** 2, np.float32)))

    def codes(self, x, activation_bits, adc, first_image, n_images):
        """(P, K) float64: per physical column, sum_j 2^j sum_t code(S[t, j]) of integer inputs
        x (P, R) of `n_images` images (positions image by image), the first of which is image
        `first_image` of the run: the read noise of an image is drawn from (chip seed, layer,
        image), so results depend neither on the batches nor on the thread count."""
        ideal = bool(np.all(adc.top == IDEAL_TOP_CODE))
        x = np.asarray(x).astype(np.int32)
        per_image = x.shape[0] // n_images
        codes = np.zeros((x.shape[0], self.crossbar.n_columns))
        chunks = range(0, n_images, CHUNK_IMAGES)

        def run_chunk(index):
            images = range(chunks[index], min(chunks[index] + CHUNK_IMAGES, n_images))
            positions = slice(images[0] * per_image, (images[-1] + 1) * per_image)
            rngs = [np.random.default_rng((*self.seed, first_image + image)) for image in images]
            self._chunk(x[positions], activation_bits, adc, ideal, rngs, codes[positions])

        run_parallel(run_chunk, len(chunks))
        return codes

    @staticmethod
    def _noise(rngs, shape):
        """Standard normal draws of `shape`, the positions' axis (0) image by image."""
        per_image = shape[0] // len(rngs)
        return np.concatenate([rng.standard_normal((per_image, *shape[1:]), np.float32)
                               for rng in rngs])

    def _chunk(self, x, activation_bits, adc, ideal, rngs, codes):
        noisy = self.read_noise > 0
        for rows, columns, excess, squared in self.groups:
            if ideal:  # linear: sum_j 2^j S_j = x @ (G - G_off); noise variance sum_j 4^j ...
                inputs = x[:, rows]
                sums = inputs.astype(np.float64) @ excess
                if noisy:
                    weights = sum(((inputs >> j) & 1).astype(np.float64) * 4.0 ** j
                                  for j in range(activation_bits))
                    sums += self.read_noise * np.sqrt(weights @ squared) * self._noise(
                        rngs, sums.shape)
                codes[:, columns] += sums
                continue
            noise = (self._noise(rngs, (len(x), activation_bits, columns.size)) if noisy
                     else np.zeros((0, 0, 0), np.float32))
            analog_kernel(activation_bits)(x, rows, excess, squared, noise, self.read_noise,
                                           columns, adc.step, adc.top, codes)


def _row_sets(crossbar):
    """[(stored rows ascending, column tiles that store exactly them)] of a crossbar."""
    tiles_of = {}
    for tile, stored in enumerate(crossbar.stored):
        tiles_of.setdefault(stored.tobytes(), []).append(tile)
    return [(np.flatnonzero(crossbar.stored[tiles[0]]), tiles) for tiles in tiles_of.values()]


class Chip:
    """One simulated chip of a mapped network: a `ChipCrossbar` per layer, drawn from (*seed,
    layer index), `seed` an int or a tuple of ints; `images_read` numbers the images its runs
    have read, for the read noise."""

    def __init__(self, crossbars, hardware, seed):
        self.seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
        self.layers = {name: ChipCrossbar(crossbar, hardware, (*self.seed, index))
                       for index, (name, crossbar) in enumerate(crossbars.items())}
        self.images_read = 0
