"""CIFAR-10 loading: both official layouts, tarball and folder, sample, download, bad files."""
import hashlib
import pickle
import tarfile

import numpy as np
import pytest

from nptwofold.data import (NUM_CLASSES, SAMPLE_ARCHIVE, download_cifar10, load_cifar10,
                            load_dataset)
from nptwofold.errors import NptwofoldError


def fake_split(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def planes(images):
    """NHWC -> the official record layout: 1024 R, then 1024 G, then 1024 B bytes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_binary(folder, splits):
    folder.mkdir(parents=True)
    for name, (images, labels) in splits.items():
        records = np.concatenate([labels[:, None].astype(np.uint8), planes(images)], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())


def write_python(folder, splits, protocol=pickle.DEFAULT_PROTOCOL):
    folder.mkdir(parents=True)
    for name, (images, labels) in splits.items():
        batch = {b"data": planes(images), b"labels": labels.tolist(), b"batch_label": name.encode(),
                 b"filenames": [b"x.png"] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))


def write_python_2(folder, splits):
    """Protocol 2, as the official (Python 2) files are pickled."""
    write_python(folder, splits, protocol=2)


def make_splits(rng):
    return {"data_batch_1": fake_split(rng, 7), "data_batch_2": fake_split(rng, 5),
            "test_batch": fake_split(rng, 4)}


def expected(splits):
    train = [splits["data_batch_1"], splits["data_batch_2"]]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            *splits["test_batch"])


@pytest.mark.parametrize("writer,folder_name", [(write_binary, "cifar-10-batches-bin"),
                                                (write_python, "cifar-10-batches-py"),
                                                (write_python_2, "cifar-10-batches-py")])
@pytest.mark.parametrize("as_tarball", [False, True])
def test_both_layouts_from_folder_and_tarball(tmp_path, rng, writer, folder_name, as_tarball):
    splits = make_splits(rng)
    writer(tmp_path / folder_name, splits)
    source = tmp_path / folder_name
    if as_tarball:
        source = tmp_path / "cifar.tar.gz"
        with tarfile.open(source, "w:gz") as archive:
            archive.add(tmp_path / folder_name, arcname=folder_name)
    data = load_cifar10(source)
    for got, want in zip(data[:4], expected(splits)):
        np.testing.assert_array_equal(got, want)


def test_embedded_sample_is_small_real_and_balanced(sample):
    assert SAMPLE_ARCHIVE.stat().st_size <= 5_000_000
    assert sample.train_images.shape == (1500, 32, 32, 3)
    assert sample.test_images.shape == (500, 32, 32, 3)
    assert np.bincount(sample.train_labels, minlength=NUM_CLASSES).tolist() == [150] * 10
    assert np.bincount(sample.test_labels, minlength=NUM_CLASSES).tolist() == [50] * 10
    assert 60 < sample.train_images.mean() < 190  # natural images, not blank or noise-free


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(NptwofoldError, match="not found"):
        load_cifar10(tmp_path / "nowhere.tar.gz")


def test_folder_without_batches_is_a_clear_error(tmp_path):
    with pytest.raises(NptwofoldError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path)


def test_truncated_tarball_is_a_clear_error(tmp_path, rng):
    write_binary(tmp_path / "bin", make_splits(rng))
    archive_path = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(tmp_path / "bin", arcname="cifar-10-batches-bin")
    raw = archive_path.read_bytes()
    archive_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(NptwofoldError, match="truncated or corrupt"):
        load_cifar10(archive_path)


def test_record_size_mismatch_is_a_clear_error(tmp_path, rng):
    write_binary(tmp_path / "bin", make_splits(rng))
    batch = tmp_path / "bin" / "data_batch_1.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(NptwofoldError, match="data_batch_1.bin.*3073-byte records"):
        load_cifar10(tmp_path / "bin")


def test_label_out_of_range_is_a_clear_error(tmp_path, rng):
    splits = make_splits(rng)
    splits["test_batch"][1][0] = 12
    write_binary(tmp_path / "bin", splits)
    with pytest.raises(NptwofoldError, match="label 12"):
        load_cifar10(tmp_path / "bin")


def test_garbage_python_batch_is_a_clear_error(tmp_path, rng):
    write_python(tmp_path / "py", make_splits(rng))
    (tmp_path / "py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(NptwofoldError, match="test_batch: not a CIFAR python batch"):
        load_cifar10(tmp_path / "py")


class CodePayload:
    """Unpickles by calling eval: it creates `marker`, then returns valid-looking image data."""

    def __init__(self, marker, n):
        self.marker, self.n = marker, n

    def __reduce__(self):
        return eval, (f"[open({str(self.marker)!r}, 'w').close(), "
                      f"__import__('numpy').zeros(({self.n}, 3072), 'uint8')][1]",)


def test_a_crafted_python_batch_never_runs_its_code(tmp_path, rng):
    splits = make_splits(rng)
    write_python(tmp_path / "py", splits)
    marker = tmp_path / "payload-ran"
    crafted = {b"data": CodePayload(marker, 4), b"labels": splits["test_batch"][1].tolist()}
    (tmp_path / "py" / "test_batch").write_bytes(pickle.dumps(crafted))
    with pytest.raises(NptwofoldError, match="test_batch: it would call builtins.eval"):
        load_cifar10(tmp_path / "py")
    assert not marker.exists()


def test_download_verifies_md5_and_loads(tmp_path, rng):
    """The real download code path, fed from a file:// URL since tests never go online."""
    write_binary(tmp_path / "src" / "cifar-10-batches-bin", make_splits(rng))
    tarball = tmp_path / "src" / "cifar-10-binary.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    got = download_cifar10(tmp_path / "cache", url=tarball.as_uri(), md5=md5)
    assert got.read_bytes() == tarball.read_bytes()
    assert len(load_cifar10(got).train_labels) == 12
    with pytest.raises(NptwofoldError, match="expected 0+"):
        download_cifar10(tmp_path / "cache2", url=tarball.as_uri(), md5="0" * 32)
    assert not list((tmp_path / "cache2").iterdir())  # no half-verified file left behind


def test_offline_download_says_how_to_point_at_local_copy(tmp_path):
    with pytest.raises(NptwofoldError, match="pass --data PATH"):
        download_cifar10(tmp_path, url=(tmp_path / "absent.tar.gz").as_uri())


def test_load_dataset_accepts_sample_and_paths(sample, tmp_path):
    assert len(load_dataset("sample").train_labels) == len(sample.train_labels)
    assert len(load_dataset(str(SAMPLE_ARCHIVE)).test_labels) == len(sample.test_labels)


def test_symlinked_batch_folder_inside_the_data_folder_is_found(tmp_path, rng):
    splits = make_splits(rng)
    write_binary(tmp_path / "shared/cifar-10-batches-bin", splits)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/cifar-10-batches-bin").symlink_to(tmp_path / "shared/cifar-10-batches-bin")
    (tmp_path / "data/loop").symlink_to(tmp_path / "data")  # a cycle must not hang the search
    data = load_cifar10(tmp_path / "data")
    for got, want in zip(data[:4], expected(splits)):
        np.testing.assert_array_equal(got, want)
