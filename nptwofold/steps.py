"""One training step and an evaluation pass: the engine calls a run is made of."""
import numpy as np
from tqdm import tqdm

from .kernels.augment import to_float
from .kernels.loss import softmax_cross_entropy
from .threads import image_chunks, run_parallel


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


def predict(model, images):
    """Logits of `model` in inference mode for uint8 images.

    Inference has no batch statistics, so each image chunk runs the whole network as one pool
    task: its activations stay in that core's cache and the pool synchronizes once per call
    instead of once per kernel. The chunks are those a batch-wide forward would use, so the
    logits do not depend on the thread count.
    """
    model.eval()
    chunks = image_chunks(len(images))
    logits = [None] * len(chunks)

    def forward_chunk(index):
        start, stop = chunks[index]
        logits[index] = model.forward(to_float(images[start:stop]))

    with model.fixed_weights():
        run_parallel(forward_chunk, len(chunks))
    return np.concatenate(logits)


def evaluate(model, images, labels, batch_size=500, progress=False):
    """Mean loss and accuracy of `model` (inference mode) on uint8 images."""
    total_loss, correct = 0.0, 0
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="eval", leave=False, disable=not progress):
        logits = predict(model, images[start:start + batch_size])
        loss, _, hits = softmax_cross_entropy(logits, labels[start:start + batch_size])
        total_loss += loss * len(logits)
        correct += hits
    return total_loss / len(images), correct / len(images)
