"""QAT on keras.applications families, exported to OpenVINO without calibration data.

Each model has random weights and BatchNorm statistics of real (CIFAR-10) images; ``quantize_model``, one QAT
step (eager) on those images with ``RangeInit``, ``model.export``, then the export (``export_saved_model``, and
``python -m tfcompress.export`` for one family), given the compared images as unlabelled validation data (no
calibration data: the QAT model's fake quantization is the INT8 model). Every convolution and fully-connected
layer of the FP32 IR (the quantizers carried as FakeQuantize) must run INT8 in the compiled model, and the IR's
logits must follow the Keras QAT model's within the limits the export derived for this graph on those images
(report.json's ``quantized_check``; BENCHMARKS.md, section 7c, has the numbers).
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import openvino as ov
import pytest

from tfcompress import calibration
from tfcompress.export import export_saved_model
from tfcompress.export.checks import mean_rel_error
from tfcompress.quantization import RangeInit, quantize_model
from conftest import SHARED_DATA, batchnorm_statistics_of, rel_error
from test_export_applications import EXPORT_FAMILIES, _application, _images

pytestmark = pytest.mark.heavy  # minutes per family: scheduled first (conftest)

COMMAND_FAMILY = "MobileNetV3Small"  # keras.ops nodes (hard-swish) and squeeze-excite, through the command


def _qat_application(name: str, px: int, images: np.ndarray, labels: np.ndarray) -> keras.Model:
    """``name`` at ``px`` with the BatchNorm statistics of ``images``, quantized, after one QAT step."""
    model = _application(name, px)
    batchnorm_statistics_of(model, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers QAT leaves float (LayerNormalization, ...)
        q = quantize_model(model)
    # eagerly: tracing a family's training graph takes longer than running its one step (NASNetMobile 78 s
    # against 6 s); QAT training in graph mode is tests/test_qat.py's and the demo's
    q.compile(keras.optimizers.SGD(1e-5), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              run_eagerly=True)
    q.fit(images, labels, batch_size=len(images), epochs=1, callbacks=[RangeInit(1)], verbose=0)
    return q


def _export(sm: str, out: str, images: np.ndarray, command: bool) -> dict:
    """Export ``sm`` with ``images`` as unlabelled validation data: the checks run on them; its report."""
    if not command:
        return export_saved_model(sm, out, validation_data=images, verbose=False)
    data = os.path.join(os.path.dirname(out), "images.npy")
    np.save(data, images)
    proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={sm}", f"--output_dir={out}",
                           f"--validation_data={data}"],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name,px", EXPORT_FAMILIES)
def test_qat_application_exports_int8_and_follows_keras(name, px, tmp_path, record_property):
    images = _images(24, px)
    labels = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["y_test"][:16].reshape(-1)
    q = _qat_application(name, px, images[:16], labels)
    sm, out = str(tmp_path / "sm"), str(tmp_path / "out")
    q.export(sm, verbose=False)
    x = images[16:]
    report = _export(sm, out, x, command=name == COMMAND_FAMILY)

    compiled = ov.Core().compile_model(os.path.join(out, "model_fp32.xml"), "CPU")
    counts = calibration.int8_layers(compiled)
    assert counts["total"] > 0 and counts["int8"] == counts["total"], counts

    # the IR's function (its quantizers in exact arithmetic, what CPUs accumulating INT8 products in int32
    # compute) follows Keras within the export's limits; so do this CPU's INT8 kernels where they cannot
    # saturate (where they can, random weights fill the int8 grid and QAT's default keeps only the first
    # layers on 7 bits: the export measures and reports them, int8_kernels)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    fp32 = ov.Core().read_model(os.path.join(out, "model_fp32.xml"))
    ir, exact = (ov.Core().compile_model(m, "CPU", f32) for m in (fp32, calibration.exact_arithmetic(fp32)))
    ref = q.predict(x, verbose=0)
    limits = report["quantized_check"]  # measured by the export on x
    errors = {}
    for what, compiled in (("", exact), ("kernels_", ir)):
        got = compiled({0: x})[compiled.outputs[0]]
        errors.update({f"{what}max": rel_error(got, ref), f"{what}mean": mean_rel_error(got, ref)})
    for key, value in {**errors, **limits, **counts}.items():
        record_property(key, value)  # in --junitxml: the numbers behind BENCHMARKS 7c
    checked = [""] if calibration.cpu_saturates_int8() else ["", "kernels_"]
    for what in checked:
        assert errors[f"{what}max"] <= limits["tolerance"], (errors, limits)
        assert errors[f"{what}mean"] <= limits["mean_tolerance"], (errors, limits)
    assert report["steps"]["openvino"]["int8_kernels"]["cpu_saturates_int8"] == calibration.cpu_saturates_int8()
