"""CIFAR-10 loading: the official binary and python layouts, from a tarball or a folder.

Images come back as uint8 NHWC arrays (N, 32, 32, 3) with int64 labels. Without a path the
loader looks in the default data folder, then downloads the official binary tarball and
verifies its MD5. A small real sample in the same binary layout ships in `datasets/`.
"""
import codecs
import hashlib
import io
import lzma
import pickle
import re
import tarfile
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import NptwofoldError

REPO_DATASETS = Path(__file__).resolve().parent.parent / "datasets"
SAMPLE_ARCHIVE = REPO_DATASETS / "cifar10-sample.tar.xz"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
DOWNLOAD_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the CIFAR-10 page
LOCAL_NAMES = ("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
               "cifar-10-python.tar.gz", "cifar-10-batches-py")
IMAGE_BYTES = 32 * 32 * 3
RECORD_BYTES = 1 + IMAGE_BYTES  # binary layout: label byte, then R, G, B planes
NUM_CLASSES = 10
# data_batch_1.bin ... / test_batch.bin (binary), data_batch_1 ... / test_batch (python)
BATCH_NAME = re.compile(r"^(data_batch_\d+|test_batch)(\.bin)?$")


class Cifar10(NamedTuple):
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def _planes_to_nhwc(flat):
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def parse_binary_batch(raw, name):
    if len(raw) == 0 or len(raw) % RECORD_BYTES:
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: {len(raw)} bytes is not a "
                             f"whole number of {RECORD_BYTES}-byte records")
    records = np.frombuffer(raw, np.uint8).reshape(-1, RECORD_BYTES)
    return _planes_to_nhwc(records[:, 1:]), records[:, 0].astype(np.int64)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds: dicts, lists, bytes, strings, numbers
    and NumPy arrays. Any other global (a function a crafted file would call) is refused
    before it runs, so reading a data file never executes code from it."""
    # the constructors NumPy's array pickles name, under NumPy 1 and 2 and every protocol, and
    # the one Python 3 uses for bytes at protocol 2
    ARRAY_GLOBALS = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        **{(module, "_reconstruct"): np.array(0).__reduce__()[0]
           for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(module, "_frombuffer"): np.array(0).__reduce_ex__(5)[0]
           for module in ("numpy.core.numeric", "numpy._core.numeric")},
    }

    def __init__(self, raw, name):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.name = name

    def find_class(self, module, global_name):
        if (module, global_name) not in self.ARRAY_GLOBALS:
            raise NptwofoldError(f"refused CIFAR-10 file {self.name}: it would call "
                                 f"{module}.{global_name}, which no CIFAR batch does (a data "
                                 "file must not run code)")
        return self.ARRAY_GLOBALS[module, global_name]


def parse_python_batch(raw, name):
    try:
        batch = _BatchUnpickler(raw, name).load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except NptwofoldError:
        raise
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: not a CIFAR python batch "
                             f"({type(exc).__name__})") from None
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or len(labels) != len(data):
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: data shape {data.shape} with "
                             f"{len(labels)} labels")
    return _planes_to_nhwc(data), labels


def _read_batches(path):
    """{batch name: raw bytes} from a tarball or a folder (searched recursively)."""
    batches = {}
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and BATCH_NAME.match(file.name):
                batches[file.name] = file.read_bytes()
        return batches
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and BATCH_NAME.match(base):
                    batches[base] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise NptwofoldError(f"cannot read CIFAR-10 archive {path}: {exc} "
                             "(truncated or corrupt download?)") from None
    return batches


def load_cifar10(path):
    """Reads CIFAR-10 (either official layout) from a tarball or an extracted folder."""
    path = Path(path)
    if not path.exists():
        raise NptwofoldError(f"CIFAR-10 data not found at {path}")
    batches = _read_batches(path)
    train_names = sorted(n for n in batches if n.startswith("data_batch"))
    test_names = [n for n in batches if n.startswith("test_batch")]
    if not train_names or not test_names:
        raise NptwofoldError(f"no CIFAR-10 batches in {path}: expected data_batch_*(.bin) and "
                             "test_batch(.bin) from the binary or python version")
    splits = []
    for names in (train_names, test_names):
        parsed = [(parse_binary_batch if n.endswith(".bin") else parse_python_batch)(batches[n], n)
                  for n in names]
        images = np.concatenate([p[0] for p in parsed])
        labels = np.concatenate([p[1] for p in parsed])
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise NptwofoldError(f"corrupt CIFAR-10 data in {path}: label {labels.max()} "
                                 f"outside 0..{NUM_CLASSES - 1}")
        splits += [images, labels]
    return Cifar10(*splits, source=str(path))


def load_sample():
    """The small real CIFAR-10 sample shipped in datasets/ (see datasets/README.md)."""
    if not SAMPLE_ARCHIVE.exists():
        raise NptwofoldError(f"the embedded sample {SAMPLE_ARCHIVE} is missing; "
                             "regenerate it with scripts/make_sample.py")
    return load_cifar10(SAMPLE_ARCHIVE)


def download_cifar10(folder, url=DOWNLOAD_URL, md5=DOWNLOAD_MD5):
    """Downloads the official binary tarball into `folder`, verified by MD5; returns its path."""
    folder = Path(folder)
    target = folder / url.rsplit("/", 1)[-1]
    partial = target.with_name(target.name + ".part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            digest = hashlib.md5()
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise NptwofoldError(f"CIFAR-10 not found locally and the download from {url} failed "
                             f"({exc}); pass --data PATH to a local cifar-10-binary.tar.gz "
                             "or cifar-10-python.tar.gz (or the extracted folder)") from None
    if digest.hexdigest() != md5:
        partial.unlink()
        raise NptwofoldError(f"download from {url} has MD5 {digest.hexdigest()}, expected {md5}")
    partial.replace(target)
    return target


def resolve_cifar10(path=None, folder=REPO_DATASETS):
    """Loads `path` if given; else a copy under `folder`; else downloads one there."""
    if path is not None:
        return load_cifar10(path)
    for name in LOCAL_NAMES:
        if (folder / name).exists():
            return load_cifar10(folder / name)
    return load_cifar10(download_cifar10(folder))


def load_dataset(spec):
    """"sample" (the embedded slice), "cifar10" (default folder, else download), or a path."""
    if spec == "sample":
        return load_sample()
    return resolve_cifar10(None if spec == "cifar10" else spec)
