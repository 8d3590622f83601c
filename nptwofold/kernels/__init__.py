"""Stateless Numba kernels over arrays."""
