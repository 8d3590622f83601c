"""The engine's one thread pool, and the thread set-up applied before NumPy and Numba load.

Work is split by images into chunks of a fixed size, `CHUNK_IMAGES`, whatever the thread
count: every chunk runs single-threaded (nogil) Numba kernels and, where a kernel falls back
to im2col, single-threaded BLAS matmuls on its own images, and anything summed over the batch
(weight gradients, batch norm statistics) is summed chunk by chunk in chunk order. A chunk's
result therefore does not depend on which thread computed it, and training is bit-identical
at any thread count.

One pool only: Python threads, which spend nearly all their time in code that has released
the GIL. BLAS and Numba are each held to one thread, so no two pools spin against each
other; a chunk of 8 images also keeps its activations in the core's L2 cache.
"""
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK_IMAGES = 8
_THREADS_VARIABLE = "NPTWOFOLD_THREADS"
_pool = None
_scratch = threading.local()
_in_pool_task = threading.local()  # .active: this thread is running a run_parallel call


def configure_threads(threads, numba_threads=1):
    """Give the engine `threads` threads; BLAS gets one, Numba `numba_threads`.

    The engine's Numba kernels run single-threaded inside the pool's chunks; only the CIM
    kernels (`kernels.cim_events`, `kernels.cim_packed`, parallel over output positions, called from the main thread and
    never inside a chunk) use Numba threads, so the CIM scripts give Numba as many as the pool.
    """
    if "numpy" in sys.modules or "numba" in sys.modules:
        raise RuntimeError("configure_threads must run before numpy/numba are imported")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    os.environ["NUMBA_NUM_THREADS"] = str(numba_threads)
    os.environ[_THREADS_VARIABLE] = str(threads)


def engine_threads():
    """Threads of the pool: as configured, else 1 (BLAS may then have threads of its own)."""
    return max(1, int(os.environ.get(_THREADS_VARIABLE, "1")))


def image_chunks(n_images, size=CHUNK_IMAGES):
    """(start, stop) of each chunk of a batch: `size` images (or rows), the last one shorter."""
    return [(start, min(start + size, n_images)) for start in range(0, n_images, size)]


def run_parallel(function, count):
    """function(0), ..., function(count - 1) on the pool; returns when all have run.

    The calls must be independent of each other (each writes its own outputs). Threads take
    the next index from a shared counter, so uneven chunks balance themselves. A call made
    from inside a pool task (a kernel of a chunk that runs the whole network, `steps.predict`)
    runs its indices in order on that thread: waiting on the pool from the pool can deadlock.
    """
    global _pool
    threads = min(engine_threads(), count)
    if threads == 1 or getattr(_in_pool_task, "active", False):
        for index in range(count):
            function(index)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(engine_threads() - 1, thread_name_prefix="nptwofold")
    indices = itertools.count()  # next() on it is atomic under the GIL

    def worker():
        _in_pool_task.active = True
        try:
            for index in indices:
                if index >= count:
                    return
                function(index)
        finally:
            _in_pool_task.active = False

    helpers = [_pool.submit(worker) for _ in range(threads - 1)]
    worker()
    for helper in helpers:
        helper.result()  # re-raises a helper's exception here


def scratch(name, shape, dtype):
    """A per-thread work array, reused across calls: fresh multi-MB arrays on every chunk
    would be page-faulted in each time, which costs about as much as filling them."""
    size = 1
    for extent in shape:
        size *= extent
    import numpy as np  # here, not at the top: configure_threads must run before numpy loads
    buffers = _scratch.__dict__
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = buffers[name] = np.empty(size, dtype)
    return buffer[:size].reshape(shape)
