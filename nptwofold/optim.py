"""SGD optimizer state: one momentum buffer per parameter, updated by the SGD kernel."""
import numpy as np

from .kernels.optim import sgd_momentum_update
from .threads import run_parallel


class SGD:
    """Updates every parameter; those named in `no_decay` without weight decay."""

    def __init__(self, model, momentum=0.9, weight_decay=0.0, nesterov=False, no_decay=()):
        self.model = model
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.no_decay = set(no_decay)
        self.velocity = {name: np.zeros_like(param) for name, param, _ in model.named_parameters()}

    def step(self, lr):
        """One update; the parameters are independent, so the pool takes them one each."""
        parameters = list(self.model.named_parameters())

        def update(index):
            name, param, grad = parameters[index]
            decay = 0.0 if name in self.no_decay else self.weight_decay
            sgd_momentum_update(param, grad, self.velocity[name], lr, self.momentum, decay,
                                self.nesterov)

        run_parallel(update, len(parameters))
