"""Shared fixtures: quiet TensorFlow, seeded randomness, paths to the shared real data."""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("TFCOMPRESS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Both halves of the run open with their share of the tests marked ``heavy`` (minutes each).

    The README's ``-n 2`` with pytest.ini's ``--dist worksteal``: xdist hands each worker one half of the
    collection, and a worker whose queue runs dry takes the back half of the other's. With the long tests at
    the front of both halves, both workers start on them and the run ends on short tests, which the stealing
    spreads evenly; in collection order one worker could be left alone with a long test at the end. The
    order is otherwise the collection's.
    """
    heavy = [item for item in items if item.get_closest_marker("heavy") is not None]
    light = [item for item in items if item.get_closest_marker("heavy") is None]
    first = heavy[0::2]
    split = max(len(items) // 2 - len(first), 0)
    items[:] = first + light[:split] + heavy[1::2] + light[split:]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _keras_seed():
    import keras

    keras.utils.set_random_seed(0)
    keras.backend.clear_session()
    yield


def randomize_batchnorm(model, rng):
    """Give every BatchNormalization realistic, non-trivial statistics (random init has mean 0, var 1)."""
    import keras

    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            ws = []
            if layer.scale:
                ws.append(rng.uniform(0.5, 1.5, n))
            if layer.center:
                ws.append(rng.uniform(-0.2, 0.2, n))
            ws += [rng.uniform(-0.1, 0.1, n), rng.uniform(0.5, 1.5, n)]
            layer.set_weights(ws)


def batchnorm_statistics_of(model, images):
    """Set every BatchNormalization's moving statistics to those of ``images`` (one training-mode call with
    momentum 0), as a model trained on such data has them."""
    import keras

    bns = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    model(images, training=True)
    for bn, m in zip(bns, momenta):
        bn.momentum = m


def randomize_biases(model, rng):
    for layer in _all_layers(model):
        if getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.5, 0.5, layer.bias.shape).astype("float32"))


def _all_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


# the CPU plugin's runtime layer types of layers with weights
WEIGHTED_RUNTIME = ("Convolution", "Deconvolution", "FullyConnected")


def weighted_runtime_layers(compiled) -> list:
    """The ops of a compiled model's runtime graph that have weights (convolutions, transposed ones, dense)."""
    return [op for op in compiled.get_runtime_model().get_ops()
            if op.get_rt_info()["layerType"].astype(str) in WEIGHTED_RUNTIME]


def reads_8bit_data(op) -> bool:
    """A runtime op whose data input is u8 / i8 (what executing in INT8 means, whatever the runtimePrecision)."""
    return op.get_input_element_type(0).get_type_name() in ("u8", "i8")


def float_on_this_cpu(compiled) -> set[str]:
    """The weighted layers of ``compiled`` that the CPU plugin runs in float on this CPU however they are
    quantized: transposed convolutions with a dynamic dimension where
    ``calibration.cpu_int8_deconvolution_needs_static_shapes()`` (CPUs without AVX-512)."""
    from tfcompress.calibration import cpu_int8_deconvolution_needs_static_shapes

    if not cpu_int8_deconvolution_needs_static_shapes():
        return set()
    return {op.get_friendly_name() for op in weighted_runtime_layers(compiled)
            if op.get_rt_info()["layerType"].astype(str) == "Deconvolution"
            and (op.get_input_partial_shape(0).is_dynamic or op.get_output_partial_shape(0).is_dynamic)}


def assert_int8_where_the_cpu_can(compiled, total: int | None = None) -> None:
    """Every weighted layer of ``compiled`` runs INT8 but those this CPU runs in float whatever the IR
    (:func:`float_on_this_cpu`), and ``calibration.int8_layers`` counts exactly that."""
    from tfcompress.calibration import int8_layers

    layers = weighted_runtime_layers(compiled)
    rows = [(op.get_friendly_name(), op.get_rt_info()["layerType"].astype(str), op.get_input_element_type(0).get_type_name(),
             op.get_rt_info()["primitiveType"].astype(str)) for op in layers]
    assert total is None or len(layers) == total, rows
    assert layers, rows
    exempt = float_on_this_cpu(compiled)
    assert {op.get_friendly_name() for op in layers if not reads_8bit_data(op)} == exempt, rows
    assert int8_layers(compiled) == {"int8": len(layers) - len(exempt), "total": len(layers)}


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# A fresh Python with the one CPU split into two logical devices and a MirroredStrategy over them (the device
# split must come before TensorFlow initialises, hence a subprocess); the test's code follows it.
TWO_CPU_REPLICAS = """\
import os, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import tfcompress
sys.path.insert(0, os.environ["TESTS_DIR"])
from data import mnist
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
"""


def run_mirrored(tmp_path, code: str) -> str:
    """``run_script`` of ``code`` (dedented) after ``TWO_CPU_REPLICAS``, which defines ``strategy``."""
    import textwrap

    return run_script(tmp_path, TWO_CPU_REPLICAS + textwrap.dedent(code))


def run_script(tmp_path, code: str) -> str:
    """Run ``code`` in a fresh Python (e.g. to configure TF devices first); return its stdout, fail on error."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(code)
    env = dict(os.environ, TESTS_DIR=str(pathlib.Path(__file__).parent), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
