"""One training step and an evaluation pass: the engine calls a run is made of."""
from tqdm import tqdm

from .kernels.augment import to_float
from .kernels.loss import softmax_cross_entropy


def train_step(model, optimizer, images, labels, lr, method=None):
    """One forward, backward and update. Returns (mean loss, correct, regularizer values).

    `method` (a Twofold) adds its regularizer gradients and clamps the bits after the update.
    """
    model.train()
    logits = model.forward(images)
    loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    model.backward(dlogits)
    regularizers = method.regularize() if method is not None else {}
    optimizer.step(lr)
    if method is not None:
        method.after_step()
    return loss, correct, regularizers


def evaluate(model, images, labels, batch_size=500, progress=False):
    """Mean loss and accuracy of `model` (inference mode) on uint8 images."""
    model.eval()
    total_loss, correct = 0.0, 0
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
        logits = model.forward(to_float(images[start:start + batch_size]))
        loss, _, hits = softmax_cross_entropy(logits, labels[start:start + batch_size])
        total_loss += loss * len(logits)
        correct += hits
    return total_loss / len(images), correct / len(images)
