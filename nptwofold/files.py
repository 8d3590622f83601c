"""Output files: the check of an output folder before a run starts, and atomic writes.

Checkpoints, logs, reports and tables go to a temporary name, are synced, then renamed, so an
interrupted run never leaves half a file; a failed write leaves the previous file as it was
and ends in one line naming the file.
"""
import contextlib
import csv
import json
import os
import shutil
from pathlib import Path

from .errors import NptwofoldError

TMP_SUFFIX = ".tmp"
# room a run needs before it starts: a twofold ResNet-20 checkpoint is about 14 MB, and an
# atomic write holds the old and the new file at once
MIN_FREE_BYTES = 64 << 20


def check_output_dir(folder, min_free_bytes=MIN_FREE_BYTES):
    """Creates `folder` if needed and checks that files can be written there, with room for
    checkpoints, so that a run fails before its first epoch rather than after it."""
    folder = Path(folder)
    probe = folder / f".write-test{TMP_SUFFIX}"
    try:
        if folder.exists() and not folder.is_dir():
            raise NptwofoldError(f"output folder {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"nptwofold")
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise NptwofoldError(f"cannot write to output folder {folder}: "
                             f"{exc.strerror or exc}") from None
    if free < min_free_bytes:
        raise NptwofoldError(f"output folder {folder} has {free >> 20} MiB free; a run needs "
                             f"at least {min_free_bytes >> 20} MiB for its checkpoints")


def atomic_write(path, write):
    """Calls write(tmp_path), syncs, then renames over `path`; on failure `path` is unchanged
    and the error names it."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise NptwofoldError(f"cannot write {path}: {exc.strerror or str(exc).splitlines()[0]}"
                             f"{'' if not path.exists() else '; the previous file is intact'}"
                             ) from None
    finally:
        with contextlib.suppress(OSError):  # e.g. the folder is gone: nothing to clean up
            tmp.unlink(missing_ok=True)


def write_json(path, value):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=1)))


def write_csv(path, rows):
    """One row per dict; the columns are the union of the rows' keys, in first-seen order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)
