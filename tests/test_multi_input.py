"""A two-input, two-output Keras model (an image branch of convolutions, a metadata branch of Dense layers,
concatenated, a class head and a regression head) through the export with .npz data, `calibrate` and accuracy
control. Calibration and the export's data took single-input models only."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

from conftest import assert_int8_where_the_cpu_can, randomize_biases, rel_error
from tfcompress import calibration
from tfcompress.export.checks import mean_rel_error
from tfcompress.export.ov_run import run_openvino


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    """The model's SavedModel, its export with calibration data as .npz (overflow fix on every layer, so that no
    CPU's INT8 kernels saturate), the samples and the Keras outputs on them."""
    from tfcompress.export import export_saved_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    img, meta = keras.Input((12, 12, 3), name="image"), keras.Input((6,), name="meta")
    x = L.Conv2D(16, 3, activation="relu", name="conv1")(img)
    x = L.GlobalAveragePooling2D()(L.Conv2D(16, 3, activation="relu", name="conv2")(x))
    m = L.Dense(16, activation="relu", name="meta_dense")(meta)
    z = L.Dense(32, activation="relu", name="joint")(L.Concatenate()([x, m]))
    model = keras.Model([img, meta], [L.Dense(4, name="cls")(z), L.Dense(1, name="reg")(z)])
    randomize_biases(model, rng)
    # the metadata on another scale than the pixels: a sample fed to the wrong input shows
    x = {"image": rng.uniform(0, 1, (128, 12, 12, 3)).astype("float32"),
         "meta": (3 * rng.normal(size=(128, 6))).astype("float32")}
    ref = model.predict(x, verbose=0)
    d = tmp_path_factory.mktemp("two_tower")
    model.export(str(d / "sm"), verbose=False)
    np.savez(d / "calib.npz", **x)
    np.savez(d / "val.npz", **x, y=ref[0].argmax(axis=1))
    report = export_saved_model(str(d / "sm"), str(d / "out"), calibration_data=str(d / "calib.npz"),
                                overflow_fix="enable", verbose=False)
    return {"dir": d, "x": x, "ref": ref, "report": report}


def _outputs(got: dict) -> list:
    """Keras's output order (Keras's export names them output_0, output_1)."""
    return [got["output_0"], got["output_1"]]


def _fq_limit_on(q, name: str) -> float:
    """The upper limit of the FakeQuantize that reads the model input ``name``."""
    for op in q.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize":
            src = op.input(0).get_source_output().get_node()
            if src.get_type_name() == "Parameter" and name in src.output(0).get_names():
                return float(op.input(2).get_source_output().get_node().get_data().max())
    raise AssertionError(f"no quantizer on input {name!r}")


def test_the_export_checks_and_calibrates_both_inputs_and_outputs(two_tower):
    d, x, ref, report = two_tower["dir"], two_tower["x"], two_tower["ref"], two_tower["report"]
    out = d / "out"
    for got, want in zip(_outputs(run_openvino(str(out / "model_fp32.xml"), x)), ref):
        assert rel_error(got, want) < 1e-4  # FP32 IR: the export's float tolerance, on each output
    for step in ("onnx", "openvino"):  # every output checked, and reported
        assert sorted(report["steps"][step]["max_rel_error_by_output"]) == ["output_0", "output_1"], report["steps"]
    int8 = report["steps"]["int8"]
    assert sorted(int8["max_rel_error_by_output"]) == ["output_0", "output_1"]
    assert int8["int8_kernels"]["within_tolerance"], int8  # 7-bit weights everywhere: no CPU saturates
    assert_int8_where_the_cpu_can(ov.Core().compile_model(str(out / "model_int8.xml"), "CPU"), total=6)
    exact = _outputs(run_openvino(str(out / "model_int8.xml"), x, exact=True))
    # INT8 of a random-weight model: class agreement and mean errors well below a mis-fed input's (order 1)
    assert np.mean(exact[0].argmax(axis=1) == ref[0].argmax(axis=1)) >= 0.85
    assert max(mean_rel_error(g, r) for g, r in zip(exact, ref)) < 0.3
    # the metadata branch is vectors: its input's range is the largest value seen, not the mean of per-sample
    # maxima that the image branch's feature maps get
    q = ov.Core().read_model(str(out / "model_int8.xml"))
    assert _fq_limit_on(q, "meta") == pytest.approx(np.abs(x["meta"]).max(), rel=1e-5)
    per_sample_max = x["image"].reshape(len(x["image"]), -1).max(axis=1)
    assert _fq_limit_on(q, "image") == pytest.approx(per_sample_max.mean(), rel=1e-5)


def test_calibrate_takes_samples_by_name_or_in_input_order_alike(two_tower):
    fp = ov.Core().read_model(str(two_tower["dir"] / "out" / "model_fp32.xml"))
    x = two_tower["x"]
    by_name = calibration.calibrate(fp, x, verbose=False)
    in_order = calibration.calibrate(fp, (x["image"], x["meta"]), verbose=False)
    feed = {k: a[:16] for k, a in x.items()}
    for a, b in zip(_outputs(run_openvino(by_name, feed, exact=True)), _outputs(run_openvino(in_order, feed, exact=True))):
        np.testing.assert_array_equal(a, b)
    consts = [[op.get_data() for op in m.get_ordered_ops() if op.get_type_name() == "Constant"] for m in (by_name, in_order)]
    for a, b in zip(*consts):
        np.testing.assert_array_equal(a, b)


def test_accuracy_control_with_a_metric_on_the_two_input_model(two_tower):
    fp = ov.Core().read_model(str(two_tower["dir"] / "out" / "model_fp32.xml"))
    x, labels = two_tower["x"], two_tower["ref"][0].argmax(axis=1)

    def accuracy(compiled, data):
        samples, y = data
        scores = compiled(samples)[compiled.outputs[0]]
        return float(np.mean(np.asarray(scores).argmax(axis=1) == y))

    q, info = calibration.calibrate_with_accuracy_control(
        fp, (x["image"], x["meta"]), (x, labels), accuracy, max_drop=0.01, verbose=False)
    assert info["fp32_metric"] == 1.0 and info["max_drop_met"], info
    compiled = ov.Core().compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert accuracy(compiled, (x, labels)) == info["metric"] >= 0.99


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tfcompress.export", *args], capture_output=True, text=True,
                          env=env, timeout=900)


def test_npz_files_that_do_not_fit_the_inputs_exit_2_before_tensorflow(two_tower, tmp_path):
    d, x = two_tower["dir"], two_tower["x"]
    files = {
        "missing.npz": ({"image": x["image"]}, r"no array for input\(s\) \['meta'\]"),
        "extra.npz": ({**x, "weather": x["meta"]}, r"unknown key\(s\) \['weather'\]"),
        "counts.npz": ({"image": x["image"], "meta": x["meta"][:100]}, "'image' 128, 'meta' 100"),
        "shape.npz": ({"image": x["image"], "meta": x["meta"][:, :5]}, r"input 'meta'\) has samples of shape \(5,\)"),
    }
    for name, (arrays, message) in files.items():
        np.savez(tmp_path / name, **arrays)
    np.save(tmp_path / "one.npy", x["image"])
    cases = [(name, message) for name, (_, message) in files.items()] + [("one.npy", "a .npy file feeds one input")]
    for name, message in cases:
        for flag in ("calibration_data", "validation_data"):
            proc = _cli(f"--saved_model_dir={d / 'sm'}", f"--output_dir={tmp_path / 'out'}",
                        f"--{flag}={tmp_path / name}", "--int8=none" if flag == "validation_data" else "--int8=default")
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
            assert f"--{flag}" in lines[0] and re.search(message, lines[0]), lines[0]
            assert not (tmp_path / "out").exists()
    # the checks read the signature from saved_model.pb without TensorFlow
    code = ("import sys; from tfcompress.export.data import check_data_files; from tfcompress.errors import ExportError\n"
            f"try: check_data_files({str(d / 'sm')!r}, 'serving_default', {{'x': {str(tmp_path / 'extra.npz')!r}}})\n"
            "except ExportError as e: print(e)\n"
            "assert 'tensorflow' not in sys.modules, 'imported TensorFlow'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "unknown key(s) ['weather']" in proc.stdout, proc.stderr[-2000:]


def test_the_command_runs_accuracy_control_on_npz_with_labels(two_tower, tmp_path):
    d = two_tower["dir"]
    proc = _cli(f"--saved_model_dir={d / 'sm'}", f"--output_dir={tmp_path / 'out'}",
                f"--calibration_data={d / 'calib.npz'}", f"--validation_data={d / 'val.npz'}",
                "--int8=accuracy_aware", "--max_drop=0.02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["int8"]["max_drop_met"] and report["accuracy"]["samples"] == 128, report
    assert report["accuracy"]["openvino_fp32"] - report["accuracy"]["openvino_int8"] <= 0.02
