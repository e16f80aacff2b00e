"""Zero 25 % of every group's channels of real architectures, strip, and compare with Keras outputs."""

import keras
import numpy as np
import pytest

import tfcompress
from tfcompress.graph import build_graph
from conftest import randomize_batchnorm, randomize_biases, rel_error

APPLICATIONS = ["ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0"]


@pytest.mark.parametrize("name", APPLICATIONS)
def test_strip_keras_application(name, rng):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(96, 96, 3), classes=10, classifier_activation=None
    )
    randomize_batchnorm(model, rng)  # realistic BN statistics: zero channels must survive them exactly
    kg = build_graph(model)
    groups = kg.groups()
    assert len(groups) > 10
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    x = rng.uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    ref = model(x)
    stripped = tfcompress.strip(model)
    out = stripped(x)
    assert rel_error(out, ref) < 1e-4
    # every group lost a quarter of its channels, so parameters fall well below the original
    assert stripped.count_params() < 0.75 * model.count_params()
    removed = sum(g.size // 4 for g in groups)
    remaining = build_graph(stripped).groups()
    assert sum(g.size for g in remaining) == sum(g.size for g in groups) - removed


# Architectures written with keras.ops arithmetic (hard-swish ``x + 3.0``, ConvNeXt's residual ``x + y``)
OPS_APPLICATIONS = [("MobileNetV3Small", 64), ("MobileNetV3Large", 64), ("ConvNeXtTiny", 32)]


@pytest.mark.parametrize("name,px", OPS_APPLICATIONS)
def test_strip_and_quantize_applications_with_keras_ops(name, px, rng):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(px, px, 3), classes=10, classifier_activation=None
    )
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    kg = build_graph(model)
    groups = kg.groups()
    assert groups
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    x = rng.uniform(0, 255, (2, px, px, 3)).astype("float32")
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < 1e-4
    assert stripped.count_params() < model.count_params()
    q = tfcompress.quantization.quantize_model(model)
    assert np.all(np.isfinite(q(x)))
