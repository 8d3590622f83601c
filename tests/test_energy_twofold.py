"""The energy regularizer in the Twofold method: the input activity a_i, the gradient it adds,
and the stem and classifier sparsity options."""
import numpy as np
import pytest

from nptwofold.cim.network import CimNetwork
from nptwofold.hardware import HardwareConfig
from nptwofold.kernels.energy import energy_regularizer
from nptwofold.kernels.lfsr import kept_per_column
from nptwofold.kernels.quant import bits_backward
from nptwofold.model import ResNet20
from nptwofold.twofold import Twofold, TwofoldConfig

from helpers import twofold_of


def energy_model(images, seed=0, **settings):
    model = ResNet20(np.random.default_rng(seed))
    method = twofold_of(model, seed, **settings)
    method.activity_images = images
    return model, method


@pytest.mark.parametrize("encoding", ["twos_complement", "sign_magnitude"])
def test_weighted_cell_energy_is_the_arrays_cell_energy_per_image(sample, encoding):
    """sum_i a_i e(q_i) of every layer equals the cell pJ per image the CIM network counts
    event by event on the same images (dense, so every stored cell is a weight's): exactly for
    the first two layers; deeper, a float32 conv and the array's integer matmul scaled in
    float64 may round an activation level differently, so a few input bits differ."""
    images = sample.train_images[:6]
    model, method = energy_model(images, sparsity=0.0, weight_encoding=encoding)
    method.measure_activity()
    network = CimNetwork(model, method, HardwareConfig(weight_encoding=encoding))
    network.calibrate(images)
    network.count_energy(images)
    report = network.energy_report()
    for row in report["layers"]:
        exact = row["layer"] in ("conv1", "layer1.0.conv1")
        assert method.cell_energy_pj(row["layer"]) == pytest.approx(
            row["cells_pj"], rel=1e-9 if exact else 3e-3), row["layer"]


def test_activity_of_the_stem_matches_a_direct_count(sample):
    """The stem's a_i by padded window sums of the pixels' popcounts (clip 1, a = 8: the pixel
    itself), rows (ci, ky, kx)."""
    images = sample.train_images[:3]
    _, method = energy_model(images, sparsity=0.0)
    method.measure_activity()
    ones = np.unpackbits(images[..., None], axis=-1).sum(axis=-1).astype(np.float64)
    padded = np.pad(ones, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.array([[[padded[:, ky:ky + 32, kx:kx + 32, ci].sum() / len(images)
                       for kx in range(3)] for ky in range(3)] for ci in range(3)])
    got = method.activity["conv1"]
    assert np.allclose(got, want[None], rtol=1e-12)


def test_regularize_adds_exactly_the_energy_kernel_gradient(sample):
    images = sample.train_images[:4]
    model, method = energy_model(images, sparsity=0.5, lambda_net=0.0, beta_bit=0.0,
                                 lambda_energy=0.7, weight_encoding="sign_magnitude")
    for layer in method.layers.values():
        layer.grads["weight_bits"][...] = 0.0
    values = method.regularize()
    assert method.activity is not None and method.energy_reference > 0
    total = 0.0
    for name, layer in method.layers.items():
        bits, scale = layer.params["weight_bits"], layer.buffers["weight_scale"][0]
        value, dweight = energy_regularizer(method.levels(name), method.activity[name],
                                            method.energy_table, scale, 0,
                                            0.7 / method.energy_reference, bits.dtype)
        total += value
        np.testing.assert_array_equal(layer.grads["weight_bits"],
                                      bits_backward(bits, scale, dweight, 0, "sign_magnitude"))
        # cut weights are not weighed: pruning removes them
        assert not dweight[method.keep_mask(name) == 0].any()
    assert values["reg_energy"] == pytest.approx(total, rel=1e-12)
    assert total > 0


def test_energy_regularizer_needs_activity_images():
    model = ResNet20(np.random.default_rng(0))
    method = Twofold(model, TwofoldConfig(lambda_energy=1.0), 0)
    with pytest.raises(Exception, match="needs activity images"):
        method.regularize()


def test_stem_and_classifier_have_their_own_sparsity():
    model = ResNet20(np.random.default_rng(0))
    method = Twofold(model, TwofoldConfig(sparsity=0.9, stem_sparsity=0.0,
                                          classifier_sparsity=0.5), 0)
    assert method.keep_mask("conv1").all()
    fc = method.keep_mask("fc")
    assert (fc.sum(axis=1) == kept_per_column(64, 0.5)).all()
    inner = method.keep_mask("layer1.0.conv1")
    assert (inner.reshape(16, -1).sum(axis=1) == kept_per_column(144, 0.9)).all()


def test_the_regularizer_prices_the_array_it_is_given():
    """`--hw cell_energy_pj=...` reaches training: the Twofold state prices the levels with
    the training config's hardware, not with the defaults."""
    from nptwofold.kernels.energy import level_energy_table

    cheap = [0.01, 0.02, 0.05, 0.1]
    model = ResNet20(np.random.default_rng(0))
    method = twofold_of(model, 0, lambda_energy=1.0, cell_energy_pj=cheap,
                        weight_encoding="sign_magnitude")
    np.testing.assert_array_equal(method.energy_table,
                                  level_energy_table(8, "sign_magnitude", cheap))
    assert not np.array_equal(method.energy_table, level_energy_table(
        8, "sign_magnitude", HardwareConfig().cell_energy_pj))


def test_train_flags_carry_the_array_into_the_config(tmp_path):
    """The array flags of scripts/train_cifar.py land in TrainConfig.hardware, which the run's
    Twofold state is built with."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("train_cifar", REPO / "scripts/train_cifar.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--sparsity", "0.5", "--weight-encoding", "sign_magnitude",
                              "--hw", "cell_energy_pj=[0.01, 0.02, 0.05, 0.1]"])
    [(_, config)] = script.phase_configs(args, tmp_path)
    assert config.hardware == HardwareConfig(weight_encoding="sign_magnitude",
                                             cell_energy_pj=[0.01, 0.02, 0.05, 0.1])
