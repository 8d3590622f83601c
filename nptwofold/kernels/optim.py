"""SGD with momentum (optionally Nesterov) and L2 weight decay, in place, PyTorch semantics."""
import numba
from numba import prange


@numba.njit(parallel=True, cache=True)
def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    """v = mu v + (g + wd p);  p -= lr (g + wd p + mu v) if Nesterov else lr v."""
    p = param.ravel()
    g = grad.ravel()
    v = velocity.ravel()
    for i in prange(p.size):
        step = g[i] + weight_decay * p[i]
        v[i] = momentum * v[i] + step
        p[i] -= lr * (step + momentum * v[i] if nesterov else v[i])
