"""`python -m tfcompress.export --int8=accuracy_aware`: a missed max_drop is never hidden."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import layers as L


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tfcompress.export", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.heavy
def test_a_missed_max_drop_exits_3_unless_allowed_and_is_met_without_a_revert_limit(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3), name="x"), L.Conv2D(6, 3, activation="relu", name="conv"),
                              L.GlobalAveragePooling2D(), L.Dense(3, name="head")])
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 1, (200, 8, 8, 3)) * rng.uniform(0.2, 3, (200, 1, 1, 3))).astype("float32")
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias - np.median(model.predict(x, verbose=0), axis=0)])  # all 3 classes occur
    model.export(str(tmp_path / "sm"), verbose=False)
    # labels: the model's own argmax (FP32 is 100 % right). Blank calibration frames give every quantizer
    # a range of ~0: the conv's input and the head's input (positive averages of ReLUs) each saturate to one
    # constant on their own, so reverting any one layer leaves the output constant and no single revert
    # lowers the drop: limited to one revert, the search stops far above max_drop
    np.savez(tmp_path / "val.npz", x=x, y=model.predict(x, verbose=0).argmax(axis=1))
    np.save(tmp_path / "calib.npy", np.zeros_like(x[:64]))
    common = [f"--saved_model_dir={tmp_path / 'sm'}", f"--calibration_data={tmp_path / 'calib.npy'}",
              f"--validation_data={tmp_path / 'val.npz'}", "--int8=accuracy_aware", "--max_drop=0.01",
              "--max_iterations=1"]
    proc = _cli(*common, f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "did not reach max_drop=0.01" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())  # the export is still written
    step = report["steps"]["int8"]
    assert step["max_drop_met"] is False and step["drop"] > 0.01
    assert report["accuracy"]["openvino_fp32"] - report["accuracy"]["openvino_int8"] > 0.01
    assert "max_drop NOT met" in (tmp_path / "out" / "report.md").read_text()
    proc = _cli(*common, f"--output_dir={tmp_path / 'out2'}", "--allow_drop_miss")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: accuracy control did not reach max_drop" in proc.stderr
    # unlimited, the search reverts layers together until the drop falls, and meets max_drop
    proc = _cli(*[c for c in common if c != "--max_iterations=1"], f"--output_dir={tmp_path / 'out3'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "did not reach max_drop" not in proc.stderr
    step = json.loads((tmp_path / "out3" / "report.json").read_text())["steps"]["int8"]
    assert step["max_drop_met"] is True and step["drop"] <= 0.01 and step["reverted"], step


def _int8_weight_maxima(xml: str) -> list[int]:
    import openvino as ov

    return [int(np.abs(op.get_data()).max()) for op in ov.Core().read_model(xml).get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]


def test_overflow_fix_flag_and_what_this_cpus_int8_kernels_do(tmp_path):
    """--overflow_fix chooses the layers calibration keeps on 7-bit weights; the report names it, says whether
    this CPU's INT8 kernels saturate and how far they land from the INT8 IR's exact arithmetic. Raw pixels
    fill the u8 range: with full-range weights, kernels that add u8 x i8 pairs in int16 (no VNNI) overflow,
    which stderr says, naming the flag; with every layer on 7 bits no CPU's kernels can."""
    from tfcompress import calibration

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 3), name="x"), L.Conv2D(8, 3, activation="relu"),
                              L.Conv2D(8, 3, activation="relu"), L.GlobalAveragePooling2D(), L.Dense(4)])
    model.export(str(tmp_path / "sm"), verbose=False)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).uniform(0, 255, (32, 12, 12, 3)).astype("float32"))
    common = [f"--saved_model_dir={tmp_path / 'sm'}", f"--calibration_data={tmp_path / 'calib.npy'}"]
    saturates = calibration.cpu_saturates_int8()
    for fix, maxima in (("disable", [127] * 3), ("enable", [63] * 3)):
        out = tmp_path / fix
        proc = _cli(*common, f"--output_dir={out}", f"--overflow_fix={fix}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert _int8_weight_maxima(str(out / "model_int8.xml")) == maxima
        step = json.loads((out / "report.json").read_text())["steps"]["int8"]
        assert step["overflow_fix"] == fix and step["cpu_saturates_int8"] == saturates
        kernels = step["int8_kernels"]
        assert kernels["cpu_saturates_int8"] == saturates
        md = (out / "report.md").read_text()
        assert f"overflow fix: {fix}" in md
        if fix == "disable" and saturates:
            assert not kernels["within_tolerance"] and kernels["max_rel_error"] > kernels["tolerance"], kernels
            assert "This CPU has no VNNI" in proc.stderr and "--overflow_fix=enable" in proc.stderr
            assert "**beyond** its rounding noise" in md
        else:
            assert kernels["within_tolerance"], kernels
            assert "VNNI" not in proc.stderr, proc.stderr
            assert "within its rounding noise" in md


def test_a_bad_overflow_fix_exits_2_with_one_line(tmp_path):
    keras.Sequential([keras.Input((4,), name="x"), L.Dense(2)]).export(str(tmp_path / "sm"), verbose=False)
    np.save(tmp_path / "calib.npy", np.zeros((4, 4), "float32"))
    common = [f"--saved_model_dir={tmp_path / 'sm'}", f"--output_dir={tmp_path / 'out'}"]
    for args, message in (([f"--calibration_data={tmp_path / 'calib.npy'}", "--overflow_fix=half"],
                           "--overflow_fix=half: value should be one of"),
                          (["--overflow_fix=enable"], "--overflow_fix only applies with --calibration_data")):
        proc = _cli(*common, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_int8_checks_say_which_precision_they_measured_and_cover_the_default_one(tmp_path):
    """The INT8 IR's checks say the precision they ran at: its kernels against its exact arithmetic with the f32
    hint and, where OpenVINO's default precision on this CPU is another (bf16 on CPUs with AVX512-BF16 or AMX,
    what a user compiling the IR without a hint runs), again at that precision, with the numbers of such a
    compile; the INT8 step's error against the FP32 IR names the precision "default" was."""
    import openvino as ov

    from tfcompress import calibration
    from tfcompress.export import export_saved_model
    from tfcompress.export.checks import mean_rel_error

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 3), name="x"), L.Conv2D(8, 3, activation="relu"),
                              L.LayerNormalization(), L.Conv2D(8, 3, activation="sigmoid"),
                              L.GlobalAveragePooling2D(), L.Dense(4)])  # LayerNormalization, sigmoid: float
    model.export(str(tmp_path / "sm"), verbose=False)
    x = np.random.default_rng(0).uniform(0, 1, (40, 12, 12, 3)).astype("float32")
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x[:32],
                                validation_data=x[32:], verbose=False)
    step = report["steps"]["int8"]
    xml8 = str(tmp_path / "out" / "model_int8.xml")
    core = ov.Core()
    default = core.compile_model(xml8, "CPU")
    precision = default.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert step["max_rel_error_precision"] == precision
    kernels = step["int8_kernels"]
    assert kernels["precision"] == "f32"
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"default precision ({precision} on this CPU)" in md and "(f32 hint)" in md
    if precision == "f32":
        assert "default_precision" not in kernels
        return
    exact = core.compile_model(calibration.exact_arithmetic(core.read_model(xml8)), "CPU",
                               {"INFERENCE_PRECISION_HINT": "f32"})
    want, got = (np.asarray(c({0: x[32:]})[c.outputs[0]], np.float64) for c in (exact, default))
    record = kernels["default_precision"]
    assert record["precision"] == precision
    assert record["max_rel_error"] == pytest.approx(np.abs(got - want).max() / np.abs(want).max(), rel=1e-6)
    assert record["mean_rel_error"] == pytest.approx(mean_rel_error(got, want), rel=1e-6)
    assert record["within_tolerance"] == (record["max_rel_error"] <= kernels["tolerance"])
    assert f"At OpenVINO's default precision here ({precision}" in md


def test_the_warning_names_the_f32_hint_when_only_the_default_precision_is_beyond_the_noise():
    from tfcompress.export.ov_run import int8_kernel_warning

    record = {"max_rel_error": 1e-7, "mean_rel_error": 1e-7, "tolerance": 0.05, "within_tolerance": True,
              "precision": "f32", "cpu_saturates_int8": False}
    assert int8_kernel_warning(record, "fix") is None
    record["default_precision"] = {"precision": "bf16", "max_rel_error": 0.01, "mean_rel_error": 0.002,
                                   "within_tolerance": True}
    assert int8_kernel_warning(record, "fix") is None
    record["default_precision"].update(max_rel_error=0.2, within_tolerance=False)
    message = int8_kernel_warning(record, "fix")
    assert "default precision on this CPU (bf16)" in message and "2.00e-01" in message
    assert "'INFERENCE_PRECISION_HINT': 'f32'" in message and "VNNI" not in message
