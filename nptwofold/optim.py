"""SGD optimizer state: one momentum buffer per parameter, updated by the SGD kernel."""
import numpy as np

from .kernels.optim import sgd_momentum_update


class SGD:
    def __init__(self, model, momentum=0.9, weight_decay=0.0, nesterov=False):
        self.model = model
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.velocity = {name: np.zeros_like(param) for name, param, _ in model.named_parameters()}

    def step(self, lr):
        for name, param, grad in self.model.named_parameters():
            sgd_momentum_update(param, grad, self.velocity[name], lr, self.momentum,
                                self.weight_decay, self.nesterov)
