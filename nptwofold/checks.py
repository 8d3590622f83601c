"""The one integer range check behind every user-facing integer (hardware knobs, kernel
arguments): a one-line `NptwofoldError` naming the value, never a traceback."""
import numpy as np

from .errors import NptwofoldError


def check_integer(name, value, minimum, maximum=None):
    """Return value as an int if it is an integer (not a bool) in minimum..maximum, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise NptwofoldError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f"..{maximum}"
        raise NptwofoldError(f"{name} must be in {minimum}{upper}, got {value}")
    return int(value)


def check_integer_matrix(name, array):
    """Return array as a NumPy array if it is a 2-D integer matrix, else raise."""
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise NptwofoldError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
    return array
