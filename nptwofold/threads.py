"""Thread set-up, applied before NumPy and Numba load (their pools read the environment once).

One level of parallelism at a time: BLAS threads carry the convolution matmuls, which are most
of the work, and the Numba kernels run on one thread. On the 2-core development machines,
letting both pools spin at once was measured about 2x slower than this split.
"""
import os
import sys


def configure_threads(threads):
    if "numpy" in sys.modules or "numba" in sys.modules:
        raise RuntimeError("configure_threads must run before numpy/numba are imported")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    os.environ["NUMBA_NUM_THREADS"] = "1"
