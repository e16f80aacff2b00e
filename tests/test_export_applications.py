"""The whole export on one model of every keras.applications family: ``model.export`` to a SavedModel with 25 %
of every channel group zeroed, then ``python -m tfcompress.export`` (a subprocess for some families, the same
pipeline in-process for the others) with real calibration images.

Each export must: strip exactly (the pipeline checks 1e-4) to a smaller SavedModel; give an FP32 IR equal to
Keras (compiled with an f32 hint, relative max error < 1e-4); give an INT8 IR whose compiled model runs every
convolution / fully-connected layer in INT8, as the report says; and write ``model.onnx`` or say why not.

The models are untrained (weights=None) but not trivial: BatchNorm scales, shifts and biases are random and
the BatchNorm statistics are those of real CIFAR-10 images, so activations have realistic ranges.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfcompress
from tfcompress.graph import build_graph
from conftest import ROOT, SHARED_DATA, randomize_batchnorm, randomize_biases, rel_error, _all_layers
from test_strip_applications import FAMILIES

# Families run through the command line as a subprocess; the others call the same pipeline in-process.
CLI_FAMILIES = {"MobileNetV2", "ResNet50", "EfficientNetB0", "Xception"}
N_IMAGES = 32  # calibration samples (CIFAR-10 test images, resized)


@pytest.fixture(scope="module")
def cifar():
    path = SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz"
    if not path.exists():
        pytest.fail(f"real CIFAR-10 data not found at {path}; set TFCOMPRESS_SHARED_DATA to the shared data folder")
    return np.load(path)["x_test"][:N_IMAGES].astype("float32")


def _images(cifar: np.ndarray, px: int) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(cifar, (px, px)).numpy().astype("float32")


def _set_batchnorm_statistics(model, x: np.ndarray) -> None:
    """Moving mean and variance of every BatchNorm = the batch statistics of its input on ``x``: one forward
    pass in training mode with momentum 0 sets each layer's from the inputs it sees."""
    bns = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    model(x, training=True)
    for bn, m in zip(bns, momenta):
        bn.momentum = m


def _pruned_application(name: str, px: int, x: np.ndarray, rng):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(px, px, 3), classes=10, classifier_activation=None
    )
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    _set_batchnorm_statistics(model, x)
    kg = build_graph(model)
    for g in kg.groups():
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False), graph=kg)
    return model


def _export(name: str, saved_model: str, out: str, x: np.ndarray, tmp_path) -> dict:
    if name in CLI_FAMILIES:
        calib = tmp_path / "calib.npy"
        np.save(calib, x)
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            [sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={saved_model}", f"--output_dir={out}",
             f"--calibration_data={calib}"], capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        from tfcompress.export import export_saved_model

        export_saved_model(saved_model, out, calibration_data=x, verbose=False)
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name,px", FAMILIES)
def test_application_family_exports(name, px, cifar, rng, tmp_path):
    import openvino as ov

    from tfcompress.calibration import int8_layers

    x = _images(cifar, px)
    model = _pruned_application(name, px, x, rng)
    ref = np.asarray(model(x[:8]))
    saved_model, out = str(tmp_path / "saved_model"), str(tmp_path / "export")
    model.export(saved_model, verbose=False)

    report = _export(name, saved_model, out, x, tmp_path)

    assert report["steps"]["strip"]["max_rel_error"] < 1e-4
    assert report["params"]["after"] < 0.9 * report["params"]["before"]
    assert report["sizes"]["stripped"] < 0.9 * report["sizes"]["unstripped"]
    core = ov.Core()
    fp32 = core.compile_model(os.path.join(out, "model_fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert rel_error(fp32(x[:8])[0], ref) < 1e-4
    int8 = core.compile_model(os.path.join(out, "model_int8.xml"), "CPU")
    counted = int8_layers(int8)
    assert counted == report["steps"]["int8"]["int8_layers"]
    assert counted["total"] > 0 and counted["int8"] == counted["total"], counted
    onnx = os.path.join(out, "model.onnx")
    assert os.path.exists(onnx) or report["steps"]["onnx"]["skipped"]
    print(f"{name}: int8 {counted['int8']}/{counted['total']}, onnx: "
          f"{'yes' if os.path.exists(onnx) else report['steps']['onnx']['skipped']}")
