"""CIFAR data augmentation: random crop from the image zero-padded by 4 pixels, horizontal flip.

The random offsets and flips are drawn by the caller (so one seeded NumPy generator fixes
them); the kernel only applies them and converts uint8 pixels to pixel/255 floats.
"""
import numba
import numpy as np
from numba import prange

CROP_PAD = 4


@numba.njit(parallel=True, cache=True)
def crop_flip_to_float(images, offset_y, offset_x, flip):
    """images (N, H, W, C) uint8 -> float32 pixel/255 crops; offsets in 0..2*CROP_PAD."""
    n_img, height, width, chans = images.shape
    out = np.empty((n_img, height, width, chans), dtype=np.float32)
    for n in prange(n_img):
        for oy in range(height):
            iy = oy + offset_y[n] - CROP_PAD
            for ox in range(width):
                sx = width - 1 - ox if flip[n] else ox
                ix = sx + offset_x[n] - CROP_PAD
                inside = 0 <= iy < height and 0 <= ix < width
                for c in range(chans):
                    out[n, oy, ox, c] = images[n, iy, ix, c] / np.float32(255.0) if inside else 0.0
    return out


def to_float(images):
    """uint8 images -> float32 pixel/255, the network's input."""
    return images.astype(np.float32) / np.float32(255.0)
