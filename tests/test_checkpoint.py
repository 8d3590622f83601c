"""HDF5 checkpoints: exact round trip, plain-h5py readability, atomic writes, bad files."""
import h5py
import numpy as np
import pytest

from nptwofold.checkpoint import load_checkpoint, restore_model, save_checkpoint
from nptwofold.errors import NptwofoldError
from nptwofold.kernels.augment import to_float
from nptwofold.model import ResNet20
from nptwofold.optim import SGD
from nptwofold.steps import train_step

from helpers import state_of


@pytest.fixture
def trained(sample):
    """A model after two real SGD steps, so BN statistics and momenta are non-trivial."""
    model = ResNet20(np.random.default_rng(7))
    optimizer = SGD(model, 0.9, 5e-4, nesterov=True)
    for start in (0, 32):
        train_step(model, optimizer, to_float(sample.train_images[start:start + 32]),
                   sample.train_labels[start:start + 32], lr=0.05)
    return model, optimizer


def test_save_load_gives_bit_identical_logits(trained, sample, tmp_path):
    model, optimizer = trained
    images = to_float(sample.test_images[:16])
    before = model.eval().forward(images).copy()
    save_checkpoint(tmp_path / "c.h5", model, optimizer, None, {"seed": 7})
    fresh = ResNet20(np.random.default_rng(99))
    restore_model(fresh, load_checkpoint(tmp_path / "c.h5"), tmp_path / "c.h5")
    after = fresh.eval().forward(images)
    assert np.array_equal(before, after)
    assert not np.array_equal(before, ResNet20(np.random.default_rng(99)).eval().forward(images))


def test_plain_h5py_reads_every_weight_with_documented_names(trained, tmp_path):
    model, optimizer = trained
    save_checkpoint(tmp_path / "c.h5", model, optimizer, {"epoch": 3, "history": [{"a": 1}]},
                    {"preset": "quick"})
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f.attrs["format"] == "nptwofold-checkpoint"
        for name, value in model.state_arrays():
            assert np.array_equal(f["model"][name][()], value)
        assert f["model/layer2.0.conv1.weight"].shape == (32, 16, 3, 3)
        assert f["model/layer2.0.conv1.weight"].attrs["layout"] == "OIHW"
        assert f["model/fc.weight"].shape == (10, 64)
        assert f["model/conv1.weight"].dtype == np.float32
        assert set(f["optimizer"]) == {name for name, _, _ in model.named_parameters()}
        assert f["train"].attrs["epoch"] == 3


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    model, _ = trained
    save_checkpoint(tmp_path / "c.h5", model)
    raw = (tmp_path / "c.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(NptwofoldError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "t.h5")


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(NptwofoldError, match="not found"):
        load_checkpoint(tmp_path / "absent.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(NptwofoldError, match="not an nptwofold checkpoint"):
        load_checkpoint(tmp_path / "other.h5")


def test_wrong_shapes_are_a_clear_error(trained, tmp_path):
    model, _ = trained
    save_checkpoint(tmp_path / "c.h5", model)
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        del f["model/fc.weight"]
        f["model/fc.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(NptwofoldError, match=r"/model/fc.weight is float32 \(10, 32\), the "
                                             r"model needs float32 \(10, 64\)"):
        restore_model(ResNet20(np.random.default_rng(0)), load_checkpoint(tmp_path / "c.h5"), "c")


def test_interrupted_write_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = tmp_path / "c.h5"
    save_checkpoint(path, model)
    good = path.read_bytes()
    before = state_of(model)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]
    restored = ResNet20(np.random.default_rng(5))
    monkeypatch.undo()
    restore_model(restored, load_checkpoint(path), path)
    assert all(np.array_equal(before[n], v) for n, v in state_of(restored).items())
