"""One training step and an evaluation pass: the engine calls a run is made of."""
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .kernels.augment import to_float
from .kernels.loss import distillation_loss, softmax_cross_entropy
from .threads import image_chunks, run_parallel


class Teacher(NamedTuple):
    """A trained model whose logits are soft targets (`distillation_loss`)."""
    model: object
    temperature: float
    weight: float


def train_step(model, optimizer, images, labels, lr, method=None, teacher=None):
    """One forward, backward and update. Returns (mean loss, correct, regularizer values).

    `method` (a Twofold) adds its regularizer gradients and clamps the bits after the update;
    `teacher` (a Teacher) makes the loss the distillation loss on its logits for `images`.
    """
    model.train()
    logits = model.forward(images)
    if teacher is None:
        loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    else:
        loss, dlogits, correct = distillation_loss(
            logits, inference_logits(teacher.model, images), labels, teacher.temperature,
            teacher.weight)
    model.backward(dlogits)
    regularizers = method.regularize() if method is not None else {}
    optimizer.step(lr)
    if method is not None:
        method.after_step()
    return loss, correct, regularizers


def predict(model, images):
    """Logits of `model` in inference mode for uint8 images."""
    return inference_logits(model, images, to_float)


def inference_logits(model, inputs, to_input=None):
    """Logits of `model` in inference mode for a batch of network inputs (or of what
    `to_input` turns into them, a chunk at a time).

    Inference has no batch statistics, so each image chunk runs the whole network as one pool
    task: its activations stay in that core's cache and the pool synchronizes once per call
    instead of once per kernel. The chunks are those a batch-wide forward would use, so the
    logits do not depend on the thread count.
    """
    model.eval()
    chunks = image_chunks(len(inputs))
    logits = [None] * len(chunks)

    def forward_chunk(index):
        start, stop = chunks[index]
        chunk = inputs[start:stop]
        logits[index] = model.forward(chunk if to_input is None else to_input(chunk))

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
