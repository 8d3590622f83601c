"""Models from configs and checkpoints: build the network of a `TrainConfig` (with its Twofold
state), load a checkpoint's arrays into it, or both at once to evaluate a checkpoint."""
import dataclasses

import numpy as np

from .checkpoint import load_checkpoint, restore_model
from .config import TrainConfig
from .errors import NptwofoldError
from .model import ResNet20
from .twofold import Twofold

INIT_STREAM = 0  # random stream (seed, 0) draws the initial weights


def build_model(config, init_content=None):
    """ResNet-20 for `config`, with its Twofold method state if the config has one.

    A float baseline given as `init_content` is loaded before the weights become bit planes
    (they are quantized from it); a twofold checkpoint is loaded after, into the bit planes.
    """
    model = ResNet20(np.random.default_rng([config.seed, INIT_STREAM]))
    # {} is a twofold config with every default: only None (or no entry) means a float model
    init_is_twofold = bool(init_content) and init_content["config"].get("twofold") is not None
    if init_content and not init_is_twofold:
        restore_model(model, init_content, config.init)
    if config.twofold is None:
        if init_is_twofold:
            raise NptwofoldError(f"{config.init} is a twofold checkpoint; a float run cannot "
                                 "start from it")
        return model, None
    method = Twofold(model, config.twofold, config.seed, config.hardware)
    if init_is_twofold:
        restore_state(model, method, init_content, config.init)
    return model, method


def restore_state(model, method, content, path):
    """Loads a checkpoint's model arrays; for a twofold model also its /twofold group (dropped
    planes, and the check of the stored masks)."""
    restore_model(model, content, path)
    if method is None:
        return
    if content.get("twofold") is None:
        raise NptwofoldError(f"{path} has a twofold config but no /twofold group")
    method.load_h5(content["twofold"], path)


def load_model(path):
    """(model, Twofold state or None, checkpoint content) of a checkpoint, to evaluate it."""
    content = load_checkpoint(path)
    config = dataclasses.replace(TrainConfig.from_dict(content["config"]), init=None)
    model, method = build_model(config)
    restore_state(model, method, content, path)
    return model, method, content


def checkpoint_hardware(content):
    """The `HardwareConfig` a loaded checkpoint's model was made for (older checkpoints:
    `config.upgraded`)."""
    return TrainConfig.from_dict(content["config"]).hardware
