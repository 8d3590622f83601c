"""Probe: a float fine-tune of the hard-pruned baseline under the energy method's LFSR masks
(p = 0.7, one mask per column tile, dense stem and classifier), to compare with training the
bit planes. The trainer's own loop, with the masks applied again after every SGD update.
Run from the repository root:

    python results/budget-p70/one-epoch/float_masked.py cifar10 runs/float-masked 0.05 1
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from nptwofold.threads import configure_threads  # noqa: E402  (must precede numpy)

configure_threads(1)
import numpy as np  # noqa: E402

from nptwofold.config import TrainConfig  # noqa: E402
from nptwofold.data import load_dataset  # noqa: E402
from nptwofold.hardware import HardwareConfig  # noqa: E402
from nptwofold.model import ResNet20  # noqa: E402
from nptwofold.train import Trainer  # noqa: E402
from nptwofold.twofold import Twofold, TwofoldConfig  # noqa: E402

data_spec, out, lr, epochs = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
config = TrainConfig.from_preset("short", data=data_spec, epochs=epochs, lr=lr,
                                 warmup_epochs=0.0, init="results/long-seed0/model.h5")
trainer = Trainer(config, load_dataset(config.data), out, progress=False)
# the masks of the twofold runs (training seed 0), taken from a Twofold of a second model
masks = Twofold(ResNet20(np.random.default_rng(0)),
                TwofoldConfig(sparsity=0.7, mask_group=0, stem_sparsity=0.0,
                              classifier_sparsity=0.0), 0,
                HardwareConfig(weight_encoding="sign_magnitude"))
layers = {name.rstrip("."): module for name, module in trainer.model.named_modules()
          if name.rstrip(".") in masks.layers}


def apply_masks():
    for name, layer in layers.items():
        layer.params["weight"] *= masks.keep_mask(name)


sgd_step = trainer.optimizer.step


def masked_step(step_lr):
    sgd_step(step_lr)
    apply_masks()


apply_masks()
trainer.optimizer.step = masked_step
trainer.run()
