"""Compact checkpoints (scripts/export_model.py): the same model, logits and CIM figures as
the full checkpoint they are exported from, a fine-tune start but no resume, and a bad compact
file refused in one line."""
import json

import h5py
import numpy as np
import pytest

from helpers import REPO, assert_one_line_error, run, state_of
from nptwofold.build import build_model, load_model
from nptwofold.checkpoint import load_checkpoint, save_compact
from nptwofold.config import TrainConfig
from nptwofold.errors import NptwofoldError
from nptwofold.train import Trainer

ENCODINGS = ("twos_complement", "sign_magnitude")
COMMON = dict(epochs=1, batch_size=16, eval_batch_size=10, warmup_epochs=0, seed=4)
TWOFOLD = dict(sparsity=0.5, lambda_net=0.5, beta_bit=5.0)


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory):
    """{run: (full checkpoint, its compact export)} of a tiny float baseline and, from it, a
    finished Twofold run (twofold phase, then post-training with the precision adjustment)
    in each of ENCODINGS."""
    root = tmp_path_factory.mktemp("compact")
    Trainer(TrainConfig.from_preset("quick", **COMMON), tiny_dataset, root / "base",
            progress=False).run()
    fulls = {"float": root / "base/last.h5"}
    for encoding in ENCODINGS:
        common = dict(COMMON, hardware=dict(weight_encoding=encoding))
        Trainer(TrainConfig.from_preset("quick", **common, lr=0.01, twofold=TWOFOLD,
                                        init=str(root / "base/last.h5")),
                tiny_dataset, root / encoding / "twofold", progress=False).run()
        post = Trainer(TrainConfig.from_preset(
            "quick", **common, lr=0.001, post_training=True,
            twofold=dict(TWOFOLD, plane_drop_tolerance=0.02, plane_drop_images=10),
            init=str(root / encoding / "twofold/last.h5")),
            tiny_dataset, root / encoding / "post", progress=False)
        post.run()
        assert post.state["post_training"]["planes_dropped"] > 0
        fulls[encoding] = root / encoding / "post/last.h5"
    pairs = {}
    for name, full in fulls.items():
        compact = root / f"{name}.compact.h5"
        assert "wrote" in run(REPO / "scripts/export_model.py", full, compact).stdout
        pairs[name] = full, compact
    return pairs


def test_the_compact_file_holds_levels_and_no_planes_or_training_state(exported):
    full, compact = exported["sign_magnitude"]
    with h5py.File(full, "r") as f, h5py.File(compact, "r") as c:
        assert c.attrs["format"] == "nptwofold-compact-checkpoint"
        assert set(c) == {"model", "twofold"}
        assert not any(name.endswith(("weight_bits", "weight_scale")) for name in c["model"])
        for name in f["model"]:
            if not name.endswith(("weight_bits", "weight_scale")):
                assert np.array_equal(c["model"][name][()], f["model"][name][()]), name
        for name, layer in c["twofold"].items():
            assert set(layer) == {"levels"}
            assert layer["levels"].dtype == np.int8
            assert np.array_equal(layer["levels"][()], f["twofold"][name]["levels"][()])
            stored = f["twofold"][name].attrs
            assert set(layer.attrs) == set(stored)
            assert all(np.array_equal(layer.attrs[key], stored[key]) for key in stored)
        assert c["twofold/layer3.2.conv2/levels"].compression == "gzip"
    assert compact.stat().st_size < full.stat().st_size / 20
    float_full, float_compact = exported["float"]
    with h5py.File(float_full, "r") as f, h5py.File(float_compact, "r") as c:
        assert set(c) == {"model"} and set(c["model"]) == set(f["model"])
        assert all(np.array_equal(c["model"][name][()], f["model"][name][()])
                   for name in f["model"])


@pytest.mark.parametrize("name", ["float", *ENCODINGS])
def test_the_compact_file_loads_as_the_same_model(exported, sample, name):
    full, compact = exported[name]
    model, method, content = load_model(full)
    again, again_method, again_content = load_model(compact)
    assert again_content["compact"] and not content["compact"]
    want, got = state_of(model), state_of(again)
    assert want.keys() == got.keys()
    assert all(want[key].dtype == got[key].dtype and np.array_equal(want[key], got[key])
               for key in want)
    if method is not None:
        assert {key: layer.dropped_planes for key, layer in method.layers.items()} == {
            key: layer.dropped_planes for key, layer in again_method.layers.items()}
    images = sample.test_images[:50].astype(np.float32) / 255
    assert np.array_equal(model.eval().forward(images), again.eval().forward(images))


def comparable(report):
    """A cim_eval JSON report without what names the file or times the run."""
    drop = ("checkpoint", "calibration", "seconds", "chip_seconds")
    return {key: [{k: v for k, v in item.items() if k not in drop} for item in value]
            if key == "runs" else value for key, value in report.items() if key not in drop}


@pytest.mark.parametrize("name", ["float", *ENCODINGS])
def test_evaluate_and_cim_eval_give_the_same_figures(exported, tmp_path, name):
    reports = []
    for checkpoint in exported[name]:
        evaluated = run(REPO / "scripts/evaluate.py", checkpoint, "--json", "--threads", "1")
        out = tmp_path / f"{checkpoint.stem}.json"
        run(REPO / "scripts/cim_eval.py", checkpoint, "--data", "sample", "--images", 3,
            "--calib-images", 3, "--adc-bits", 0, 4, "--threads", 1, "--json", out,
            "--no-progress")
        reports.append((json.loads(evaluated.stdout), comparable(json.loads(out.read_text()))))
    assert reports[0] == reports[1]
    assert [run["adc_bits"] for run in reports[0][1]["runs"]] == [0, 4]


def test_inspect_lists_a_compact_file(exported):
    listing = run("-m", "nptwofold.inspect", exported["sign_magnitude"][1]).stdout
    assert "format: nptwofold-compact-checkpoint" in listing
    assert "layer3.2.conv2/levels" in listing and "int8" in listing


def test_resuming_is_refused_and_init_starts_from_the_same_model(exported, tiny_dataset,
                                                                   tmp_path):
    float_full, float_compact = exported["float"]
    full, compact = exported["twos_complement"]
    resumed = run(REPO / "scripts/train_cifar.py", "--resume", compact, "--out",
                  tmp_path / "resumed", check=False)
    assert_one_line_error(resumed, "is a compact checkpoint, with no optimizer or training "
                                   "state, so it cannot be resumed; fine-tune from it with --init")
    assert not (tmp_path / "resumed").exists()
    # a Twofold phase from a float model, and a fine-tune of a Twofold one
    for config, pair in ((TrainConfig.from_preset("quick", **COMMON, twofold=TWOFOLD),
                          (float_full, float_compact)),
                         (TrainConfig.from_dict(load_checkpoint(full)["config"]), (full, compact))):
        states = [state_of(build_model(config, load_checkpoint(path))[0]) for path in pair]
        assert all(np.array_equal(states[0][key], states[1][key]) for key in states[0])
    config = TrainConfig.from_dict(dict(load_checkpoint(full)["config"], init=str(compact)))
    trainer = Trainer(config, tiny_dataset, tmp_path / "finetune", progress=False)
    trainer.run(max_steps=2)
    assert trainer.state["global_step"] == 2


def test_export_refuses_an_unfinished_model(exported, tmp_path):
    full, _ = exported["twos_complement"]
    unpruned = run(REPO / "scripts/export_model.py", full.parent.parent / "twofold/last.h5",
                   tmp_path / "out.h5", check=False)
    assert_one_line_error(unpruned, "has cut weights off level 0: the model is not hard-pruned")
    assert not (tmp_path / "out.h5").exists()
    model, method, content = load_model(full)
    plane = method.layers["layer1.0.conv1"].params["weight_bits"][0].reshape(-1)
    kept = np.flatnonzero(method.keep_mask("layer1.0.conv1"))[0]
    plane[kept] = 0.25 if plane[kept] == 0 else 0.75  # the same level, but not a 0/1 plane
    with pytest.raises(NptwofoldError, match="layer1.0.conv1.weight_bits are not exactly the "
                                             "0/1 planes of its levels"):
        save_compact(tmp_path / "out.h5", model, content["config"], method)
    same = run(REPO / "scripts/export_model.py", full, full, check=False)
    assert_one_line_error(same, "is the checkpoint being exported")


def edited(source, tmp_path, edit):
    """A copy of compact checkpoint `source` changed by edit(h5py file)."""
    path = tmp_path / "bad.h5"
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def set_level(layer, pick, value):
    """Sets the first level of /twofold/`layer` that pick(levels, keep) selects to `value`."""
    def edit(f):
        dataset = f[f"twofold/{layer}/levels"]
        levels = dataset[()]
        levels.reshape(-1)[np.flatnonzero(pick(levels))[0]] = value
        dataset[...] = levels
    return edit


def replace_levels(layer, dtype):
    def edit(f):
        levels = f[f"twofold/{layer}/levels"][()]
        del f[f"twofold/{layer}/levels"]
        f[f"twofold/{layer}"].create_dataset("levels", data=levels.astype(dtype))
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_level("layer2.0.conv1", lambda levels: levels != 0, -128),
     "/twofold/layer2.0.conv1/levels holds levels outside -127..127, the range of 8-bit"),
    (lambda f: f["twofold/layer2.0.conv1"].attrs.modify("lfsr_seed", 7),
     "/twofold/layer2.0.conv1: the keep-mask does not match this run's twofold config"),
    (lambda f: f["twofold/layer2.0.conv1"].attrs.modify("lfsr_steps", 5),
     "/twofold/layer2.0.conv1: the stored keep-mask (or @lfsr_steps) differs"),
    (replace_levels("fc", np.int16), "/twofold/fc/levels is int16; 8-bit levels are int8"),
    (lambda f: f["model"].create_dataset("fc.weight_bits", data=np.zeros((8, 10, 64), "f4")),
     "/model/fc.weight_bits: a compact checkpoint holds the mapped layers in /twofold only"),
    (lambda f: f["twofold/fc"].attrs.modify("scale", 0.1),
     "/twofold/fc/@scale 0.1 is not a float32 value"),
], ids=["level_outside_range", "mask_of_another_seed", "lfsr_steps", "int16_levels",
        "float_planes", "scale_not_float32"])
def test_a_bad_compact_file_is_refused(exported, tmp_path, edit, message):
    path = edited(exported["sign_magnitude"][1], tmp_path, edit)
    with pytest.raises(NptwofoldError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(path)


def test_a_cut_weight_off_level_0_or_a_level_off_the_dropped_planes_is_refused(exported,
                                                                               tmp_path):
    path = exported["twos_complement"][1]
    model, method, _ = load_model(path)
    layer, count = next((name, layer.dropped_planes)
                        for name, layer in method.layers.items() if layer.dropped_planes)
    step = 2 ** count
    cut = method.keep_mask(layer) == 0
    bad = edited(path, tmp_path, set_level(layer, lambda levels: cut, step))
    failed = run(REPO / "scripts/evaluate.py", bad, check=False)
    assert_one_line_error(failed, f"/twofold/{layer}/levels: a weight the keep-mask cuts has a "
                                  "non-zero level")
    bad = edited(path, tmp_path, set_level(layer, lambda levels: ~cut, step + 1))
    with pytest.raises(NptwofoldError, match=f"/twofold/{layer}/levels holds levels that are "
                                             rf"not multiples of 2\^{count}"):
        load_model(bad)


def test_a_truncated_compact_file_is_a_one_line_error(exported, tmp_path):
    _, compact = exported["float"]
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(compact.read_bytes()[:len(compact.read_bytes()) // 2])
    for tool in ([REPO / "scripts/evaluate.py"], [REPO / "scripts/cim_eval.py"],
                 ["-m", "nptwofold.inspect"]):
        failed = run(*tool, truncated, check=False)
        assert_one_line_error(failed, "truncated or corrupt")
