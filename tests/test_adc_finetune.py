"""ADC-aware fine-tuning (`nptwofold.adc_finetune`): the straight-through op's forward is the
array's output through a coarse ADC, its backward the float layer's gradient (checked against
float64 finite differences of the float layer), the mapping follows the weights, and
scripts/adc_finetune.py writes a checkpoint that cim_eval's loader takes with its calibration."""
import dataclasses
import json

import numpy as np
import pytest

from nptwofold.cim.finetune import refresh_mapping, ste_forward
from nptwofold.checkpoint import save_checkpoint
from nptwofold.cim.calibration import CalibrationCache, default_path
from nptwofold.cim.network import CimNetwork
from nptwofold.config import TrainConfig
from nptwofold.hardware import HardwareConfig
from nptwofold.kernels.augment import to_float
from nptwofold.kernels.quant import quantize
from nptwofold.model import ResNet20

from helpers import assert_one_line_error, run

ADC = HardwareConfig(weight_encoding="sign_magnitude", adc_bits=3, adc_range="calibrated")


@pytest.fixture(scope="module")
def network(sample):
    network = CimNetwork(ResNet20(np.random.default_rng(0)), hardware=ADC)
    network.calibrate(sample.train_images[:6])
    return network


def test_ste_forward_is_the_array_output(network, sample):
    images = sample.test_images[:2]
    with network.routed(ste_forward(network)):
        logits = network.model.forward(to_float(images))
    np.testing.assert_array_equal(logits, network.cim_logits(images))
    assert not np.array_equal(logits, network.fake_quant_logits(images))  # the ADC is felt


@pytest.mark.parametrize("name, input_shape", [("layer2.0.conv1", (2, 8, 8, 16)),
                                                ("fc", (3, 64))])
def test_ste_backward_is_the_float_layers_gradient(network, name, input_shape):
    layer = network.layers[name]
    module = layer.module.train()  # a layer keeps what its backward needs only in training
    rng = np.random.default_rng(5)
    x = rng.random(input_shape).astype(np.float32) * layer.clip
    out = ste_forward(network)(module, x)
    np.testing.assert_array_equal(out, network.array_output(layer, x, count=False))
    dy = rng.standard_normal(out.shape).astype(np.float32)
    dx = module.backward(dy)
    dweight = module.grads["weight"].copy()

    weight, workspace = module.params["weight"], getattr(module, "workspace", None)

    def loss(x64, weight64):
        """sum(dy * float layer(x)) in float64."""
        module.params["weight"] = weight64
        if workspace is not None:
            module.workspace = np.empty(0, np.float64)
        try:
            return float(np.sum(dy * module.own_forward(x64)))
        finally:
            module.params["weight"] = weight
            if workspace is not None:
                module.workspace = workspace

    x64, weight64 = x.astype(np.float64), weight.astype(np.float64)
    eps = 1e-4
    for analytic, array, at in ((dx, x64, lambda v: (v, weight64)),
                                (dweight, weight64, lambda v: (x64, v))):
        for flat in rng.choice(array.size, 6, replace=False):
            index = np.unravel_index(flat, array.shape)
            up, down = array.copy(), array.copy()
            up[index] += eps
            down[index] -= eps
            numeric = (loss(*at(up)) - loss(*at(down))) / (2 * eps)
            assert analytic[index] == pytest.approx(numeric, rel=1e-3, abs=1e-4)


def test_the_array_follows_the_weights(network):
    layer = network.layers["fc"]
    before = layer.crossbar.cells.copy()
    saved = layer.module.params["weight"].copy()
    layer.module.params["weight"] *= -1
    try:
        refresh_mapping(network)
        expected, scale = quantize(layer.module.params["weight"], layer.bits)
        np.testing.assert_array_equal(layer.levels, expected)
        assert layer.scale == scale and not np.array_equal(layer.crossbar.cells, before)
    finally:
        layer.module.params["weight"][...] = saved
        refresh_mapping(network)
    np.testing.assert_array_equal(layer.crossbar.cells, before)


def test_script_writes_a_checkpoint_with_its_array_and_calibration(sample, tmp_path):
    checkpoint = tmp_path / "float.h5"
    model = ResNet20(np.random.default_rng(1))
    save_checkpoint(checkpoint, model, config=dataclasses.asdict(TrainConfig(data="sample")))
    out = tmp_path / "tuned"
    printed = run("scripts/adc_finetune.py", checkpoint, "--adc-bits", 4, "--weight-encoding",
                  "sign_magnitude", "--out", out, "--data", "sample", "--train-images", 8,
                  "--batch-size", 4, "--calib-images", 4, "--lr", 0.01).stdout
    assert "--weight-encoding sign_magnitude overrides the checkpoint's twos_complement" in printed
    log = json.loads((out / "log.json").read_text())
    assert [step["step"] for step in log["steps"]] == [1, 2]
    tuned, content = CimNetwork.from_checkpoint(out / "last.h5")  # the array it adapted to
    assert tuned.hardware == HardwareConfig(weight_encoding="sign_magnitude", adc_bits=4)
    assert content["config"]["adc_finetune"]["train_images_used"] == 8
    assert content["cim"] is None  # the calibration is a file of its own, beside it
    cache = CalibrationCache(default_path(out / "last.h5"), sample.train_images[:4])
    cache.prepare(tuned)
    assert cache.notes == [f"read from {default_path(out / 'last.h5')}"] and tuned.adc_calibrated
    assert not np.array_equal(tuned.model.fc.params["weight"], model.fc.params["weight"])
    refused = run("scripts/adc_finetune.py", checkpoint, "--adc-bits", 4, "--out", out,
                  check=False)
    assert refused.returncode != 0 and refused.stderr.strip().count("\n") == 0
    assert "exists" in refused.stderr
    refused = run("scripts/adc_finetune.py", checkpoint, "--out", tmp_path / "ideal", "--data",
                  "sample", check=False)
    assert_one_line_error(refused, "needs a finite ADC; the checkpoint's is ideal")
