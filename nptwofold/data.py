"""CIFAR-10 loading: the official binary and python layouts, from a tarball or a folder.

Images come back as uint8 NHWC arrays (N, 32, 32, 3) with int64 labels. Without a path the
loader looks in the default data folder, then downloads the official binary tarball and
verifies its MD5. A small real sample in the same binary layout ships in `datasets/`.

Nothing is coerced: pixels that are not integers in 0..255 and labels that are not integers in
0..9 are refused with the offending value, as are sets with a missing batch and tarballs that
end early; what a file declares is bounded by its size before anything is allocated.
"""
import codecs
import hashlib
import io
import lzma
import os
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
BATCH_NAME = re.compile(r"^(data_batch_(\d+)|test_batch)(\.bin)?$")
# the batches read at most: CIFAR-10 is 185 MB; 1 GiB (about 350,000 images) leaves room for
# larger sets of the same layout and stops a crafted archive before it fills the memory
MAX_DATA_BYTES = 1 << 30


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
    except NptwofoldError:
        raise
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: not a CIFAR python batch "
                             f"({type(exc).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: not a CIFAR python batch (no "
                             "data and labels entries)")
    pixels = _python_pixels(batch[b"data"], len(raw), name)
    return _planes_to_nhwc(pixels), _python_labels(batch[b"labels"], len(pixels), name)


def _python_pixels(data, file_bytes, name):
    """The (N, 3072) uint8 pixels of a python batch, refused unless they are integers in
    0..255; the image count is bounded by the file's size before any conversion (an array of
    zero-sized items declares any number of images in a few bytes)."""
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: data is {shape}, not an array of "
                             f"(images, {IMAGE_BYTES}) pixels")
    if data.shape[0] * IMAGE_BYTES > file_bytes:
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: declares {data.shape[0]} images "
                             f"({data.shape[0] * IMAGE_BYTES} bytes of pixels) in a "
                             f"{file_bytes}-byte file")
    if data.dtype.kind not in "iu":
        raise NptwofoldError(f"refused CIFAR-10 file {name}: pixels are {data.dtype}, not "
                             "integers in 0..255 (converting them would change the images)")
    if data.size and (data.min() < 0 or data.max() > 255):
        value = data.min() if data.min() < 0 else data.max()
        raise NptwofoldError(f"refused CIFAR-10 file {name}: pixel value {value} is outside "
                             "0..255")
    return data.astype(np.uint8)


def _python_labels(labels, n_images, name):
    """A python batch's labels as int64, refused unless they are n_images integers (range
    checked with the other batches')."""
    if isinstance(labels, np.ndarray):
        integers = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        integers = isinstance(labels, list) and all(
            isinstance(label, (int, np.integer)) and not isinstance(label, bool)
            for label in labels)
    if not integers:
        raise NptwofoldError(f"refused CIFAR-10 file {name}: labels are not a list of integers "
                             "(converting them would change them)")
    if len(labels) != n_images:
        raise NptwofoldError(f"corrupt CIFAR-10 file {name}: {n_images} images with "
                             f"{len(labels)} labels")
    return np.asarray(labels, dtype=np.int64)


def _files_under(folder):
    """Every file under `folder`, in sorted order, following symlinked folders (a data folder
    often links to a shared copy), each real folder once so that a link cycle ends."""
    seen = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders.sort()
        yield from (Path(root) / name for name in sorted(files))


def _read_batches(path):
    """{batch name: raw bytes} from a tarball or a folder (searched recursively), at most
    MAX_DATA_BYTES, checked before reading; a tarball must end with its end-of-archive
    marker (one cut at a member boundary otherwise reads as a shorter, valid archive)."""
    batches, total = {}, 0

    def admit(name, size):
        nonlocal total
        total += size
        if total > MAX_DATA_BYTES:
            raise NptwofoldError(f"{path}: the batches up to {name} hold {total} bytes, more "
                                 f"than the {MAX_DATA_BYTES >> 20} MiB this loader reads")

    if path.is_dir():
        for file in _files_under(path):
            if BATCH_NAME.match(file.name) and file.is_file():
                admit(file.name, file.stat().st_size)
                batches[file.name] = file.read_bytes()
        return batches
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and BATCH_NAME.match(base):
                    admit(base, member.size)
                    batches[base] = archive.extractfile(member).read()
            archive.fileobj.seek(archive.offset)
            complete = archive.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise NptwofoldError(f"cannot read CIFAR-10 archive {path}: {exc} "
                             "(truncated or corrupt download?)") from None
    if not complete:
        raise NptwofoldError(f"cannot read CIFAR-10 archive {path}: it ends without the "
                             "end-of-archive marker (truncated download?)")
    return batches


def _check_batch_numbers(path, train_names):
    """The training batches must be data_batch_1 .. data_batch_N with none missing."""
    numbers = sorted(int(BATCH_NAME.match(name).group(2)) for name in train_names)
    missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    if missing or len(numbers) != len(set(numbers)):
        raise NptwofoldError(f"incomplete CIFAR-10 data in {path}: training batches "
                             f"{numbers} (missing {missing or 'none'}, duplicated "
                             f"{sorted({n for n in numbers if numbers.count(n) > 1}) or 'none'})")


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
    _check_batch_numbers(path, train_names)
    splits = []
    for names in (train_names, test_names):
        parsed = [(parse_binary_batch if n.endswith(".bin") else parse_python_batch)(batches[n], n)
                  for n in names]
        images = np.concatenate([p[0] for p in parsed])
        labels = np.concatenate([p[1] for p in parsed])
        outside = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        if outside.size:
            raise NptwofoldError(f"corrupt CIFAR-10 data in {path}: label {outside[0]} "
                                 f"outside 0..{NUM_CLASSES - 1}")
        splits += [images, labels]
    return Cifar10(*splits, source=str(path))


def load_sample():
    """The small real CIFAR-10 sample shipped in datasets/ (see datasets/README.md)."""
    if not SAMPLE_ARCHIVE.exists():
        raise NptwofoldError(f"the embedded sample {SAMPLE_ARCHIVE} is missing; restore it "
                             "(git checkout datasets/) or rebuild it from CIFAR-10: python "
                             "scripts/make_sample.py PATH/cifar-10-binary.tar.gz")
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
