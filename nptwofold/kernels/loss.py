"""Softmax cross-entropy and the distillation loss, averaged over the batch."""
import numba
import numpy as np


@numba.njit(cache=True)
def _log_softmax_row(row, temperature, out):
    """out = log softmax(row / temperature), shifted by the row's max so exp() cannot
    overflow."""
    n_classes = row.shape[0]
    top = row[0]
    for k in range(1, n_classes):
        top = max(top, row[k])
    top /= temperature
    norm = 0.0
    for k in range(n_classes):
        norm += np.exp(row[k] / temperature - top)
    log_norm = np.log(norm) + top
    for k in range(n_classes):
        out[k] = row[k] / temperature - log_norm


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


@numba.njit(cache=True)
def distillation_loss(logits, teacher_logits, labels, temperature, weight):
    """Hinton et al.'s knowledge distillation: the mean over the batch of
    (1 - weight) CE(labels, softmax(z)) + weight T^2 KL(softmax(t / T) || softmax(z / T)),
    z the logits, t the teacher's, T the temperature (T^2 keeps the soft term's gradient on
    the scale of the hard one's as T changes). Returns (mean loss, its gradient to the
    logits, count of correct argmax); with weight 0 exactly `softmax_cross_entropy`'s."""
    n_rows, n_classes = logits.shape
    hard_loss, dlogits, correct = softmax_cross_entropy(logits, labels)
    log_student, log_teacher = np.empty(n_classes), np.empty(n_classes)
    soft_loss = 0.0
    for n in range(n_rows):
        _log_softmax_row(logits[n], temperature, log_student)
        _log_softmax_row(teacher_logits[n], temperature, log_teacher)
        for k in range(n_classes):
            teacher_p = np.exp(log_teacher[k])
            soft_loss += teacher_p * (log_teacher[k] - log_student[k])
            dlogits[n, k] = ((1.0 - weight) * dlogits[n, k] + weight * temperature
                             * (np.exp(log_student[k]) - teacher_p) / n_rows)
    return ((1.0 - weight) * hard_loss + weight * temperature ** 2 * soft_loss / n_rows,
            dlogits, correct)
