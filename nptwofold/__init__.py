"""nptwofold: Twofold Sparsity (LFSR network pruning + bit-level sparsity) on plain CPUs.

NumPy + Numba kernels live in `nptwofold.kernels`; layers, the ResNet-20 model, data loading,
checkpoints and training each have their own module.
"""

__version__ = "0.1.0"
