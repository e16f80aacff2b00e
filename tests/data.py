"""Loaders for the real data in ../shared/data (see its README)."""

import numpy as np
import pytest

from conftest import SHARED_DATA


def mnist(n_train: int = 8192, n_test: int = 2000):
    path = SHARED_DATA / "mnist" / "mnist.npz"
    if not path.exists():
        pytest.fail(f"real MNIST data not found at {path}; set TFCOMPRESS_SHARED_DATA to the shared data folder")
    d = np.load(path)
    x = d["x_train"][:n_train, ..., None].astype("float32") / 255.0
    xt = d["x_test"][:n_test, ..., None].astype("float32") / 255.0
    return x, d["y_train"][:n_train].astype("int32"), xt, d["y_test"][:n_test].astype("int32")
