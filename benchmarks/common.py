"""Data and timing helpers shared by the benchmarks (real data from ../shared/data)."""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import tarfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("TFCOMPRESS_SHARED_DATA", ROOT.parent / "shared" / "data"))
CACHE = pathlib.Path(os.environ.get("TFCOMPRESS_CACHE", pathlib.Path.home() / ".cache" / "tfcompress"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def mnist():
    d = np.load(SHARED / "mnist" / "mnist.npz")
    prep = lambda a: a[..., None].astype("float32") / 255.0  # noqa: E731
    return prep(d["x_train"]), d["y_train"].astype("int32"), prep(d["x_test"]), d["y_test"].astype("int32")


def cifar10_test():
    """The 10,000 CIFAR-10 test images as JPEG-decoded uint8 (the split the published numbers use)."""
    d = np.load(SHARED / "cifar10" / "cifar10_jpeg_q75_test.npz")
    return d["x_test"], d["y_test"].astype("int32")


def cifar10_train():
    """The 50,000 CIFAR-10 training JPEGs decoded once (cached as .npz under ~/.cache/tfcompress)."""
    cache = CACHE / "cifar10_jpeg_q75_train.npz"
    if cache.exists():
        d = np.load(cache)
        return d["x"], d["y"]
    return _decode_cifar10_train(cache)


def cifar10_train_shuffled():
    """The training split in a fixed random order (the tar is sorted by class), so prefixes are balanced."""
    x, y = cifar10_train()
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def _decode_cifar10_train(cache):
    import tensorflow as tf

    xs, ys = [], []
    with tarfile.open(SHARED / "cifar10" / "CIFAR-10-images_jpeg.tar.gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 4 or parts[1] != "train" or not parts[3].endswith(".jpg"):
                continue
            data = tar.extractfile(member).read()
            xs.append(tf.io.decode_jpeg(data, channels=3).numpy())
            ys.append(CLASSES.index(parts[2]))
    x, y = np.stack(xs), np.asarray(ys, dtype="int32")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return x, y


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node() or 'host'}: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def outputs(compiled, x: np.ndarray, batch: int = 50) -> np.ndarray:
    """A compiled OpenVINO model's first output over the samples ``x``, ``batch`` at a time."""
    return np.concatenate([compiled({0: x[i:i + batch]})[compiled.outputs[0]] for i in range(0, len(x), batch)])


def kl_per_row(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of class probabilities (the models end in softmax)."""
    return np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) over rows of class probabilities."""
    return float(np.mean(kl_per_row(p, q)))


def median(xs):
    return statistics.median(xs)


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.elapsed = time.perf_counter() - self.t
