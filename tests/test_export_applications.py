"""One model of every keras.applications family through the export pipeline, with calibration data.

Each model has random weights, BatchNorm statistics of real (CIFAR-10) images, and 25 % of every channel group
zeroed. The SavedModel Keras writes goes through ``export_saved_model`` (the function the command runs; one
family also goes through ``python -m tfcompress.export``): the stripped SavedModel must be exact and smaller, the
FP32 IR must equal the Keras model, every convolution and fully-connected layer of the INT8 IR must run INT8 in
the compiled model, and the ONNX file must exist or the report must say why it does not.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import openvino as ov
import pytest
import tensorflow as tf

import tfcompress
from tfcompress import calibration
from tfcompress.export import export_saved_model
from tfcompress.graph import build_graph
from conftest import SHARED_DATA, batchnorm_statistics_of, rel_error
from test_strip_applications import FAMILIES

pytestmark = pytest.mark.heavy  # minutes per family: scheduled first (conftest)


def _images(n: int, px: int) -> np.ndarray:
    x = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["x_test"][:n].astype("float32")
    return tf.image.resize(x, (px, px)).numpy()


# one constructor per family; VGG's 4096-wide classifier only adds weight bytes to convert, so VGG16 gets a small
# dense head instead (it still has a fully-connected layer to check)
EXPORT_FAMILIES = FAMILIES


def _application(name: str, px: int) -> keras.Model:
    if name == "VGG16":
        base = keras.applications.VGG16(weights=None, input_shape=(px, px, 3), include_top=False, pooling="avg")
        return keras.Model(base.input, keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(base.output)))
    return getattr(keras.applications, name)(weights=None, input_shape=(px, px, 3), classes=10,
                                             classifier_activation=None)


def _zeroed_application(name: str, px: int, images: np.ndarray, rng) -> keras.Model:
    """``name`` at ``px`` with the BatchNorm statistics of ``images`` and 25 % of every group zeroed (without
    compensation, which ``tests/test_compensation.py`` covers)."""
    model = _application(name, px)
    batchnorm_statistics_of(model, images)
    kg = build_graph(model)
    # plain zeroing: the export is under test here, and test_strip_applications zeroes every family with the
    # compensation. (Channels after a BatchNorm without scale, as in the Inception families, then still emit
    # its shift; the strip must keep or fold them exactly.)
    for g in kg.groups():
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg,
                                compensate=False)
    return model


def _check_export(model: keras.Model, out, report: dict, x: np.ndarray) -> None:
    steps = report["steps"]
    assert steps["strip"]["max_rel_error"] < 1e-4
    assert report["sizes"]["stripped"] < report["sizes"]["unstripped"]
    assert report["params"]["after"] < 0.9 * report["params"]["before"]  # a quarter of every group's channels went
    assert (out / "model.onnx").exists() or steps["onnx"]["skipped"]
    core = ov.Core()
    ref = model(x).numpy()
    fp32 = core.compile_model(str(out / "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert rel_error(fp32(x)[0], ref) < 1e-4
    int8 = core.compile_model(str(out / "model_int8.xml"), "CPU")
    counts = calibration.int8_layers(int8)
    assert counts["total"] > 0 and counts["int8"] == counts["total"], counts
    assert steps["int8"]["int8_layers"] == counts
    assert np.all(np.isfinite(int8(x)[0]))


@pytest.mark.parametrize("name,px", EXPORT_FAMILIES)
def test_application_family_exports_to_fp32_and_int8(name, px, tmp_path, rng):
    images = _images(72, px)
    model = _zeroed_application(name, px, images[:32], rng)
    model.export(str(tmp_path / "src"), verbose=False)
    np.save(tmp_path / "calib.npy", images[32:64])
    report = export_saved_model(str(tmp_path / "src"), str(tmp_path / "out"), calibration_data=str(tmp_path / "calib.npy"),
                                verbose=False)
    _check_export(model, tmp_path / "out", report, images[64:])


def test_application_through_the_command(tmp_path, rng):
    """The command itself on a model holding raw keras.ops nodes (hard-swish) and squeeze-excite."""
    images = _images(72, 32)
    model = _zeroed_application("MobileNetV3Small", 32, images[:32], rng)
    model.export(str(tmp_path / "src"), verbose=False)
    np.save(tmp_path / "calib.npy", images[32:64])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={tmp_path / 'src'}",
                           f"--output_dir={out}", f"--calibration_data={tmp_path / 'calib.npy'}"],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _check_export(model, out, json.loads((out / "report.json").read_text()), images[64:])
