"""INT8 calibration of models that are not image CNNs: dense networks and 1-D sequence models get activation
ranges over the largest values seen; models with 2-D feature maps keep NNCF's mean of per-sample maxima."""

import keras
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from keras import layers as L

from tfcompress import calibration
from tfcompress.export import to_onnx, to_openvino


def _ir(model, tmp_path):
    model.export(str(tmp_path / "sm"), verbose=False)
    to_onnx(str(tmp_path / "sm"), str(tmp_path / "m.onnx"))
    to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"))
    return ov.Core().read_model(str(tmp_path / "m.xml"))


def _f32(model, x):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({0: x})[compiled.outputs[0]]


def _rel_rms(out, ref):
    return float(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2)))


def _activation_limits(model) -> list:
    """The input limits of every activation FakeQuantize (256 levels), in graph order."""
    return [(op.input_value(1).get_node().get_data().tolist(), op.input_value(2).get_node().get_data().tolist())
            for op in model.get_ordered_ops()
            if op.get_type_name() == "FakeQuantize" and op.get_attributes()["levels"] == 256]


def _mlp(features: int):
    inp = keras.Input((features,))
    h = L.Dense(64, activation="relu")(L.Dense(64, activation="relu")(inp))
    return keras.Model(inp, L.Dense(10)(h))


def _signal_cnn():
    inp = keras.Input((64, 2))
    h = L.MaxPooling1D()(L.Conv1D(16, 5, activation="relu")(inp))
    h = L.Conv1D(16, 3, padding="same", activation="relu")(h)
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling1D()(h)))


@pytest.mark.parametrize("build, shape", [(lambda: _mlp(16), (16,)), (_signal_cnn, (64, 2))], ids=["mlp", "conv1d"])
def test_a_model_without_2d_feature_maps_gets_the_largest_values_seen(tmp_path, rng, build, shape):
    """The mean of per-sample maxima (NNCF's default) clips the largest value of about half of the samples;
    in a vector of a few dozen values, or a signal whose amplitude varies, that value is not an outlier but
    a feature. Measured on these random-weight models: 13-29 % relative RMS output error with the mean against
    1-2 % with the largest values (section 3g of BENCHMARKS.md has trained models)."""
    fp = _ir(build(), tmp_path)
    x = (rng.normal(size=(200,) + shape) * rng.uniform(0.5, 2.0, (200,) + (1,) * len(shape))).astype("float32")
    calib, held = x[:100], x[100:]
    ref = _f32(fp, held)
    assert calibration.range_estimator_for(fp) == "max"
    default = calibration.calibrate(fp, calib, verbose=False)
    assert _activation_limits(default) == _activation_limits(
        calibration.calibrate(fp, calib, range_estimator="max", verbose=False))
    mean_of_maxima = calibration.calibrate(fp, calib, range_estimator="minmax", verbose=False)
    assert _rel_rms(_f32(default, held), ref) < 0.04
    assert _rel_rms(_f32(mean_of_maxima, held), ref) > 5 * _rel_rms(_f32(default, held), ref)


def test_a_text_transformer_with_a_padding_mask_stays_close_to_fp32(tmp_path, rng):
    """``Embedding(mask_zero=True)`` gives MultiHeadAttention a padding mask from the token ids: the attention
    scores of padded keys are replaced by float32's minimum. Quantizing that masked term (a value-dependent tensor,
    but a mask) rounded every score to zero: 30 % relative RMS output error on this model before; the mask now
    stays float."""
    inp = keras.Input((12,), dtype="int32")
    x = L.Embedding(40, 16, mask_zero=True)(inp)
    x = L.LayerNormalization()(x + L.MultiHeadAttention(2, 8)(x, x))
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    tokens = rng.integers(1, 40, (160, 12)).astype("int32")
    for row, n in zip(tokens, rng.integers(3, 13, 160)):
        row[n:] = 0
    fp = _ir(model, tmp_path)
    q = calibration.calibrate(fp, tokens[:100], verbose=False)
    ref = model.predict(tokens[100:], verbose=0)
    assert _rel_rms(_f32(fp, tokens[100:]), ref) < 1e-5
    error = _rel_rms(_f32(q, tokens[100:]), ref)
    assert error < 0.1, error


def test_a_model_with_2d_feature_maps_keeps_the_mean_of_per_sample_maxima(tmp_path, rng):
    """Image CNNs (and their vector heads) keep NNCF's ranges exactly: the default is "minmax" there."""
    inp = keras.Input((16, 16, 3))
    h = L.Conv2D(8, 3, activation="relu")(inp)
    fp = _ir(keras.Model(inp, L.Dense(4)(L.Dense(16, activation="relu")(L.GlobalAveragePooling2D()(h)))), tmp_path)
    x = rng.uniform(0, 1, (64, 16, 16, 3)).astype("float32")
    assert calibration.range_estimator_for(fp) == "minmax"
    assert _activation_limits(calibration.calibrate(fp, x, verbose=False)) == _activation_limits(
        calibration.calibrate(fp, x, range_estimator="minmax", verbose=False))
    assert _activation_limits(calibration.calibrate(fp, x, verbose=False)) != _activation_limits(
        calibration.calibrate(fp, x, range_estimator="max", verbose=False))


def _conv_ir(shape: list, pool: bool = False):
    p = ops.parameter(shape, ov.Type.f32)
    w = ops.constant(np.ones([4, shape[1]] + [3 if s != 1 else 1 for s in shape[2:]], np.float32))
    y = ops.convolution(p, w, [1] * (len(shape) - 2), [0] * (len(shape) - 2), [0] * (len(shape) - 2),
                        [1] * (len(shape) - 2))
    return ov.Model([y.output(0)], [p])


@pytest.mark.parametrize("shape, expected", [
    ([-1, 3, 32, 32], "minmax"),  # an image
    ([-1, 3, 32, -1], "minmax"),  # a width not known: taken as a 2-D map
    ([-1, 3, 64], "max"),  # Conv1D
    ([-1, 3, 1, 64], "max"),  # Conv1D as a converter may write it: a 2-D convolution over a height of 1
])
def test_auto_estimator_by_the_convolutions_input(shape, expected):
    assert calibration.range_estimator_for(_conv_ir(shape)) == expected
    assert calibration.range_estimator_for(_conv_ir(shape), "quantile") == "quantile"


def test_an_unknown_estimator_is_refused(rng):
    p = ops.parameter([-1, 4], ov.Type.f32)
    fp = ov.Model([ops.matmul(p, ops.constant(np.ones((4, 2), np.float32)), False, False).output(0)], [p])
    with pytest.raises(ValueError, match=r"unknown range_estimator 'mean'; choose one of \['auto', 'minmax'"):
        calibration.calibrate(fp, rng.normal(size=(8, 4)).astype("float32"), range_estimator="mean")


# --------------------------------------------------------------------------- the export command and its report

def _cli(*args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tfcompress.export", *args], capture_output=True, text=True,
                          env=env, timeout=900)


def _assert_one_line_error(proc, message):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and message in lines[-1], proc.stderr[-2000:]
    assert all(ln.startswith("[") for ln in lines[:-1]) and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A dense autoencoder-like regression model (16 -> 32 -> 16, its last layer without bias, as a random
    initialisation leaves it) as a SavedModel, and inputs whose scale varies per sample."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="x")
    model = keras.Model(inp, L.Dense(16, name="recon")(L.Dense(32, activation="relu", name="hidden")(inp)))
    d = tmp_path_factory.mktemp("autoencoder")
    model.export(str(d / "sm"), verbose=False)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 16)) * rng.uniform(0.5, 2.0, (200, 1))).astype("float32")
    np.save(d / "calib.npy", x[:100])
    np.save(d / "val.npy", x[100:])
    return d


def test_the_export_reports_and_uses_the_range_estimator(autoencoder, tmp_path):
    import json

    from tfcompress.export import export_saved_model

    x = np.load(autoencoder / "calib.npy")
    report = export_saved_model(str(autoencoder / "sm"), str(tmp_path / "auto"), calibration_data=x, verbose=False)
    assert report["steps"]["int8"]["range_estimator"] == "max"
    fp = ov.Core().read_model(str(tmp_path / "auto" / "model_fp32.xml"))
    q = ov.Core().read_model(str(tmp_path / "auto" / "model_int8.xml"))
    assert _activation_limits(q) == _activation_limits(
        calibration.calibrate(fp, x, range_estimator="max", verbose=False))
    report = export_saved_model(str(autoencoder / "sm"), str(tmp_path / "mm"), calibration_data=x,
                                range_estimator="minmax", verbose=False)
    assert report["steps"]["int8"]["range_estimator"] == "minmax"
    assert "activation ranges: minmax" in (tmp_path / "mm" / "report.md").read_text()
    assert json.loads((tmp_path / "mm" / "report.json").read_text())["steps"]["int8"]["range_estimator"] == "minmax"


def test_a_bad_range_estimator_exits_2_with_one_line(autoencoder, tmp_path):
    common = [f"--saved_model_dir={autoencoder / 'sm'}", f"--output_dir={tmp_path / 'out'}"]
    _assert_one_line_error(_cli(*common, f"--calibration_data={autoencoder / 'calib.npy'}",
                                "--range_estimator=mean"), "--range_estimator=mean: value should be one of")
    _assert_one_line_error(_cli(*common, "--range_estimator=max"),
                           "--range_estimator only applies with --calibration_data")
    assert not (tmp_path / "out").exists()


def test_accuracy_control_of_a_regression_output_bounds_its_relative_error(autoencoder, tmp_path):
    """Without labels, accuracy control's drop is the INT8 outputs' relative RMS error against FP32 (an argmax
    accuracy of a regression output would steer the search by noise); the reverted layers are named by their
    Keras layers, the last one included (OpenVINO's ONNX reader names the op producing an output after that
    output: it was reported as ``output_0``)."""
    import json

    from tfcompress.export import export_saved_model

    x = np.load(autoencoder / "val.npy")
    step = export_saved_model(str(autoencoder / "sm"), str(tmp_path / "loose"), np.load(autoencoder / "calib.npy"),
                              int8="accuracy_aware", max_drop=0.5, validation_data=x, verbose=False)["steps"]["int8"]
    assert step["drop_metric"] == "relative RMS error against FP32" and step["reverted"] == []
    fp = ov.Core().read_model(str(tmp_path / "loose" / "model_fp32.xml"))
    q = ov.Core().read_model(str(tmp_path / "loose" / "model_int8.xml"))
    assert step["drop"] == pytest.approx(_rel_rms(_f32(q, x), _f32(fp, x)), rel=1e-4) and step["drop"] > 0.001

    common = [f"--saved_model_dir={autoencoder / 'sm'}", f"--calibration_data={autoencoder / 'calib.npy'}",
              "--int8=accuracy_aware"]
    proc = _cli(*common, f"--output_dir={tmp_path / 'out'}", f"--validation_data={autoencoder / 'val.npy'}",
                "--max_drop=0")  # exact FP32 outputs: every layer goes back to float
    assert proc.returncode == 0, proc.stderr[-2000:]
    step = json.loads((tmp_path / "out" / "report.json").read_text())["steps"]["int8"]
    assert step["max_drop_met"] and step["drop"] == 0.0
    assert sorted(step["reverted"]) == ["hidden", "recon"], step
    assert "relative RMS error against FP32 0.00 %" in (tmp_path / "out" / "report.md").read_text()
    # class labels for a 16-value regression output (e.g. anomaly labels of an autoencoder): refused by name
    np.savez(tmp_path / "labelled.npz", x=x, y=np.arange(len(x)) % 2)
    proc = _cli(*common, f"--output_dir={tmp_path / 'out2'}", f"--validation_data={tmp_path / 'labelled.npz'}")
    _assert_one_line_error(proc, "less than a random guess among 2 labels")
    assert not (tmp_path / "out2").exists()


def test_the_op_producing_an_output_keeps_its_onnx_node_name(autoencoder, tmp_path):
    fp = ov.Core().read_model(str(_export_fp32(autoencoder, tmp_path)))
    last = fp.get_results()[0].input_value(0).get_node()
    assert last.get_type_name() == "MatMul" and "/recon" in last.get_friendly_name()
    assert [o.get_any_name() for o in fp.outputs] == ["output_0"]  # the output's name is unchanged


def _export_fp32(autoencoder, tmp_path):
    to_onnx(str(autoencoder / "sm"), str(tmp_path / "m.onnx"))
    to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"))
    return tmp_path / "m.xml"
