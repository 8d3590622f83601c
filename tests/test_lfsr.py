"""LFSR keep-masks against slow plain-Python references of the SPEC section 4 rule."""

import math

import numpy as np
import pytest

from nptwofold.errors import NptwofoldError
from nptwofold.kernels.lfsr import (
    LFSR_TAPS, feedback_mask, lfsr_keep_mask, lfsr_keep_mask_for_kept, lfsr_step,
    lfsr_width_for_rows, weight_mask)


def reference_step(state, width, taps):
    """Shift Q_i -> Q_{i+1} (Q_i is bit i-1), drop Q_n, feed the XOR of tapped stages to Q_1."""
    feedback = 0
    for tap in taps:
        feedback ^= (state >> (tap - 1)) & 1
    return ((state << 1) & ((1 << width) - 1)) | feedback


def reference_kept_rows(n_rows, n_cols, kept, seed, group, width, taps):
    """Per-column kept rows and step count, walking the sequence state by state."""
    n_groups = -(-n_cols // group)
    sequence, steps, state = [], 0, seed
    while len(sequence) < n_groups * kept:
        steps += 1
        if state - 1 < n_rows:
            sequence.append(state - 1)
        state = reference_step(state, width, taps)
    per_column = [sequence[(c // group) * kept:(c // group + 1) * kept] for c in range(n_cols)]
    return per_column, steps


def reference_mask(n_rows, per_column):
    mask = np.zeros((n_rows, len(per_column)), np.uint8)
    for column, rows in enumerate(per_column):
        for row in rows:
            mask[row, column] = 1
    return mask


def prime_factors(value):
    factors, divisor = [], 2
    while divisor * divisor <= value:
        if value % divisor == 0:
            factors.append(divisor)
            while value % divisor == 0:
                value //= divisor
        divisor += 1
    return factors + ([value] if value > 1 else [])


def transition_matrix(width, taps):
    """GF(2) matrix of one reference step: column j is the successor of unit state 2^j."""
    matrix = np.zeros((width, width), np.int64)
    for j in range(width):
        successor = reference_step(1 << j, width, taps)
        matrix[:, j] = [(successor >> i) & 1 for i in range(width)]
    return matrix


def matrix_power_gf2(matrix, exponent):
    result = np.eye(len(matrix), dtype=np.int64)
    while exponent:
        if exponent & 1:
            result = result @ matrix % 2
        matrix = matrix @ matrix % 2
        exponent >>= 1
    return result


@pytest.mark.parametrize("width", range(2, 21))
def test_taps_have_full_period_by_enumeration(width):
    taps = LFSR_TAPS[width]
    seen = bytearray(1 << width)
    state = 1
    for _ in range((1 << width) - 1):
        assert 1 <= state < 1 << width and not seen[state]
        seen[state] = 1
        state = reference_step(state, width, taps)
    assert state == 1


@pytest.mark.parametrize("width", range(2, 33))
def test_taps_are_primitive_by_matrix_order(width):
    taps = LFSR_TAPS[width]
    assert taps[0] == width and all(1 <= t <= width for t in taps)
    period = (1 << width) - 1
    matrix = transition_matrix(width, taps)
    identity = np.eye(width, dtype=np.int64)
    assert np.array_equal(matrix_power_gf2(matrix, period), identity)
    for factor in prime_factors(period):
        assert not np.array_equal(matrix_power_gf2(matrix, period // factor), identity)


@pytest.mark.parametrize("width", range(21, 33))
def test_wide_taps_do_not_return_early(width):
    taps, state, seen = LFSR_TAPS[width], 1, set()
    for _ in range(1 << 14):
        assert state not in seen
        seen.add(state)
        state = reference_step(state, width, taps)


def test_numba_step_matches_reference():
    rng = np.random.default_rng(0)
    for width, taps in LFSR_TAPS.items():
        feedback = feedback_mask(taps)
        for state in rng.integers(1, 1 << width, size=50):
            assert lfsr_step(int(state), width, feedback) == reference_step(int(state), width, taps)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 7, 8, 27, 144, 576, 2**31, 2**32 - 1])
def test_width_for_rows_is_smallest_fit(n_rows):
    width = lfsr_width_for_rows(n_rows)
    assert width >= 2 and 2**width - 1 >= n_rows
    assert width == 2 or 2**(width - 1) - 1 < n_rows


def test_width_for_rows_rejects_out_of_range():
    with pytest.raises(NptwofoldError, match="row"):
        lfsr_width_for_rows(0)
    with pytest.raises(NptwofoldError, match="wider than 32"):
        lfsr_width_for_rows(2**32)


CASES = [  # (R, C, sparsity, seed, group)
    (27, 16, 0.5, 1, 1),
    (144, 32, 0.7, 99, 1),
    (576, 64, 0.9, 346, 4),
    (64, 10, 0.3, 5, 3),       # last group has 1 column
    (10, 8, 0.5, 3, 1),        # C*k > R: the sequence wraps round its period
    (127, 5, 0.0, 77, 2),      # R = 2^n - 1: no rejection
    (1, 4, 0.0, 2, 1),         # R = 1
]


@pytest.mark.parametrize("n_rows, n_cols, sparsity, seed, group", CASES)
def test_mask_matches_reference(n_rows, n_cols, sparsity, seed, group):
    result = lfsr_keep_mask(n_rows, n_cols, sparsity, seed, group=group)
    kept = n_rows - math.floor(sparsity * n_rows + 0.5)
    assert result.kept == kept
    assert result.width == lfsr_width_for_rows(n_rows) and result.taps == LFSR_TAPS[result.width]

    per_column, steps = reference_kept_rows(n_rows, n_cols, kept, seed, group, result.width,
                                            result.taps)
    assert result.mask.shape == (n_rows, n_cols) and result.mask.dtype == np.uint8
    assert np.array_equal(result.mask, reference_mask(n_rows, per_column))
    assert result.steps == steps
    n_groups = -(-n_cols // group)
    assert result.kept_rows.shape == (n_groups, kept)
    for column in range(n_cols):
        assert list(result.kept_rows[column // group]) == per_column[column]

    assert np.all(result.mask.sum(axis=0) == kept)
    for column in range(n_cols):
        assert len(set(per_column[column])) == kept
        first_of_group = column - column % group
        assert np.array_equal(result.mask[:, column], result.mask[:, first_of_group])


@pytest.mark.parametrize("n_rows, n_cols, sparsity, seed, group", CASES)
def test_mask_regenerates_from_stored_parameters(n_rows, n_cols, sparsity, seed, group):
    result = lfsr_keep_mask(n_rows, n_cols, sparsity, seed, group=group)
    again = lfsr_keep_mask_for_kept(n_rows, n_cols, result.kept, result.seed, result.group,
                                    result.width, result.taps)
    assert np.array_equal(again.mask, result.mask)
    assert np.array_equal(again.kept_rows, result.kept_rows)
    assert again.steps == result.steps


def test_full_period_visits_every_row_once():
    result = lfsr_keep_mask(255, 1, 0.0, 200)
    assert sorted(result.kept_rows[0]) == list(range(255))
    assert result.steps == 255


def test_rounding_is_half_up_not_to_even():
    # 9 * 0.5 = 4.5 rounds up to 5 (banker's rounding would give 4), so k = 4.
    assert lfsr_keep_mask(9, 3, 0.5, 1).kept == 4
    # 576 * 0.95 = 547.2 rounds to 547, so k = 29.
    assert lfsr_keep_mask(576, 3, 0.95, 1).mask.sum(axis=0).tolist() == [29, 29, 29]


def test_zero_sparsity_keeps_everything():
    assert lfsr_keep_mask(27, 16, 0.0, 9).mask.all()
    assert lfsr_keep_mask(1, 3, 0.4, 1).mask.all()  # round(0.4) = 0: R = 1 keeps its row


def test_sparsity_that_keeps_nothing_is_an_error():
    with pytest.raises(NptwofoldError, match="keeps no row"):
        lfsr_keep_mask(1, 3, 0.5, 1)


def test_user_taps_and_wider_width():
    # x^4 + x + 1 (taps 4,1) is primitive too; width 8 for 20 rows is allowed.
    per_column, steps = reference_kept_rows(10, 3, 5, 3, 1, 4, (4, 1))
    result = lfsr_keep_mask(10, 3, 0.5, 3, taps=[1, 4])
    assert result.taps == (4, 1) and result.steps == steps
    assert np.array_equal(result.mask, reference_mask(10, per_column))
    assert lfsr_keep_mask(20, 3, 0.5, 3, width=8).width == 8


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=float("nan")), "sparsity must be in"),
    (dict(width=1), "width"),
    (dict(width=33), "width"),
    (dict(width=4), "too small"),  # 4 bits hold only 15 of the 27 rows
    (dict(seed=0), "seed"),
    (dict(seed=32), "seed"),       # width 5 for 27 rows: states 1..31
    (dict(taps=(5, 4, 3, 2, 1)), "not maximal"),  # x = 1 is a root of 1+x+...+x^5
    (dict(taps=(4, 3)), "include the width"),
    (dict(taps=()), "include the width"),
    (dict(taps=(6, 5)), "1..5"),
    (dict(taps=(5, 0)), "1..5"),
    (dict(group=0), "group"),
    (dict(n_rows=0), "at least 1"),
    (dict(n_cols=0), "at least 1"),
])
def test_bad_values_raise(kwargs, message):
    args = dict(n_rows=27, n_cols=8, sparsity=0.5, seed=1) | kwargs
    with pytest.raises(NptwofoldError, match=message):
        lfsr_keep_mask(**args)


def test_bad_stored_kept_raises():
    with pytest.raises(NptwofoldError, match="rows kept"):
        lfsr_keep_mask_for_kept(27, 8, 28, 1)
    with pytest.raises(NptwofoldError, match="rows kept"):
        lfsr_keep_mask_for_kept(27, 8, 0, 1)


def test_weight_mask_follows_pytorch_flatten_order():
    out_ch, in_ch, kh, kw = 5, 3, 3, 2
    mask = lfsr_keep_mask(in_ch * kh * kw, out_ch, 0.5, 7).mask
    conv = weight_mask(mask, (out_ch, in_ch, kh, kw))
    for o in range(out_ch):
        for i in range(in_ch):
            for y in range(kh):
                for x in range(kw):
                    assert conv[o, i, y, x] == mask[(i * kh + y) * kw + x, o]
    fc = weight_mask(mask, (out_ch, in_ch * kh * kw))
    assert all(fc[o, r] == mask[r, o] for o in range(out_ch) for r in range(in_ch * kh * kw))
