"""The demo's data and model: scikit-learn's bundled handwritten digits and a small residual CNN.

``load_digits`` ships inside scikit-learn (1,797 8x8 images), so the demo needs no download. The images are
upsampled to 32x32 so that the network has enough arithmetic for OpenVINO's INT8 and pruning speed-ups to be
visible in latency, not just in FLOP counts.
"""

from __future__ import annotations

import keras
import numpy as np

__all__ = ["digits", "residual_cnn", "augmented"]

L = keras.layers


def digits(size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: float32 images in [0, 1] of shape (size, size, 1), int labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError('the demo needs scikit-learn: pip install "tfcompress[demo]"') from None
    import tensorflow as tf

    d = load_digits()
    x = (d.images.astype("float32") / 16.0)[..., None]
    x = tf.image.resize(x, (size, size), method="bilinear").numpy()
    y = d.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def augmented(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    """A shuffled ``tf.data`` pipeline with random shifts of up to 2/32 of the image."""
    import tensorflow as tf

    pad = max(1, x.shape[1] // 16)

    def shift(img, label):
        h, w, c = img.shape
        img = tf.image.pad_to_bounding_box(img, pad, pad, h + 2 * pad, w + 2 * pad)
        return tf.image.random_crop(img, (h, w, c), seed=seed), label

    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    return ds.map(shift, num_parallel_calls=2).batch(batch).prefetch(2)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool):
    x = L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    # momentum 0.9: with ~45 steps per epoch, the default 0.99 leaves the moving statistics an epoch behind
    # the weights, which pruning changes every epoch
    x = L.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x) if relu else x


def residual_cnn(input_shape=(32, 32, 1), classes: int = 10, widths=(16, 32, 64)) -> keras.Model:
    """A ResNet-style CNN: a stem, one residual block per width (strided from the second on), a classifier.

    Its coupled channels are what the pruning engine is for: each block's output is tied to its shortcut
    through the ``Add``.
    """
    inp = keras.Input(input_shape, name="image")
    x = _conv_bn(inp, widths[0], 3, 1, "stem", relu=True)
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        y = _conv_bn(x, w, 3, stride, f"block{i}_conv1", relu=True)
        y = _conv_bn(y, w, 3, 1, f"block{i}_conv2", relu=False)
        shortcut = x if stride == 1 and x.shape[-1] == w else _conv_bn(x, w, 1, stride, f"block{i}_down", relu=False)
        x = L.ReLU(name=f"block{i}_out")(L.Add(name=f"block{i}_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(classes, name="logits")(x), name="digits_resnet")
