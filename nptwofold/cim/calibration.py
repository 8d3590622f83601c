"""Calibration: the measurement of the activation clips (`input_maxima`, shared by the CIM
and the energy regularizer), and the files that cache the clips and ADC partial-sum histograms
of a checkpoint, beside it, so that evaluating a checkpoint never changes it.

A file holds one calibration (HDF5; docs/checkpoint-format.md):
  /                 attrs format, format_version, weights_digest, images_digest, settings (JSON:
                    activation_bits, weight_bits, calibration_images)
  /<layer>          attr activation_clip; datasets adc_histogram.<encoding>.<rows>x<cols>
The digests are SHA-256 of the model's arrays and mapped levels, and of the calibration images;
an entry computed from anything else is recalibrated, and the note says why. Every array read
back is checked (dtype, shape, range, finiteness) like a checkpoint's, and a file that is not
a calibration file is refused in one line.
"""
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import NptwofoldError
from ..files import atomic_write
from ..kernels.augment import to_float
from .device import MAX_CELL_STATE, adc_channels

FORMAT = "nptwofold-cim-calibration"
FORMAT_VERSION = 1
SUFFIX = ".cim.h5"
HISTOGRAM_PREFIX = "adc_histogram."
# the old cache: the /cim group older versions wrote into the checkpoint itself
LEGACY_NOTE = "read from the checkpoint's /cim group (written before calibration files)"


def input_maxima(model, layers, images, forward, batch_size):
    """{name: max of the layer's input over uint8 `images`}, each mapped layer of `layers`
    ({name: WeightLayer}) computing forward(module, x) meanwhile: the measurement behind every
    activation clip. The CIM calibration runs it with the quantized, masked weights
    (`CimNetwork.calibrate`); the energy regularizer with the weights as trained
    (`Twofold.measure_activity`)."""
    maxima = dict.fromkeys(layers, 0.0)
    names = {id(module): name for name, module in layers.items()}

    def observe(module, x):
        name = names[id(module)]
        maxima[name] = max(maxima[name], float(x.max()))
        return forward(module, x)

    for module in layers.values():
        module.use_forward_op(observe)
    try:
        for start in range(0, len(images), batch_size):
            model.forward(to_float(images[start:start + batch_size]))
    finally:
        for module in layers.values():
            module.use_forward_op(None)
    return maxima


def default_path(checkpoint):
    """The calibration file of a checkpoint: beside it, CKPT.cim.h5."""
    return Path(str(checkpoint) + SUFFIX)


def weights_digest(network):
    """SHA-256 of every model array (name, dtype, shape, bytes) and every mapped layer's
    stored levels: any change to what the array holds or computes changes it."""
    digest = hashlib.sha256()
    for name, value in network.model.state_arrays():
        digest.update(f"{name} {value.dtype} {value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    for name, layer in network.layers.items():
        levels = np.ascontiguousarray(layer.kept_levels, np.int64)
        digest.update(f"{name} {layer.bits} {levels.shape}".encode())
        digest.update(levels.tobytes())
    return digest.hexdigest()


def images_digest(images):
    digest = hashlib.sha256(f"{images.dtype} {images.shape}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def histogram_key(hardware):
    """The name of the ADC histograms of an encoding and crossbar size."""
    return (f"{HISTOGRAM_PREFIX}{hardware.weight_encoding}.{hardware.crossbar_rows}x"
            f"{hardware.crossbar_cols}")


def _histogram_shape(key, bits):
    """(ADC channels, 3T + 1) of the histograms a key names, or None for a malformed key."""
    parts = key[len(HISTOGRAM_PREFIX):].split(".")
    if len(parts) != 2 or "x" not in parts[1]:
        return None
    rows = parts[1].split("x")[0]
    try:
        return len(adc_channels(parts[0], bits)), MAX_CELL_STATE * int(rows) + 1
    except (NptwofoldError, ValueError):
        return None


class CalibrationCache:
    """The calibration of one network on given images, read from and written to `path`.

    `prepare` gives the network its clips and ADC ranges: from the file when its digests
    match, else from the checkpoint's old /cim group (`legacy`), else calibrated now;
    `ensure_adc` counts the ranges of another encoding or crossbar size when needed; `save`
    writes what was calibrated. `notes` says, for the report, what happened."""

    def __init__(self, path, images, batch_size=100, recalibrate=False, legacy=None,
                 log=print):
        self.path = Path(path)
        self.images = images
        self.batch_size = batch_size
        self.recalibrate = recalibrate
        self.legacy = legacy
        self.log = log
        self.notes = []
        self.changed = False
        self.expected = None

    def settings(self, network):
        return dict(activation_bits=network.activation_bits,
                    weight_bits=network.hardware.weight_bits,
                    calibration_images=len(self.images))

    def prepare(self, network):
        self.expected = dict(weights_digest=weights_digest(network),
                             images_digest=images_digest(self.images),
                             settings=self.settings(network))
        restored = False
        if not self.recalibrate:
            restored = self._restore_file(network) or self._restore_legacy(network)
        if not restored:
            self._calibrate(network, clips=True)
        else:
            self.ensure_adc(network)

    def _restore_file(self, network):
        if not self.path.exists():
            return False
        stored = read_calibration(self.path, network.layers)
        differing = [what for key, what in (("weights_digest", "weights"),
                                            ("images_digest", "calibration images"),
                                            ("settings", "settings"))
                     if stored[key] != self.expected[key]]
        if differing:
            self.notes.append(f"{self.path} was computed from other {' and '.join(differing)}:"
                              " recalibrated")
            return False
        network.set_calibration(stored["clips"], stored["histograms"])
        self.notes.append(f"read from {self.path}")
        return True

    def _restore_legacy(self, network):
        stored = self.legacy
        if not stored or stored["layers"].keys() != network.layers.keys() or {
                key: stored.get(key) for key in self.expected["settings"]
        } != self.expected["settings"]:
            return False
        clips = {name: float(group["attrs"]["activation_clip"])
                 for name, group in stored["layers"].items()}
        histograms = {}
        for name, group in stored["layers"].items():
            for key, histogram in group.items():
                if key.startswith(HISTOGRAM_PREFIX):
                    histograms.setdefault(key, {})[name] = np.asarray(histogram)
        network.set_calibration(clips, histograms)
        self.notes.append(LEGACY_NOTE)
        self.changed = True  # copied into the calibration file
        return True

    def _calibrate(self, network, clips):
        what = "activation clips and ADC ranges" if clips else (
            f"ADC ranges of {network.hardware.weight_encoding} on "
            f"{network.hardware.crossbar_rows}x{network.hardware.crossbar_cols} crossbars")
        self.log(f"calibrating the {what} on {len(self.images)} training images")
        unread = []
        if clips:
            calibrated = network.calibrate(self.images, self.batch_size)
            unread = [name for name, clip in calibrated.items() if clip == 0]
        else:
            network.calibrate_adc(self.images, self.batch_size)
        self.notes.append(f"{what} calibrated now")
        if unread:
            self.notes.append(f"the inputs of {', '.join(unread)} were all 0 on the "
                              "calibration images: clip 0, the array reads nothing there")
        self.changed = True

    def ensure_adc(self, network):
        """Counts the ADC ranges `network`'s hardware needs if they are not known yet."""
        if network.hardware.needs_adc_ranges and not network.adc_calibrated:
            self._calibrate(network, clips=False)

    def save(self, network):
        """Writes `network`'s calibration (every histogram it knows) if anything was
        calibrated; a folder that cannot be written leaves it uncached, said in the notes."""
        if not self.changed:
            return
        folder = self.path.parent
        if not os.access(folder, os.W_OK) or (self.path.exists()
                                              and not os.access(self.path, os.W_OK)):
            self.notes.append(f"not cached: {self.path} is not writable")
            return
        write_calibration(self.path, self.expected, network)
        self.notes.append(f"stored in {self.path}")


    def pin(self, network, path):
        """Writes this calibration as the one of `network`'s current weights, to `path`:
        ADC-aware fine-tuning keeps the ranges it adapted to, so they belong to its output."""
        write_calibration(path, dict(self.expected, weights_digest=weights_digest(network)),
                          network)


def write_calibration(path, expected, network):
    """Writes `network`'s clips and ADC histograms with the digests they were computed from."""
    def write(tmp):
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION,
                           weights_digest=expected["weights_digest"],
                           images_digest=expected["images_digest"],
                           settings=json.dumps(expected["settings"], sort_keys=True))
            for name, layer in network.layers.items():
                group = f.create_group(name)
                group.attrs["activation_clip"] = layer.clip
                for key, histograms in network.adc_histograms.items():
                    group.create_dataset(key, data=histograms[name])
    atomic_write(path, write)


def read_calibration(path, layers):
    """{"weights_digest", "images_digest", "settings", "clips", "histograms"} of a calibration
    file for these mapped `layers`, every entry checked; NptwofoldError naming the place in
    the file otherwise."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise NptwofoldError(f"{path} is not an nptwofold calibration file")
            version = f.attrs.get("format_version")
            if not isinstance(version, (int, np.integer)) or not 1 <= version <= FORMAT_VERSION:
                raise NptwofoldError(f"{path}: /@format_version {version!r} is not one this "
                                     f"nptwofold reads (1..{FORMAT_VERSION})")
            stored = {key: _text_attr(f, key, path)
                      for key in ("weights_digest", "images_digest", "settings")}
            try:
                stored["settings"] = json.loads(stored["settings"])
            except ValueError:
                raise NptwofoldError(f"{path}: /@settings is not valid JSON") from None
            bits = stored["settings"].get("weight_bits") if isinstance(
                stored["settings"], dict) else None
            if set(f) != set(layers):
                raise NptwofoldError(f"{path}: its layers do not match the model's")
            stored["clips"], stored["histograms"] = {}, {}
            for name in layers:
                group = f.get(name, getlink=True)
                if not isinstance(group, h5py.HardLink) or not isinstance(f[name], h5py.Group):
                    raise NptwofoldError(f"{path}: /{name} is not a group")
                clip = f[name].attrs.get("activation_clip")
                if (not isinstance(clip, (float, np.floating)) or not np.isfinite(clip)
                        or clip < 0):
                    raise NptwofoldError(f"{path}: /{name}/@activation_clip must be a finite "
                                         f"float >= 0 (got {clip!r})")
                stored["clips"][name] = float(clip)
                for key in f[name]:
                    stored["histograms"].setdefault(key, {})[name] = _histogram(
                        f[name], key, bits, path)
    except NptwofoldError:
        raise
    except Exception as exc:  # h5py reports a damaged file with many exception types
        raise NptwofoldError(f"cannot read calibration file {path}: truncated or corrupt "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return stored


def _text_attr(f, key, path):
    value = f.attrs.get(key)
    if not isinstance(value, str):
        raise NptwofoldError(f"{path}: /@{key} is missing or not text")
    return value


def _histogram(group, key, bits, path):
    """One ADC histogram: int64 counts >= 0 of the shape its key names."""
    where = f"{path}: {group.name}/{key}"
    link = group.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink) or not isinstance(group[key], h5py.Dataset):
        raise NptwofoldError(f"{where} is not a dataset")
    shape = _histogram_shape(key, bits) if key.startswith(HISTOGRAM_PREFIX) else None
    dataset = group[key]
    if shape is None or dataset.shape != shape:
        raise NptwofoldError(f"{where} has shape {dataset.shape}; its name calls for "
                             f"{shape or 'a known encoding and crossbar size'}")
    if dataset.dtype != np.int64:
        raise NptwofoldError(f"{where} has dtype {dataset.dtype}, not int64 counts")
    value = dataset[()]
    if value.min() < 0:
        raise NptwofoldError(f"{where} has negative counts")
    return value
