"""The --method presets of the twofold pipeline and the tile-sized mask group they use."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from nptwofold.config import METHODS
from nptwofold.model import ResNet20

from helpers import REPO, twofold_of
from test_reliability import pipeline_phases


def settings_of(config):
    """{field: value} of a phase's twofold and hardware configs together."""
    return {**dataclasses.asdict(config.twofold), **dataclasses.asdict(config.hardware)}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_method_sets_its_values_in_both_trained_phases(method, tmp_path):
    phases = dict(pipeline_phases(tmp_path, "--init", "base.h5", "--method", method))
    twofold, post = phases[tmp_path / "twofold"], phases[tmp_path / "post"]
    wanted = {**METHODS[method]["twofold"], **METHODS[method]["hardware"]}
    for config in (twofold, post):
        settings = settings_of(config)
        assert {key: settings[key] for key in wanted if key != "beta_bit"} == {
            key: value for key, value in wanted.items() if key != "beta_bit"}
    assert twofold.twofold.beta_bit == wanted["beta_bit"]
    finetune_beta = METHODS[method]["pipeline"]["finetune_beta_bit"]
    assert post.twofold.beta_bit == (wanted["beta_bit"] if finetune_beta is None
                                     else finetune_beta)


def test_a_flag_beside_a_method_overrides_only_its_own_value(tmp_path):
    phases = dict(pipeline_phases(tmp_path, "--init", "base.h5", "--method", "energy",
                                  "--lambda-energy", "4", "--weight-encoding",
                                  "twos_complement"))
    config = phases[tmp_path / "twofold"]
    assert config.twofold.lambda_energy == 4
    assert config.hardware.weight_encoding == "twos_complement"
    assert config.twofold.energy_rounding == METHODS["energy"]["twofold"]["energy_rounding"]


def test_finetune_lr_sets_only_the_fine_tunes_peak(tmp_path):
    flags = ("--init", "base.h5", "--twofold-lr", "0.05")
    phases = dict(pipeline_phases(tmp_path, *flags))
    assert phases[tmp_path / "twofold"].lr == phases[tmp_path / "post"].lr == 0.05
    phases = dict(pipeline_phases(tmp_path, *flags, "--finetune-lr", "0.005"))
    assert phases[tmp_path / "twofold"].lr == 0.05 and phases[tmp_path / "post"].lr == 0.005


def test_no_method_leaves_every_default(tmp_path):
    from nptwofold.twofold import TwofoldConfig

    phases = dict(pipeline_phases(tmp_path, "--init", "base.h5"))
    assert phases[tmp_path / "twofold"].twofold == TwofoldConfig()


def test_method_belongs_to_the_twofold_preset():
    result = subprocess.run([sys.executable, "scripts/train_cifar.py", "--preset", "quick",
                             "--method", "energy"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "--method" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("encoding", ["sign_magnitude", "twos_complement"])
def test_mask_group_zero_is_one_column_tile_of_output_channels(encoding):
    bits, columns = 8, 128
    # columns one output channel takes: b/2 cells, twice (positive and negative) in
    # sign-magnitude, plus a sign column in two's complement
    per_channel = bits if encoding == "sign_magnitude" else bits // 2 + 1
    tile = columns // per_channel
    model = ResNet20(np.random.default_rng(0))
    method = twofold_of(model, sparsity=0.5, mask_group=0, weight_encoding=encoding,
                        weight_bits=bits, crossbar_cols=columns)
    for name, mask in method.masks.items():
        assert mask.group == tile, name
        keep = mask.mask.T  # (Cout, rows)
        for start in range(0, keep.shape[0], tile):
            block = keep[start:start + tile]
            assert (block == block[0]).all(), name  # one index set per tile
        if keep.shape[0] > tile:
            assert not (keep[0] == keep[tile]).all(), name  # tiles draw their own sets


def test_mask_group_zero_follows_the_crossbar_width():
    model = ResNet20(np.random.default_rng(0))
    method = twofold_of(model, sparsity=0.5, mask_group=0, weight_encoding="sign_magnitude",
                        crossbar_cols=64)
    assert {mask.group for mask in method.masks.values()} == {64 // 8}


def test_unknown_method_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/train_cifar.py", "--preset", "twofold",
                             "--method", "magic", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "magic" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_phase_stores_the_previous_phase_as_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    phases = dict(pipeline_phases(tmp_path / "runs/tf", "--init", "base.h5"))
    assert phases[tmp_path / "runs/tf/twofold"].init == "base.h5"
    assert phases[tmp_path / "runs/tf/post"].init == "runs/tf/twofold/last.h5"
