"""`python -m tfcompress.export --int8=accuracy_aware`: a missed max_drop is never hidden."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
from keras import layers as L


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "tfcompress.export", *args], capture_output=True, text=True,
                          env=env, timeout=900)


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
