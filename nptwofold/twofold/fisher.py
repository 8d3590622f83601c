"""What the post-training's choices are checked with: the diagonal empirical Fisher of the
loss in every mapped weight (`weight_fisher`), and the cross-entropy on check images with BN on
their own statistics (`plane_check_loss`).
"""
import contextlib

import numpy as np

from ..errors import NptwofoldError
from ..kernels.augment import to_float
from ..kernels.loss import softmax_cross_entropy


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")

FISHER_BATCH = 50  # images per backward of the rounding's Fisher estimate


def weight_fisher(method):
    """Diagonal empirical Fisher F_i of the mean cross-entropy in every mapped weight W_i,
    on the first `plane_drop_images` training images: B times the mean over batches of B =
    FISHER_BATCH images of the squared batch gradient (a batch gradient's square averages
    to 1/B of a single image's when the mean gradient is small). BN runs on batch
    statistics and its running statistics are left as they were."""
    if (method.activity_images is None or method.check_labels is None
            or not len(method.activity_images)):
        raise NptwofoldError("the budgeted energy rounding needs training images and labels; "
                             "none were given")
    count = method.config.plane_drop_images
    images, labels = method.activity_images[:count], method.check_labels[:count]
    fisher = {name: np.zeros(layer.params["weight_bits"].shape[1:])
              for name, layer in method.layers.items()}
    batches = range(0, len(images), FISHER_BATCH)
    with kept_bn_statistics(method.model):
        for start in batches:
            logits = method.model.forward(to_float(images[start:start + FISHER_BATCH]))
            dlogits = softmax_cross_entropy(logits, labels[start:start + FISHER_BATCH])[1]
            method.model.backward(dlogits)
            for name, layer in method.layers.items():
                fisher[name] += np.square(layer.weight_grad, dtype=np.float64)
    for value in fisher.values():
        value *= FISHER_BATCH / len(batches)
    return fisher

@contextlib.contextmanager
def kept_bn_statistics(model):
    """Runs the block with the model in training mode (BN on each batch's own statistics) and
    puts the BN running statistics and the model's mode back afterwards: right after hard
    pruning the running statistics are stale until the fine-tune re-estimates them, and would
    judge the model on a broken network."""
    bn_state = {name: value.copy() for name, value in model.state_arrays()
                if name.rsplit(".", 1)[-1] in BN_STATISTICS}
    training = model.training
    model.train()
    try:
        yield
    finally:
        for name, value in model.state_arrays():
            if name in bn_state:
                value[...] = bn_state[name]
        model.train(training)


def plane_check_loss(model, images, labels):
    """Cross-entropy on uint8 `images`, with BN on the images' own batch statistics
    (`kept_bn_statistics`)."""
    with kept_bn_statistics(model):
        logits = model.forward(to_float(images))
    return softmax_cross_entropy(logits, labels)[0]
