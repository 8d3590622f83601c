"""Atomic file writes: checkpoints, logs, reports and tables go to a temporary name, are synced,
then renamed, so an interrupted run never leaves half a file."""
import csv
import json
import os
from pathlib import Path


def atomic_write(path, write):
    """Calls write(tmp_path), syncs, then renames over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
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
