"""One model of every keras.applications family at a small input: zero 25 % of every group's channels, strip,
compare with the Keras outputs, and quantize.

BatchNorm statistics and biases are random (as real trained models have them): zeroed channels must survive
them exactly. The families' coverage (fraction of conv/dense output channels in prunable groups) and the larger
constructors are measured by ``benchmarks/applications.py`` (BENCHMARKS.md, section 7).
"""

import keras
import numpy as np
import pytest

import tfcompress
from tfcompress.graph import build_graph
from conftest import randomize_batchnorm, randomize_biases, rel_error

pytestmark = pytest.mark.heavy  # minutes per family: scheduled first (conftest)

# (constructor, input size): the smallest constructor of each family at (about) its smallest input (VGG19 is
# VGG16 with three more convolutions of the same kinds: nothing the strip or quantization handles differently)
FAMILIES = [
    ("ConvNeXtTiny", 32), ("DenseNet121", 32), ("EfficientNetB0", 32), ("EfficientNetV2B0", 32),
    ("InceptionResNetV2", 75), ("InceptionV3", 75), ("MobileNet", 32), ("MobileNetV2", 32),
    ("MobileNetV3Small", 32), ("NASNetMobile", 32), ("ResNet50", 32), ("ResNet50V2", 32), ("VGG16", 32),
    ("Xception", 71),
]


@pytest.mark.parametrize("name,px", FAMILIES)
def test_application_family_strips_exactly_and_quantizes(name, px, rng):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(px, px, 3), classes=10, classifier_activation=None
    )
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    kg = build_graph(model)
    groups = kg.groups()
    assert len(groups) >= 5
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    x = rng.uniform(0, 255, (2, px, px, 3)).astype("float32")
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < 1e-4
    assert stripped.count_params() < 0.9 * model.count_params()
    q = tfcompress.quantization.quantize_model(model)
    assert np.all(np.isfinite(q(x)))


def test_zeroed_channels_all_go_where_nothing_makes_them_constant(rng):
    """Without biases and BatchNorm shifts, every zeroed channel is exactly 0 and goes."""
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                        classifier_activation=None)
    kg = build_graph(model)
    groups = kg.groups()
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    stripped = tfcompress.strip(model)
    remaining = build_graph(stripped).groups()
    assert sum(g.size for g in remaining) == sum(g.size - g.size // 4 for g in groups)
