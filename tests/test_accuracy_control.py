"""Accuracy control's search on a small model whose metric needs several reverts together.

The model: three small Dense branches ``a1``, ``a2``, ``a3`` summed into the first 4 outputs, and one larger
Dense ``b`` (64 outputs, larger weights) beside them. The metric counts the samples whose first 4 outputs
equal FP32's to float precision, so it changes only when all three ``a`` branches and the Add of them (whose
inputs are quantized) run in float: no single revert lowers the drop. ``b`` carries most of the output error,
so the error ranking puts it first, yet the metric never reads it: a search that keeps INT8 where it can must
give it back.
"""

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

from tfcompress import calibration
from tfcompress.export import to_onnx, to_openvino

A = ("a1", "a2", "a3")
NEEDED = ["a1", "a2", "a3", "add"]  # the branches and their Add


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    """The model as FP32 IR, its Keras layer names, calibration samples, validation samples and the metric."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    summed = L.Add()([L.Dense(4, name=n)(inp) for n in A])
    big = L.Dense(64, name="b", kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(inp)
    model = keras.Model(inp, L.Concatenate()([summed, big]))
    d = tmp_path_factory.mktemp("branches")
    model.export(str(d / "sm"), verbose=False)
    to_onnx(str(d / "sm"), str(d / "m.onnx"))
    to_openvino(str(d / "m.onnx"), str(d / "m.xml"))
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(64, 16)).astype("float32")
    val = rng.normal(size=(200, 16)).astype("float32")
    ref = _run(_f32(ov.Core().read_model(str(d / "m.xml"))), val)[:, :4]
    tol = 1e-4 * np.abs(ref).max()

    def exact_share(compiled, x) -> float:
        """The share of samples whose first 4 outputs are FP32's within float rounding (INT8 is ~1e-2 off)."""
        return float(np.mean(np.abs(_run(compiled, x)[:, :4] - ref).max(axis=1) <= tol))

    return str(d / "m.xml"), [layer.name for layer in model.layers], calib, val, exact_share


def _f32(model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _run(compiled, x):
    return np.asarray(compiled({0: x})[compiled.outputs[0]])


def _int8_matmuls(model) -> int:
    """How many MatMul / FullyConnected layers the CPU plugin runs in INT8 (f32 hint)."""
    ops = _f32(model).get_runtime_model().get_ops()
    return sum(op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")
               and op.get_rt_info()["runtimePrecision"].astype(str) in ("i8", "u8") for op in ops)


def test_several_reverts_together_meet_max_drop_where_none_alone_lowers_it(branches):
    xml, names, calib, val, exact_share = branches
    fp = ov.Core().read_model(xml)
    assert exact_share(_f32(fp), val) == 1.0
    assert exact_share(_f32(calibration.calibrate(fp, calib, verbose=False)), val) == 0.0
    q, info = calibration.calibrate_with_accuracy_control(
        xml, calib, val, exact_share, max_drop=0.05, layer_names=names, ranking_subset_size=64, verbose=False)
    assert info["int8_metric"] == 0.0 and info["max_drop_met"] and "warning" not in info, info
    assert info["drop"] <= 0.05 and info["drops"][0] == 1.0
    # the accumulated group: every step before it left the drop at 1.0, the group took it to the target
    assert sorted(info["reverted"]) == NEEDED, info
    assert exact_share(_f32(q), val) == pytest.approx(info["metric"])
    single = [calibration.calibrate(fp, calib, verbose=False,
                                    ignored_layers=[n for n in info["reverted_ir"] if n != keep])
              for keep in info["reverted_ir"]]
    assert all(exact_share(_f32(m), val) == 0.0 for m in single)  # any one of them left INT8: still 0


def test_layers_reverted_on_the_way_and_not_needed_go_back_to_int8(branches):
    xml, names, calib, val, exact_share = branches
    for ranking in ("error", "speed"):
        q, info = calibration.calibrate_with_accuracy_control(
            xml, calib, val, exact_share, max_drop=0.05, layer_names=names, ranking=ranking,
            ranking_subset_size=64, verbose=False)
        assert info["max_drop_met"], (ranking, info)
        # "b" removes the most output error, so the error order reverted it first; the metric did not need it
        assert "b" in info["restored"] and "b" not in info["reverted"], (ranking, info)
        assert sorted(info["reverted"]) == NEEDED, (ranking, info)
        assert _int8_matmuls(q) == 1  # b's MatMul runs INT8 in the returned model, the a branches' in float
        macs = calibration.layer_macs(ov.Core().read_model(xml))
        assert info["int8_mac_share"] == pytest.approx(16 * 64 / sum(macs.values()))


def test_a_metric_that_is_not_a_finite_number_is_refused(branches):
    """A metric of nan (np.mean of an empty batch) made every drop nan, which compares false with max_drop: the
    search stopped before its first step and only a warning said 'the drop is nan'; text was read as a number."""
    xml, _, calib, val, _ = branches
    for metric in (float("nan"), None, "0.9", np.array([0.5])):
        with pytest.raises(ValueError, match="validate_fn must return a finite number"):
            calibration.calibrate_with_accuracy_control(xml, calib, val, lambda c, x, m=metric: m, verbose=False)
