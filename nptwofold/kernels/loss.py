"""Softmax cross-entropy, averaged over the batch."""
import numba
import numpy as np


@numba.njit(cache=True)
def softmax_cross_entropy(logits, labels):
    """Returns (mean loss, gradient of the mean loss to the logits, count of correct argmax)."""
    n_rows, n_classes = logits.shape
    dlogits = np.empty_like(logits)
    total_loss = 0.0
    correct = 0
    for n in range(n_rows):
        top = logits[n, 0]
        best = 0
        for k in range(1, n_classes):
            if logits[n, k] > top:
                top = logits[n, k]
                best = k
        correct += best == labels[n]
        norm = 0.0  # shifting by the max keeps exp() from overflowing
        for k in range(n_classes):
            norm += np.exp(logits[n, k] - top)
        total_loss += np.log(norm) + top - logits[n, labels[n]]
        for k in range(n_classes):
            dlogits[n, k] = np.exp(logits[n, k] - top) / norm / n_rows
        dlogits[n, labels[n]] -= 1.0 / n_rows
    return total_loss / n_rows, dlogits, correct
