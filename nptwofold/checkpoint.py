"""HDF5 checkpoints: model arrays, optimizer state, training position and run config.

Layout (documented in docs/checkpoint-format.md):
  /                  attrs format, format_version, nptwofold_version, created_utc, config (JSON)
  /model/<name>      every parameter and buffer by its PyTorch state_dict name, conv OIHW
  /optimizer/<name>  SGD momentum buffer of each parameter; attrs momentum, weight_decay, nesterov
  /train             attrs epoch, step, global_step, running sums, best_accuracy, history (JSON)
  /twofold/<layer>   twofold runs only: levels, bit_planes and cells (in the run's weight
                     encoding, attr encoding), weight, keep_mask, activity; LFSR attrs
  /cim               older versions only (a CIM calibration, now a file of its own,
                     `cim.calibration`): attrs activation_bits, weight_bits,
                     calibration_images; /cim/<layer> attr activation_clip and datasets
                     adc_histogram.<encoding>.<rows>x<cols> (partial-sum counts per ADC channel)
A compact checkpoint (`save_compact`, format "nptwofold-compact-checkpoint") holds only the
model: /model without the mapped layers' bit planes and scales, and /twofold/<layer> with just
the integer `levels` and the attributes; no /optimizer or /train. Loading expands it into the
content of a full checkpoint (the bit planes made from the levels), so every tool reads both.
Files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.
Loading first refuses a file that reaches outside itself (links, external or virtual storage)
or declares a dataset larger than a checkpoint holds, before reading any data; then it checks
every dataset and attribute it reads and refuses anything else in one line that names the
place in the file, e.g. "/model/conv1.weight" or "/train/@epoch".
"""
import datetime
import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .config import TrainConfig, upgraded
from .errors import NptwofoldError
from .files import atomic_write
from .kernels.quant import ENCODINGS, decompose, level_dtype, max_level
from .model import STAGE_CHANNELS
from .options import above, at_least, between

FORMAT = "nptwofold-checkpoint"
FORMAT_VERSION = 1
COMPACT_FORMAT = "nptwofold-compact-checkpoint"
COMPACT_FORMAT_VERSION = 1
COMPACT_HDF5_FORMAT = ("v110", "latest")  # h5py libver: readable by HDF5 1.10 and later
# a compact checkpoint compresses its arrays from this size on (a smaller one's chunk index
# outweighs what gzip saves)
COMPRESS_FROM_ELEMENTS = 256


def save_checkpoint(path, model, optimizer=None, train_state=None, config=None,
                    extra_groups=None):
    """`extra_groups` maps a group name to a function that fills that group (e.g. /twofold)."""
    def write(tmp):
        with h5py.File(tmp, "w", track_order=True) as f:
            _write_model(f, config, model.state_arrays())
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


def save_compact(path, model, config, twofold=None):
    """Writes the compact checkpoint of `model` (with its `Twofold` state, if any): every
    model array but the mapped layers' bit planes and scales, which /twofold holds as integer
    levels (`Twofold.compact_layers`, which refuses a model that is not finished)."""
    layers = None if twofold is None else twofold.compact_layers()
    skipped = {f"{name}.{key}" for name in layers or {} for key in ("weight_bits", "weight_scale")}

    def write(tmp):
        # the HDF5 1.10 object format: its headers and single-chunk indexes take about half
        # the room of the oldest format's, which the full checkpoints keep
        with h5py.File(tmp, "w", libver=COMPACT_HDF5_FORMAT) as f:
            _write_model(f, config, [(name, value) for name, value in model.state_arrays()
                                     if name not in skipped], compact=True)
            if layers is not None:
                group = f.create_group("twofold")
                for name, (levels, attrs) in layers.items():
                    layer = group.create_group(name)
                    layer.create_dataset("levels", data=levels, **_compressed(levels))
                    layer.attrs.update(attrs)
    atomic_write(path, write)


def _compressed(value):
    """h5py dataset options for `value` in a compact checkpoint: one chunk per array (smaller
    chunks leave padded edge chunks, which cost more than gzip saves), byte-shuffled so that
    the floats' sign and exponent bytes compress together."""
    if value.size < COMPRESS_FROM_ELEMENTS:
        return {}
    return dict(chunks=value.shape, compression="gzip", compression_opts=9, shuffle=True)


def _write_model(f, config, arrays, compact=False):
    """The root attributes and /model (`arrays`: (name, array) pairs) of a checkpoint, or of
    a compact one (its arrays compressed, in name order)."""
    f.attrs["format"] = COMPACT_FORMAT if compact else FORMAT
    f.attrs["format_version"] = COMPACT_FORMAT_VERSION if compact else FORMAT_VERSION
    f.attrs["nptwofold_version"] = __version__
    f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    f.attrs["config"] = json.dumps(config or {}, sort_keys=True)
    group = f.create_group("model", track_order=not compact)
    for name, value in arrays:
        dataset = group.create_dataset(name, data=value,
                                       **(_compressed(value) if compact else {}))
        if value.ndim == 4:
            dataset.attrs["layout"] = "OIHW"
        elif value.ndim == 2:
            dataset.attrs["layout"] = "(out, in)"


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


# what /train holds: the trainer's position and running sums, by attribute
TRAIN_ATTRS = dict(
    epoch=("int", at_least(0)), step=("int", at_least(0)), global_step=("int", at_least(0)),
    epoch_loss_sum=("float", at_least(0)), epoch_correct=("int", at_least(0)),
    epoch_seen=("int", at_least(0)), epoch_seconds=("float", at_least(0)),
    epoch_reg_net=("float", at_least(0)), epoch_reg_bit=("float", at_least(0)),
    best_accuracy=("float", between(-1, 1)), best_epoch=("int", at_least(-1)),
    history=("json", list), post_training=("json", dict), twofold_reports=("json", list))
FLOAT_RUN_TRAIN_DEFAULTS = dict(epoch_reg_net=0.0, epoch_reg_bit=0.0, post_training={},
                                twofold_reports=[])
# what each /twofold/<layer> group holds (their agreement is checked by Twofold.load_h5)
TWOFOLD_DATASETS = dict(levels="iu", bit_planes="u", weight="f", keep_mask="u")
# cells: absent in checkpoints written before the planes followed the weight encoding;
# activity: absent before it was stored, and in runs that have not measured it yet
TWOFOLD_OPTIONAL_DATASETS = dict(cells="u", activity="f")
TWOFOLD_ATTRS = dict(
    bits=("int", between(2, 16)), scale=("float", at_least(0)), lfsr_width=("int", at_least(1)),
    lfsr_taps=("ints", at_least(1)), lfsr_seed=("int", at_least(1)), kept=("int", at_least(1)),
    group=("int", at_least(1)), rows=("int", at_least(1)), cols=("int", at_least(1)),
    # dropped_planes: absent (= 0) in checkpoints written before plane dropping existed
    lfsr_steps=("int", at_least(0)), dropped_planes=("int", between(0, 14)),
    # encoding: absent (= two's complement) before the planes followed the weight encoding
    encoding=("str", ENCODINGS))
TWOFOLD_ATTR_DEFAULTS = dict(dropped_planes=0, encoding="twos_complement")
# /cim/<layer>/adc_histogram.<encoding>.<rows>x<cols>: counts of partial sums per ADC channel
CIM_HISTOGRAM_PREFIX = "adc_histogram."
CIM_ATTRS = dict(activation_bits=("int", between(1, 16)), weight_bits=("int", between(2, 16)),
                 calibration_images=("int", at_least(1)))
# ResNet-20's largest weight, a 64 -> 64 3x3 conv; with one array per bit plane at most
# (weight_bits, bit_planes), no /model, /optimizer or /twofold dataset holds more than this
# times the run's bits
LARGEST_WEIGHT_ELEMENTS = STAGE_CHANNELS[-1] ** 2 * 3 * 3
MAX_BITS = 16
# a /cim ADC histogram holds (ADC channels) x (3 x crossbar rows + 1) counts: about 0.5 M for
# the largest layer on 128-row crossbars; 16 M (128 MB) leaves room for larger crossbars
MAX_CIM_ELEMENTS = 1 << 24
# the model buffers whose values have a range beyond being finite
MODEL_RANGES = {"running_var": at_least(0), "num_batches_tracked": at_least(0),
                "weight_bits": between(0, 1), "weight_scale": at_least(0)}


class _Invalid(Exception):
    """A checkpoint entry that is not what the format says; the message names its place."""


def load_checkpoint(path):
    """Reads a whole checkpoint into {"config", "model", "optimizer", "train", "twofold",
    "cim", "compact"} dictionaries, checking every dataset and attribute it reads: its type,
    dtype, range and finiteness (docs/reliability.md). Shapes and names are checked against
    the model when the arrays are restored. A compact checkpoint ("compact" True) reads as the
    full one it was made from, without optimizer, training state and /twofold's derived
    arrays (`_compact_twofold`)."""
    path = check_checkpoint_file(path)
    try:
        with h5py.File(path, "r") as f:
            file_format = f.attrs.get("format")
            if file_format not in (FORMAT, COMPACT_FORMAT):
                raise NptwofoldError(f"{path} is an HDF5 file but not an nptwofold checkpoint")
            compact = file_format == COMPACT_FORMAT
            readable = COMPACT_FORMAT_VERSION if compact else FORMAT_VERSION
            version = _attr(f, "format_version", "int", at_least(1))
            if version > readable:
                raise NptwofoldError(f"{path} has {file_format} format {version}; this "
                                     f"nptwofold reads up to {readable}")
            # in the current layout: older checkpoints kept the array's facts elsewhere
            config = upgraded(_attr(f, "config", "json", dict))
            try:
                TrainConfig.from_dict(config)
            except NptwofoldError as exc:
                raise _Invalid(f"/@config: {exc}") from None
            check_self_contained(f, path)
            content = dict(config=config, model=_arrays(_group(f, "model")),
                           optimizer=None, train=None, twofold=None, cim=None, compact=compact)
            if compact:
                if "twofold" in f:
                    content["twofold"] = _compact_twofold(_group(f, "twofold"),
                                                          content["model"])
                return content
            if "optimizer" in f:
                content["optimizer"] = _arrays(_group(f, "optimizer"))
            if "train" in f:
                group = _group(f, "train")
                # float runs written before the twofold method existed lack its entries,
                # whose values in a float run are known
                defaults = FLOAT_RUN_TRAIN_DEFAULTS if config.get("twofold") is None else {}
                content["train"] = {key: defaults[key] if key in defaults and key not in
                                    group.attrs else _attr(group, key, *kind)
                                    for key, kind in TRAIN_ATTRS.items()}
                _check_history(content["train"]["history"], content["train"]["epoch"])
            if "twofold" in f:
                content["twofold"] = {
                    name: dict(attrs={key: TWOFOLD_ATTR_DEFAULTS[key]
                                      if key in TWOFOLD_ATTR_DEFAULTS and key not in
                                      layer.attrs else _attr(layer, key, *kind)
                                      for key, kind in TWOFOLD_ATTRS.items()},
                               **{key: _dataset(layer, key, kinds)
                                  for key, kinds in TWOFOLD_DATASETS.items()},
                               **{key: _dataset(layer, key, kinds)
                                  for key, kinds in TWOFOLD_OPTIONAL_DATASETS.items()
                                  if key in layer})
                    for name, layer in _subgroups(_group(f, "twofold"))}
            if "cim" in f:
                group = _group(f, "cim")
                content["cim"] = dict(
                    {key: _attr(group, key, *kind) for key, kind in CIM_ATTRS.items()},
                    layers={name: dict(attrs=dict(activation_clip=_attr(
                        layer, "activation_clip", "float", above(0))),
                        **{key: _adc_histogram(layer, key) for key in layer
                           if key.startswith(CIM_HISTOGRAM_PREFIX)})
                        for name, layer in _subgroups(group)})
    except NptwofoldError:
        raise
    except _Invalid as exc:
        raise NptwofoldError(f"{path}: {exc}") from None
    except Exception as exc:  # h5py reports a damaged file with many exception types
        raise NptwofoldError(f"cannot read checkpoint {path}: truncated or corrupt "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return content


def _compact_twofold(group, model):
    """The /twofold entries (attrs and levels) of a compact checkpoint, each layer's levels
    checked against its bit width, encoding and dropped planes; adds to the `model` arrays the
    bit planes and scale they stand for. `Twofold.load_h5` checks the rest (the masks, and
    that every cut weight is at level 0)."""
    entries = {}
    for name, layer in _subgroups(group):
        attrs = {key: _attr(layer, key, *kind) for key, kind in TWOFOLD_ATTRS.items()}
        where, bits, encoding = layer.name, attrs["bits"], attrs["encoding"]
        levels = _dataset(layer, "levels", "i")
        try:
            highest, dtype = max_level(bits), level_dtype(bits)
        except NptwofoldError as exc:
            raise _Invalid(f"{where}/@bits: {exc}") from None
        if levels.dtype != dtype:
            raise _Invalid(f"{where}/levels is {levels.dtype}; {bits}-bit levels are {dtype}")
        if levels.size and not -highest <= levels.min() <= levels.max() <= highest:
            raise _Invalid(f"{where}/levels holds levels outside -{highest}..{highest}, the "
                           f"range of {bits}-bit weights")
        if not attrs["dropped_planes"] <= bits - 2:
            raise _Invalid(f"{where}/@dropped_planes {attrs['dropped_planes']} is more than "
                           f"b - 2 = {bits - 2}")
        if (levels % 2 ** attrs["dropped_planes"]).any():
            raise _Invalid(f"{where}/levels holds levels that are not multiples of 2^"
                           f"{attrs['dropped_planes']} (@dropped_planes)")
        if float(np.float32(attrs["scale"])) != attrs["scale"]:
            raise _Invalid(f"{where}/@scale {attrs['scale']} is not a float32 value")
        for key in ("weight_bits", "weight_scale"):
            if f"{name}.{key}" in model:
                raise _Invalid(f"/model/{name}.{key}: a compact checkpoint holds the mapped "
                               "layers in /twofold only")
        model[f"{name}.weight_bits"] = decompose(levels, bits, encoding).astype(np.float32)
        model[f"{name}.weight_scale"] = np.array([attrs["scale"]], np.float32)
        entries[name] = dict(attrs=attrs, levels=levels)
    return entries


def check_self_contained(f, path):
    """Refuses, before any data is read, an open HDF5 file `f` that reaches outside itself or
    declares more data than a checkpoint holds: links (external or soft: a checkpoint has
    none), datasets whose data lies in other files (external raw storage, virtual datasets),
    entries that are neither groups nor datasets, and datasets larger than the largest array
    of its run (a dataset with no stored data still reads as a full array of fill values)."""
    try:
        config = TrainConfig.from_dict(json.loads(f.attrs["config"]))
        bits = 1 if config.twofold is None else config.hardware.weight_bits
    except Exception:  # no valid config (nptwofold.inspect shows any file): the widest run
        bits = MAX_BITS

    def walk(group):
        for name in group:
            where = f"{group.name.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise NptwofoldError(f"{path}: {where} is a {type(link).__name__} (to "
                                     f"{_link_target(link)}); a checkpoint holds no links")
            node = group[name]
            if isinstance(node, h5py.Group):
                walk(node)
                continue
            if not isinstance(node, h5py.Dataset):
                raise NptwofoldError(f"{path}: {where} is not a group or a dataset")
            if node.is_virtual:
                raise NptwofoldError(f"{path}: {where} is a virtual dataset (its data lies in "
                                     "other files); a checkpoint holds its own data")
            if node.id.get_create_plist().get_external_count():
                raise NptwofoldError(f"{path}: {where} keeps its data in an external file; a "
                                     "checkpoint holds its own data")
            largest = (MAX_CIM_ELEMENTS if where.startswith("/cim/")
                       else bits * LARGEST_WEIGHT_ELEMENTS)
            if (node.size or 0) > largest:
                raise NptwofoldError(f"{path}: {where} declares {node.size} values "
                                     f"{node.shape}; no array of this checkpoint holds more "
                                     f"than {largest}")
    walk(f)


def _link_target(link):
    if isinstance(link, h5py.ExternalLink):
        return f"{link.filename}:{link.path}"
    return getattr(link, "path", "?")


def check_checkpoint_file(path):
    """`path` as a Path if it names an HDF5 file, else NptwofoldError saying what it is: a
    run folder (with the checkpoint to give instead), missing, or a file of another kind."""
    path = Path(path)
    if path.is_dir():
        hint = next((f"; give {path / name}" for name in ("last.h5", "post/last.h5")
                     if (path / name).is_file()), "")
        raise NptwofoldError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise NptwofoldError(f"checkpoint not found: {path}")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise NptwofoldError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if not is_hdf5:
        raise NptwofoldError(f"{path} is not an HDF5 file, so not a checkpoint (a checkpoint "
                             "is a run's last.h5 or best.h5)")
    return path


def _group(parent, name):
    node = parent.get(name)
    if not isinstance(node, h5py.Group):
        raise _Invalid(f"{parent.name.rstrip('/')}/{name} is missing or not a group")
    return node


def _subgroups(group):
    for name in group:
        yield name, _group(group, name)


def _dataset(group, name, kinds="biuf"):
    """The array of dataset `name`: numbers of the dtype kinds `kinds`, finite if floats."""
    node, where = group.get(name), f"{group.name}/{name}"
    if not isinstance(node, h5py.Dataset):
        raise _Invalid(f"{where} is missing or not a dataset")
    if node.dtype.kind not in kinds:
        raise _Invalid(f"{where} has dtype {node.dtype}, not numbers of kind '{kinds}'")
    value = node[()]
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise _Invalid(f"{where} has non-finite values")
    return np.asarray(value)


def _adc_histogram(group, name):
    """A cached ADC calibration histogram: (ADC channels, partial-sum values) counts >= 0."""
    value = _dataset(group, name, "iu")
    if value.ndim != 2 or not value.size or value.min() < 0:
        raise _Invalid(f"{group.name}/{name} is not a 2-D array of counts >= 0")
    return value


def _arrays(group):
    return {name: _dataset(group, name) for name in group}


def _attr(node, key, kind, allowed=None):
    """Attribute `key` of `node` as an int, float, tuple of ints ("ints"), one string of the
    tuple `allowed` ("str") or parsed JSON ("json", whose `allowed` is the Python type),
    checked against the Bound `allowed`."""
    where = f"{node.name.rstrip('/')}/@{key}"
    if key not in node.attrs:
        raise _Invalid(f"{where} is missing")
    value = node.attrs[key]
    if kind == "str":
        if not isinstance(value, str) or value not in allowed:
            raise _Invalid(f"{where} must be one of {', '.join(allowed)} (got {value!r})")
        return value
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
    if kind == "json":
        if not isinstance(value, str):
            raise _Invalid(f"{where} is not a JSON string")
        try:
            value = json.loads(value)
        except ValueError:
            raise _Invalid(f"{where} is not valid JSON") from None
        if not isinstance(value, allowed):
            raise _Invalid(f"{where} is not a JSON {allowed.__name__}")
        return value
    if kind == "ints":
        array = np.asarray(value) if isinstance(value, (np.ndarray, list)) else None
        if array is None or array.ndim != 1 or array.dtype.kind not in "iu" or not len(array):
            raise _Invalid(f"{where} is not a list of integers")
        if not all(int(item) in allowed for item in array):
            raise _Invalid(f"{where} has items outside {allowed}")
        return tuple(int(item) for item in array)
    # the writer stores ints and floats as such: another type is a damaged or crafted file
    if not number or isinstance(value, (float, np.floating)) != (kind == "float"):
        raise _Invalid(f"{where} is not {'an integer' if kind == 'int' else 'a float'} "
                       f"(got {value!r})")
    value = int(value) if kind == "int" else float(value)
    if not math.isfinite(value) or (allowed is not None and value not in allowed):
        raise _Invalid(f"{where} must be {allowed} (got {value})")
    return value


def _check_history(history, epoch):
    """/train@history: one record per finished epoch, each of finite numbers."""
    for number, record in enumerate(history, 1):
        if not (isinstance(record, dict) and record.get("epoch") == number and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in record.values())):
            raise _Invalid(f"/train/@history record {number} is not a record of epoch "
                           f"{number} of finite numbers")
    if len(history) != epoch:
        raise _Invalid(f"/train/@history has {len(history)} records for {epoch} finished "
                       "epochs")


def restore_arrays(target, arrays, group, path):
    """Copies `arrays` into the same-named arrays of `target`, which must match exactly in
    names, shapes and dtypes, with values in MODEL_RANGES."""
    target = dict(target)
    if set(target) != set(arrays):
        missing = sorted(set(target) - set(arrays))
        extra = sorted(set(arrays) - set(target))
        raise NptwofoldError(f"{path}: /{group} does not match this model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, value in arrays.items():
        where = f"{path}: /{group}/{name}"
        if target[name].shape != value.shape or target[name].dtype != value.dtype:
            raise NptwofoldError(f"{where} is {value.dtype} {value.shape}, the model needs "
                                 f"{target[name].dtype} {target[name].shape}")
        allowed = MODEL_RANGES.get(name.rsplit(".", 1)[-1]) if group == "model" else None
        if allowed is not None and not all(v in allowed for v in (value.min(), value.max())):
            raise NptwofoldError(f"{where} has values outside {allowed}")
    for name, value in arrays.items():
        target[name][...] = value


def restore_model(model, content, path):
    restore_arrays(model.state_arrays(), content["model"], "model", path)


def restore_optimizer(optimizer, content, path):
    if content["optimizer"] is None:
        raise NptwofoldError(f"{path} holds no optimizer state, so it cannot resume training")
    restore_arrays(optimizer.velocity.items(), content["optimizer"], "optimizer", path)
