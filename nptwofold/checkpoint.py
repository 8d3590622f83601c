"""HDF5 checkpoints: model arrays, optimizer state, training position and run config.

Layout (documented in README.md, "Checkpoint format"):
  /                  attrs format, format_version, nptwofold_version, created_utc, config (JSON)
  /model/<name>      every parameter and buffer by its PyTorch state_dict name, conv OIHW
  /optimizer/<name>  SGD momentum buffer of each parameter; attrs momentum, weight_decay, nesterov
  /train             attrs epoch, step, global_step, running sums, best_accuracy, history (JSON)
  /twofold/<layer>   twofold runs only: levels, bit_planes, weight, keep_mask; LFSR attrs
  /cim               after a CIM calibration: attrs activation_bits, calibration_images;
                     /cim/<layer> attr activation_clip
Files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
import datetime
import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import NptwofoldError
from .files import atomic_write

FORMAT = "nptwofold-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path, model, optimizer=None, train_state=None, config=None,
                    extra_groups=None):
    """`extra_groups` maps a group name to a function that fills that group (e.g. /twofold)."""
    def write(tmp):
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["nptwofold_version"] = __version__
            f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            f.attrs["config"] = json.dumps(config or {}, sort_keys=True)
            group = f.create_group("model", track_order=True)
            for name, value in model.state_arrays():
                dataset = group.create_dataset(name, data=value)
                if value.ndim == 4:
                    dataset.attrs["layout"] = "OIHW"
                elif value.ndim == 2:
                    dataset.attrs["layout"] = "(out, in)"
            if optimizer is not None:
                group = f.create_group("optimizer", track_order=True)
                group.attrs.update(momentum=optimizer.momentum, nesterov=optimizer.nesterov,
                                   weight_decay=optimizer.weight_decay)
                for name, value in optimizer.velocity.items():
                    group.create_dataset(name, data=value)
            if train_state is not None:
                group = f.create_group("train")
                for key, value in train_state.items():
                    group.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
            for name, fill in (extra_groups or {}).items():
                fill(f.create_group(name, track_order=True))
    atomic_write(path, write)


def store_group(path, name, fill):
    """Adds or replaces group `name` of an existing checkpoint, filled by fill(group).

    Atomic like every write: a copy is changed, then renamed over the original.
    """
    def write(tmp):
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if name in f:
                del f[name]
            fill(f.create_group(name, track_order=True))
    atomic_write(path, write)


def load_checkpoint(path):
    """Reads a whole checkpoint into {"model", "optimizer", "train", "config"} dictionaries."""
    path = Path(path)
    if not path.is_file():
        raise NptwofoldError(f"checkpoint not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise NptwofoldError(f"{path} is an HDF5 file but not an nptwofold checkpoint")
            if f.attrs["format_version"] > FORMAT_VERSION:
                raise NptwofoldError(f"{path} has checkpoint format {f.attrs['format_version']}; "
                                     f"this nptwofold reads up to {FORMAT_VERSION}")
            content = {
                "config": json.loads(f.attrs["config"]),
                "model": {name: ds[()] for name, ds in f["model"].items()},
                "optimizer": None, "train": None,
            }
            if "optimizer" in f:
                content["optimizer"] = {name: ds[()] for name, ds in f["optimizer"].items()}
            if "train" in f:
                content["train"] = {key: _attr_value(value) for key, value in f["train"].attrs.items()}
            content["twofold"] = _read_layer_groups(f["twofold"]) if "twofold" in f else None
            content["cim"] = None
            if "cim" in f:
                content["cim"] = dict(f["cim"].attrs, layers=_read_layer_groups(f["cim"]))
    except NptwofoldError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise NptwofoldError(f"cannot read checkpoint {path}: truncated or corrupt "
                             f"({str(exc).splitlines()[0]})") from None
    return content


def _read_layer_groups(group):
    """{layer: {"attrs": {...}, dataset name: array}} of a group of per-layer groups."""
    return {name: {"attrs": dict(sub.attrs), **{key: ds[()] for key, ds in sub.items()}}
            for name, sub in group.items()}


def _attr_value(value):
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value


def restore_arrays(target, arrays, what, path):
    """Copies `arrays` into the same-named arrays of `target`, which must match exactly."""
    target = dict(target)
    if set(target) != set(arrays):
        missing = sorted(set(target) - set(arrays))
        extra = sorted(set(arrays) - set(target))
        raise NptwofoldError(f"{path}: {what} does not match this model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, value in arrays.items():
        if target[name].shape != value.shape:
            raise NptwofoldError(f"{path}: {what} {name} has shape {value.shape}, "
                                 f"the model needs {target[name].shape}")
        target[name][...] = value


def restore_model(model, content, path):
    restore_arrays(model.state_arrays(), content["model"], "model", path)


def restore_optimizer(optimizer, content, path):
    if content["optimizer"] is None:
        raise NptwofoldError(f"{path} holds no optimizer state, so it cannot resume training")
    restore_arrays(optimizer.velocity.items(), content["optimizer"], "optimizer state", path)
