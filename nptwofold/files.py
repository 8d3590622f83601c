"""Output files: the checks of output folders and files before any work, the lock that keeps
one writer per run folder, and atomic writes.

Checkpoints, logs, reports and tables go to a temporary name unique to the writing process, are
synced, then renamed, so an interrupted run never leaves half a file and two processes writing
the same file never share a temporary; a failed write leaves the previous file as it was and
ends in one line naming the file.
"""
import contextlib
import csv
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path

from .errors import NptwofoldError

TMP_SUFFIX = ".tmp"
LOCK_NAME = "run.lock"
# room a run needs before it starts: a twofold ResNet-20 checkpoint is about 14 MB, and an
# atomic write holds the old and the new file at once
MIN_FREE_BYTES = 64 << 20


def check_output_dir(folder, min_free_bytes=MIN_FREE_BYTES):
    """Creates `folder` if needed and checks that files can be written there, with room for
    checkpoints, so that a run fails before its first epoch rather than after it. Returns the
    folders it created, for `remove_empty_folders` if the run then fails."""
    folder = Path(folder)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        if folder.exists() and not folder.is_dir():
            raise NptwofoldError(f"output folder {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        _probe_write(folder)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        remove_empty_folders(created)
        raise NptwofoldError(f"cannot write to output folder {folder}: "
                             f"{exc.strerror or exc}") from None
    if free < min_free_bytes:
        remove_empty_folders(created)
        raise NptwofoldError(f"output folder {folder} has {free >> 20} MiB free; a run needs "
                             f"at least {min_free_bytes >> 20} MiB for its checkpoints")
    return created


def remove_empty_folders(folders):
    """Removes those of `folders` (ones this run created) that hold nothing but the run's
    released lock file, deepest first: a run that failed before writing anything leaves no
    output folder behind, and a folder with any other file is kept."""
    for folder in sorted(map(Path, folders), key=lambda path: len(path.parts), reverse=True):
        with contextlib.suppress(OSError):
            if [entry.name for entry in folder.iterdir()] == [LOCK_NAME]:
                (folder / LOCK_NAME).unlink()
            folder.rmdir()


def check_output_file(path):
    """Raises before any work if file `path` could not be written: it is a folder, or the
    nearest existing folder above it (atomic_write creates the missing ones) is not a folder
    files can be written to. None (an output not asked for) passes."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise NptwofoldError(f"cannot write {path}: it is a folder")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NptwofoldError(f"cannot write {path}: {folder} is not a folder")
    try:
        _probe_write(folder)
    except OSError as exc:
        raise NptwofoldError(f"cannot write {path}: {folder}: {exc.strerror or exc}") from None


def _probe_write(folder):
    """Writes and removes a small file in `folder` (permissions alone do not tell: root, or a
    read-only mount)."""
    probe = Path(folder) / f".write-test.{os.getpid()}{TMP_SUFFIX}"
    try:
        probe.write_bytes(b"nptwofold")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def temporary_path(path):
    """Where `path` is written before its rename: unique to this process."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def stale_temporaries(folder, name):
    """The temporary files of `name` in `folder` that writers left (this version's and the
    older `NAME.tmp`)."""
    return Path(folder).glob(f"{name}.*tmp")  # NAME.tmp and NAME.<pid>.tmp


class RunLock:
    """One writer per run folder: an advisory lock (flock) on `folder`/run.lock, held until
    `release` or the end of the process. The kernel drops it when its holder dies, even by
    kill -9, so a lock never outlives its run; the file only names the last holder (pid, host).
    Within one process the lock is shared (a script holds it around the trainer that holds it
    too): it is let go when every holder has released it.

    On NFS, Linux maps flock onto the server's byte-range locks, which hold across hosts when
    the mount supports locking; a file system that refuses locks entirely gets a warning and
    no lock (docs/reliability.md)."""
    held = {}  # resolved lock path -> [open lock file, holders in this process]

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.key = None

    def acquire(self):
        if self.key is not None:
            return self
        key = self.path.resolve()
        if key in RunLock.held:
            RunLock.held[key][1] += 1
            self.key = key
            return self
        try:
            handle = open(self.path, "a+")
        except OSError as exc:
            raise NptwofoldError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(handle)
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise NptwofoldError(f"{self.path.parent} is in use by another run ({holder}); "
                                     "wait for it to end or choose another output folder"
                                     ) from None
            sys.stderr.write(f"warning: {self.path.parent} cannot be locked "
                             f"({exc.strerror or exc}); nothing stops a second run writing "
                             "there\n")
            return self
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())) + "\n")
        handle.flush()
        RunLock.held[key] = [handle, 1]
        self.key = key
        return self

    def release(self):
        if self.key is None:
            return
        entry = RunLock.held[self.key]
        entry[1] -= 1
        if not entry[1]:
            entry[0].close()  # closing drops the flock
            del RunLock.held[self.key]
        self.key = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def _lock_holder(handle):
    """"pid P on host H" from a lock file, as far as it can be read."""
    try:
        handle.seek(0)
        holder = json.loads(handle.read())
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:100]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def atomic_write(path, write):
    """Calls write(tmp_path), syncs, then renames over `path`; on failure `path` is unchanged
    and the error names it."""
    path = Path(path)
    tmp = temporary_path(path)
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
