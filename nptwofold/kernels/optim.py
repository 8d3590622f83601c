"""SGD with momentum (optionally Nesterov) and L2 weight decay, in place, PyTorch semantics."""
import numba


@numba.njit(nogil=True, cache=True)
def sgd_momentum_update(param, grad, velocity, lr, momentum, weight_decay, nesterov):
    """v = mu v + (g + wd p);  p -= lr (g + wd p + mu v) if Nesterov else lr v.

    Element-wise and single-threaded: the optimizer spreads the parameters over the pool.
    """
    p = param.reshape(-1)
    g = grad.reshape(-1)
    v = velocity.reshape(-1)
    for i in range(p.size):
        step = g[i] + weight_decay * p[i]
        v[i] = momentum * v[i] + step
        p[i] -= lr * (step + momentum * v[i] if nesterov else v[i])
