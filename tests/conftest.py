"""Shared fixtures: small real CIFAR-10 slices from the embedded sample.

Tests run single-threaded: spinning BLAS threads only slow small test problems down.
"""
from nptwofold.threads import configure_threads

configure_threads(1)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nptwofold.data import Cifar10, load_sample  # noqa: E402


@pytest.fixture(scope="session")
def sample():
    return load_sample()


@pytest.fixture(scope="session")
def tiny_dataset(sample):
    """40 training and 20 test images: a 16-image batch gives 3 steps/epoch, the last partial."""
    return Cifar10(sample.train_images[:40], sample.train_labels[:40],
                   sample.test_images[:20], sample.test_labels[:20], source="sample[:40]")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
