"""Builds datasets/cifar10-sample.tar.xz: a small, class-balanced slice of real CIFAR-10.

The slice keeps the official binary layout, so the normal loader reads it. It takes the first
TRAIN_PER_CLASS training and TEST_PER_CLASS test images of each class, in file order.
"""
import io
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nptwofold.options import ScriptParser  # noqa: E402  (checks the dependencies first)
import numpy as np  # noqa: E402
from nptwofold.data import NUM_CLASSES, SAMPLE_ARCHIVE, load_cifar10  # noqa: E402
from nptwofold.errors import NptwofoldError, run_script  # noqa: E402
from nptwofold.files import atomic_write, check_output_file  # noqa: E402

TRAIN_PER_CLASS = 150
TEST_PER_CLASS = 50
CLASS_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def first_per_class(images, labels, per_class):
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class]
                                   for c in range(NUM_CLASSES)]))
    records = np.concatenate([labels[keep, None].astype(np.uint8),
                              images[keep].transpose(0, 3, 1, 2).reshape(len(keep), -1)], axis=1)
    return records.tobytes()


def main():
    parser = ScriptParser(__doc__)
    parser.add_argument("source", help="full CIFAR-10 (tarball or folder, either layout)")
    parser.add_argument("--out", default=str(SAMPLE_ARCHIVE), help="archive to write")
    args = parser.parse_args()
    try:
        check_output_file(args.out)
        data = load_cifar10(args.source)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    members = {
        "data_batch_1.bin": first_per_class(data.train_images, data.train_labels, TRAIN_PER_CLASS),
        "test_batch.bin": first_per_class(data.test_images, data.test_labels, TEST_PER_CLASS),
        "batches.meta.txt": ("\n".join(CLASS_NAMES) + "\n").encode(),
    }
    def write_archive(tmp):
        with tarfile.open(tmp, "w:xz", preset=9) as archive:
            for name, payload in members.items():
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(payload)  # mtime stays 0, so the archive is reproducible
                archive.addfile(info, io.BytesIO(payload))

    try:
        atomic_write(args.out, write_archive)
    except NptwofoldError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {Path(args.out).absolute()} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    run_script(main)
