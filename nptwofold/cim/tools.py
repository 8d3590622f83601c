"""What the CIM scripts share (`scripts/cim_eval.py`, `scripts/adc_finetune.py`,
`scripts/cim_mask_groups.py`): their common flags, with one name and one default each; the
array a checkpoint is run on (the one it stores, with the command line's changes, reported);
its data; and its calibration file."""
import dataclasses

from ..build import checkpoint_hardware, load_model
from ..config import dataset_name
from ..data import load_dataset
from ..hardware import (HardwareConfig, add_hardware_flags, describe, given_hardware,
                        resolve_hardware)
from ..options import (MAX_EVAL_BATCH_SIZE, add_flags, at_least, between, check_fields,
                       given_values, option)
from .calibration import CalibrationCache, default_path


@dataclasses.dataclass
class EvalOptions:
    """The settings every CIM script takes the same way."""
    data: str | None = option(None, "CIFAR-10 tarball or folder, 'sample' or 'cifar10'")
    images: int | None = option(None, "first N test images", at_least(1))
    calib_images: int = option(500, "training images (the first ones) that calibrate the "
                               "activation clips and ADC ranges", at_least(1))
    calibration: str | None = option(None, "calibration file to read and write")
    recalibrate: bool = option(False, "calibrate again even if the calibration file matches")
    eval_batch_size: int = option(50, "images per simulated batch (results do not depend on "
                                  "it)", between(1, MAX_EVAL_BATCH_SIZE))


# what an omitted flag means, where the field's default (None) does not say it
SHOWN_DEFAULTS = dict(data="the dataset the checkpoint names", images="all",
                      calibration="CKPT.cim.h5 beside the checkpoint")


def add_cim_flags(parser, hardware_skip=(), skip=()):
    """The flags of `EvalOptions` (except `skip`) and of the array
    (`hardware.add_hardware_flags`, whose omitted flags mean the checkpoint's values)."""
    add_flags(parser, EvalOptions, skip=skip, shown_defaults=SHOWN_DEFAULTS)
    return add_hardware_flags(parser, skip=hardware_skip, shown_default="the checkpoint's")


def options_of(args):
    return check_fields(EvalOptions(**given_values(args, EvalOptions)))


def open_checkpoint(path, args, hardware_skip=()):
    """(model, Twofold state or None, content, hardware, notes): the checkpoint's model and
    the array it runs on: the one the checkpoint stores, changed by the given flags; each
    note names a flag that contradicts the stored value."""
    given = given_hardware(args, skip=hardware_skip)
    HardwareConfig.from_json(given)  # a bad value is refused before the checkpoint is read
    model, method, content = load_model(path)
    hardware, notes = resolve_hardware(checkpoint_hardware(content), given)
    return model, method, content, hardware, notes


def hardware_line(hardware, notes):
    """The report's line on the array used: the checkpoint's, or which flags changed it."""
    source = "the checkpoint's" if not notes else "the checkpoint's, changed: " + "; ".join(
        notes)
    return f"array: {describe(hardware)} ({source})"


def dataset_of(options, content):
    """The data given, else the dataset the checkpoint names (a name, never a path)."""
    return load_dataset(options.data or dataset_name(content["config"].get("data", "cifar10")))


def calibration_cache(checkpoint, options, dataset, log=print, content=None):
    """The CalibrationCache of a checkpoint on the options' calibration images."""
    return CalibrationCache(options.calibration or default_path(checkpoint),
                            dataset.train_images[:options.calib_images], options.eval_batch_size,
                            options.recalibrate, legacy=(content or {}).get("cim"), log=log)
