"""INT8 calibration of a real OpenVINO IR (MLPerf Tiny ResNet-8, CIFAR-10), checked on OpenVINO's runtime model."""

import keras
import numpy as np
import openvino as ov
import pytest
import tensorflow as tf
from keras import layers as L

from tfcompress import calibration
from tfcompress.export import to_onnx, to_openvino
from conftest import SHARED_DATA


RESNET8 = SHARED_DATA / "models" / "mlperf_tiny" / "pretrainedResnet.h5"


@pytest.fixture(scope="module")
def resnet8_ir(tmp_path_factory):
    """The pretrained MLPerf Tiny ResNet-8 as FP32 IR, and CIFAR-10 JPEG test images (raw 0..255 floats).

    Calibration uses 300 images, validation 2,000 others (shuffled: the file is sorted by class).
    """
    model = keras.models.load_model(RESNET8, compile=False)
    d = tmp_path_factory.mktemp("ir")
    model.export(str(d / "sm"), verbose=False)
    to_onnx(str(d / "sm"), str(d / "m.onnx"))
    to_openvino(str(d / "m.onnx"), str(d / "m.xml"))
    data = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")
    order = np.random.default_rng(0).permutation(len(data["y_test"]))
    x, y = data["x_test"][order].astype("float32"), data["y_test"][order]
    return str(d / "m.xml"), x[:300], (x[300:2300], y[300:2300])


def accuracy(compiled, data):
    x, y = data
    out = np.concatenate([compiled({0: x[i:i + 500]})[compiled.outputs[0]] for i in range(0, len(x), 500)])
    return float((out.argmax(axis=1) == y).mean())


def _f32(model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _precisions(compiled):
    out = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        out.setdefault(info["layerType"].astype(str), []).append(info["runtimePrecision"].astype(str))
    return out


def test_every_conv_and_matmul_runs_int8_and_accuracy_holds(resnet8_ir):
    xml, calib, val = resnet8_ir
    fp = ov.Core().read_model(xml)
    n_ops = len(fp.get_ordered_ops())
    q = calibration.calibrate(fp, calib, subset_size=300, verbose=False)
    assert len(fp.get_ordered_ops()) == n_ops  # the input model is not modified
    # weights are stored as int8 constants (no float weights left behind a FakeQuantize)
    weight_consts = [op.input(1).get_source_output().get_node() for op in q.get_ordered_ops()
                     if op.get_type_name() in ("Convolution", "MatMul")]
    assert all(n.get_type_name() == "Multiply" for n in weight_consts), {n.get_type_name() for n in weight_consts}
    assert sum(str(op.get_output_element_type(0)) == "<Type: 'int8_t'>" for op in q.get_ordered_ops()
               if op.get_type_name() == "Constant") == 10
    compiled = ov.Core().compile_model(q, "CPU")
    prec = _precisions(compiled)
    assert len(prec["Convolution"]) == 9 and len(prec["FullyConnected"]) == 1
    for kind in ("Convolution", "FullyConnected"):
        assert all(p in ("u8", "i8") for p in prec[kind]), prec[kind]
    acc_fp, acc_q = accuracy(_f32(fp), val), accuracy(compiled, val)
    assert acc_fp > 0.7  # 75.5 % on the whole JPEG test split
    assert acc_q >= acc_fp - 0.01


def _activation_highs(model) -> dict:
    """Per-tensor activation FakeQuantizes: producer's friendly name -> input_high."""
    out = {}
    for op in model.get_ordered_ops():
        high = op.input_value(2).get_node() if op.get_type_name() == "FakeQuantize" else None
        if high is not None and op.input_value(0).get_node().get_type_name() != "Constant" \
                and high.get_type_name() == "Constant" and high.get_data().size == 1:
            out[op.input_value(0).get_node().get_friendly_name()] = float(high.get_data().ravel()[0])
    return out


def test_activation_ranges_are_the_f32_models_mean_of_per_sample_maxima(resnet8_ir):
    """Each per-tensor range is the mean over the calibration samples of each sample's max |x| in the FP32
    model run in f32 (NNCF's estimator and precision), whatever precision the plugin would pick by default
    (bf16 on CPUs with AVX512-BF16 or AMX rounds the maxima to 8 mantissa bits: up to 0.4 % off)."""
    xml, calib, _ = resnet8_ir
    fp = ov.Core().read_model(xml)
    highs = _activation_highs(calibration.calibrate(fp, calib[:64], subset_size=64, verbose=False))
    assert len(highs) >= 9, highs
    probe = fp.clone()
    by_name = {op.get_friendly_name(): op for op in probe.get_ordered_ops()}
    names = sorted(highs)
    probe.add_outputs([by_name[n].output(0) for n in names])
    compiled = _f32(probe)
    res = compiled({0: calib[:64]})
    extra = compiled.outputs[len(compiled.outputs) - len(names):]
    for name, out in zip(names, extra):
        x = np.abs(np.asarray(res[out])).reshape(64, -1).max(axis=1)
        assert highs[name] == pytest.approx(float(x.mean()), rel=1e-5), name


def test_calibration_data_as_tf_dataset_and_mixed_preset(resnet8_ir):
    xml, calib, val = resnet8_ir
    ds = tf.data.Dataset.from_tensor_slices(calib).batch(32)
    q = calibration.calibrate(xml, ds, preset="mixed", subset_size=100, bias_correction=False, verbose=False)
    fqs = [op for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    act = [op for op in fqs if op.get_attributes()["levels"] == 256]
    lows = [float(op.input(1).get_source_output().get_node().get_data().min()) for op in act]
    assert any(lo < 0 for lo in lows) or all(lo == 0 for lo in lows)
    assert accuracy(ov.Core().compile_model(q, "CPU"), val) > 0.7


def test_accuracy_aware_reverts_layers_until_the_drop_is_met(resnet8_ir):
    xml, calib, val = resnet8_ir
    small_val = (val[0][:1000], val[1][:1000])
    bad_calib = calib * 0.1  # ranges far too narrow: plain calibration clips and loses accuracy
    plain = calibration.calibrate(xml, bad_calib, verbose=False)
    fp_acc = accuracy(_f32(ov.Core().read_model(xml)), small_val)
    assert accuracy(ov.Core().compile_model(plain, "CPU"), small_val) < fp_acc - 0.05
    keras_names = [layer.name for layer in keras.models.load_model(RESNET8, compile=False).layers]
    q, info = calibration.calibrate_with_accuracy_control(
        xml, bad_calib, small_val, accuracy, max_drop=0.01, ranking_subset_size=64, layer_names=keras_names,
        verbose=False)
    assert info["reverted"], info
    assert info["drop"] <= 0.01 and info["max_drop_met"] and "warning" not in info
    assert info["fp32_metric"] == pytest.approx(fp_acc)
    assert info["drops"][0] > info["drops"][-1]
    # the drop was measured with the f32 hint: the returned model compiled so gives the reported metric
    assert accuracy(_f32(q), small_val) == pytest.approx(info["metric"])
    # reverted layers are reported by the Keras model's layer names (a convolution with its BatchNorm folded
    # in by the BatchNorm's), their IR names kept apart; a quantizer hoisted above a Reshape or Transpose is
    # reported by the layers it fed, not by that op
    assert set(info["reverted"]) <= set(keras_names), info["reverted"]
    kinds = {op.get_friendly_name(): op.get_type_name() for op in ov.Core().read_model(xml).get_ordered_ops()}
    assert {kinds[n] for n in info["reverted_ir"]} <= {"Convolution", "MatMul", "Add", "AvgPool", "ReduceMean"}
    assert len(info["reverted"]) <= len(info["reverted_ir"])
    # the INT8 share of the MACs: every weighted layer reverted so far is out of it
    macs = calibration.layer_macs(ov.Core().read_model(xml))
    reverted_macs = sum(m for k, m in macs.items()
                        if list(ov.Core().read_model(xml).get_ordered_ops())[k].get_friendly_name() in info["reverted_ir"])
    assert info["int8_mac_share"] == pytest.approx(1 - reverted_macs / sum(macs.values()))


def test_accuracy_control_reports_a_missed_max_drop(resnet8_ir):
    xml, calib, val = resnet8_ir
    small_val = (val[0][:500], val[1][:500])
    with pytest.warns(UserWarning, match="did not reach max_drop=0.0"):
        _, info = calibration.calibrate_with_accuracy_control(
            xml, calib * 0.1, small_val, accuracy, max_drop=0.0, max_iterations=1, ranking_subset_size=32,
            verbose=False)
    assert not info["max_drop_met"] and info["drop"] > 0
    assert f"{info['drop']:.4f}" in info["warning"]


def test_bad_arguments(resnet8_ir):
    xml, calib, _ = resnet8_ir
    with pytest.raises(ValueError, match="unknown preset"):
        calibration.calibrate(xml, calib, preset="fast")
    with pytest.raises(ValueError, match="subset_size"):
        calibration.calibrate(xml, calib, subset_size=0)
    with pytest.raises(ValueError, match="unknown overflow_fix"):
        calibration.calibrate(xml, calib, overflow_fix="first")
    with pytest.raises(TypeError, match="channel_alignment"):
        calibration.calibrate(xml, calib, channel_alignment="yes")
    with pytest.raises(ValueError, match=r"must have shape \(32, 32, 3\)"):
        calibration.calibrate(xml, np.zeros((4, 32, 32)), verbose=False)


def _two_input_ir(rng):
    """x_a (8 features) and x_b (4 features) each through a MatMul, added: a quantizer on each input."""
    import openvino.opset13 as ops

    a, b = ops.parameter([-1, 8], ov.Type.f32, name="a"), ops.parameter([-1, 4], ov.Type.f32, name="b")
    a.output(0).set_names({"a"})
    b.output(0).set_names({"b"})
    wa, wb = (ops.constant(rng.normal(size=(n, 3)).astype("float32")) for n in (8, 4))
    out = ops.add(ops.matmul(a, wa, False, False), ops.matmul(b, wb, False, False))
    return ov.Model([out.output(0)], [a, b])


def _input_ranges(q) -> dict[str, float]:
    """Per model input: the upper limit of the FakeQuantize that reads it."""
    found = {}
    for op in q.get_ordered_ops():
        src = op.input(0).get_source_output().get_node() if op.get_type_name() == "FakeQuantize" else None
        if src is not None and src.get_type_name() == "Parameter":
            found[src.get_friendly_name()] = float(op.input(2).get_source_output().get_node().get_data().max())
    return found


def _constants(model) -> list[np.ndarray]:
    return [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]


def test_a_model_with_two_inputs_takes_one_array_per_input_in_every_form(rng):
    """Samples of a two-input model, by input name or in input order, whole, per sample, as (x, y) pairs or a
    tf.data.Dataset of dicts, calibrate the same model, each input's quantizer on that input's own values
    (inputs of 1x and 100x scale). Calibration refused models with several inputs."""
    import tensorflow as tf

    fp = _two_input_ir(rng)
    xa = rng.normal(size=(40, 8)).astype("float32")
    xb = (100 * rng.normal(size=(40, 4))).astype("float32")
    y = np.arange(40)
    forms = {
        "dict": {"a": xa, "b": xb},
        "tuple": (xa, xb),
        "list": [xa, xb],
        "(x, y) pair": ((xa, xb), y),
        "per-sample tuples": [(xa[i], xb[i]) for i in range(40)],
        "per-sample dicts with labels": [({"b": xb[i], "a": xa[i]}, y[i]) for i in range(40)],
        "dataset of dict batches": tf.data.Dataset.from_tensor_slices(({"a": xa, "b": xb}, y)).batch(16),
    }
    built = {k: calibration.calibrate(fp, data, verbose=False) for k, data in forms.items()}
    ranges = _input_ranges(built["dict"])
    # auto: "max" on a model without feature maps; signed symmetric, 127 steps up to the largest |x|
    assert ranges["a"] == pytest.approx(np.abs(xa).max(), rel=1e-5)
    assert ranges["b"] == pytest.approx(np.abs(xb).max(), rel=1e-5)
    for k, q in built.items():
        for c, c0 in zip(_constants(q), _constants(built["dict"])):
            np.testing.assert_array_equal(c, c0, err_msg=k)
    q, _ = calibration.calibrate_with_accuracy_control(fp, (xa, xb), ((xa, xb), y), lambda m, d: 1.0,
                                                       verbose=False)
    assert _input_ranges(q) == ranges


def test_samples_that_do_not_fit_a_two_input_model_are_refused_by_name(rng):
    fp = _two_input_ir(rng)
    xa, xb = np.ones((4, 8), np.float32), np.ones((4, 4), np.float32)
    bad = {
        r"no array for input\(s\) \['b'\]; the model's inputs are \['a', 'b'\]": {"a": xa},
        r"unknown key\(s\) \['c'\]": {"a": xa, "b": xb, "c": xb},
        r"different numbers of samples per input: 'a' 4, 'b' 3": {"a": xa, "b": xb[:3]},
        r"input 'b' must have shape \(4,\) \(model input\), got \(8,\)": (xa, xa),
        r"2 inputs \['a', 'b'\]: give one array per input": xa,
    }
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            calibration.calibrate(fp, data, verbose=False)
    with pytest.raises(ValueError, match="no array for input"):
        calibration.calibrate_with_accuracy_control(fp, (xa, xb), {"a": xa}, lambda m, d: 1.0, verbose=False)


def test_a_float16_ir_of_a_mixed_precision_model_is_calibrated(tmp_path, rng):
    """An IR that computes in float16 (OpenVINO's own conversion of a Keras mixed_float16 model; the export's
    IRs compute in float32): quantizers with float32 limits and float32 grid weights failed OpenVINO's type
    check ('Element types for data batch and filters do not match'), a traceback after all the work."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 3))
        a = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
        a = L.Conv2D(8, 3, padding="same")(L.Add()([a, L.Conv2D(8, 1)(a)]))  # bias-corrected on an f32 side model
        model = keras.Model(inp, L.Dense(2, dtype="float32")(L.GlobalAveragePooling2D()(a)))
        for layer in model.layers:  # trained biases (zero ones vanish from the IR, and bias correction with them)
            if getattr(layer, "bias", None) is not None:
                layer.bias.assign(rng.uniform(0.05, 0.1, layer.bias.shape))
        model.export(str(tmp_path / "sm"), verbose=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    to_onnx(str(tmp_path / "sm"), str(tmp_path / "m.onnx"), tolerance=0.02)  # TF rounds to float16 differently
    fp = ov.convert_model(str(tmp_path / "m.onnx"))
    assert any(op.get_output_element_type(0) == ov.Type.f16 for op in fp.get_ordered_ops()
               if op.get_type_name() == "Convolution")
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    assert calibration.int8_layers(_f32(calibration.calibrate(fp, x, verbose=False))) == {"int8": 4, "total": 4}
    # ranges over the extremes seen: the error is the quantization's (the default mean of per-sample maxima
    # clips these random maps, in float32 models as much: 0.15)
    ref = _f32(fp)({0: x})[0]
    _assert_int8_error_below(fp, x, ref, 0.05, range_estimator="max")
    _, info = calibration.calibrate_with_accuracy_control(  # its ranking model switches float16 biases too
        fp, x, (x, ref.argmax(1)), lambda c, d: float(np.mean(c(d[0])[0].argmax(1) == d[1])), max_drop=0.0,
        verbose=False)
    assert info["max_drop_met"]


def _int8_errors(q, x, ref) -> dict:
    """Relative max error against ``ref`` of the INT8 IR ``q`` on ``x`` (f32 hint): in exact arithmetic (the
    IR's function, what CPUs accumulating INT8 products in int32 compute) and on this CPU's INT8 kernels."""
    ref = np.asarray(ref, np.float64)
    got = {"exact": _f32(calibration.exact_arithmetic(q))({0: x})[0], "kernels": _f32(q)({0: x})[0]}
    return {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in got.items()}


def _assert_int8_error_below(fp, x, ref, limit: float, **kw) -> None:
    """The calibrated IR of ``fp`` is within ``limit`` (relative max error) of ``ref`` in exact arithmetic,
    and on this CPU's INT8 kernels where they cannot saturate; where they can (no VNNI: these random weights
    fill the int8 grid, so deeper layers' int16 pair sums overflow), the IR calibrated with
    ``overflow_fix="enable"`` is, on the kernels too."""
    errors = {fix: _int8_errors(calibration.calibrate(fp, x, overflow_fix=fix, verbose=False, **kw), x, ref)
              for fix in ("first_layer", "enable")}
    assert errors["first_layer"]["exact"] < limit and errors["enable"]["exact"] < limit, errors
    assert errors["enable"]["kernels"] < limit, errors
    if not calibration.cpu_saturates_int8():
        assert errors["first_layer"]["kernels"] < limit, errors


def _stem_ir(tmp_path):
    """conv -> ReLU -> ZeroPadding -> MaxPool -> two convs (a ResNet stem), as OpenVINO IR via our export."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same")(inp))
    x = L.MaxPooling2D(3, strides=2)(L.ZeroPadding2D(1)(x))
    out = L.Add()([L.Conv2D(8, 1)(x), L.Conv2D(8, 3, padding="same")(x)])
    keras.Model(inp, L.GlobalAveragePooling2D()(out)).export(str(tmp_path / "sm"), verbose=False)
    to_onnx(str(tmp_path / "sm"), str(tmp_path / "m.onnx"))
    to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"))
    return ov.Core().read_model(str(tmp_path / "m.xml"))


def test_quantizer_goes_before_pad_and_maxpool(tmp_path, rng):
    fp = _stem_ir(tmp_path)
    q = calibration.calibrate(fp, rng.normal(size=(32, 32, 32, 3)).astype("float32"), verbose=False)
    act_fq = [op for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
              and op.get_attributes()["levels"] == 256]
    sources = sorted(op.input(0).get_source_output().get_node().get_type_name() for op in act_fq)
    # model input, ReLU (before Pad: Pad and MaxPool run on its INT8 grid, the convolutions read it without
    # a second quantizer), both Add inputs, the pooling input
    assert sources.count("Relu") == 1 and "MaxPool" not in sources and "Pad" not in sources, sources
    assert calibration.int8_layers(ov.Core().compile_model(q, "CPU"))["int8"] == 3


def test_integer_inputs_get_no_quantizer(tmp_path, rng):
    """Token ids (an Embedding's indices) are integers: only float tensors are quantized (a FakeQuantize on
    the i32 indices made the CPU plugin refuse to compile the model)."""
    keras.utils.set_random_seed(0)
    tok = keras.Input((10,), dtype="int32")
    x = L.Conv1D(8, 3, activation="relu")(L.Embedding(20, 8)(tok))
    keras.Model(tok, L.Dense(3)(L.GlobalMaxPooling1D()(x))).export(str(tmp_path / "sm"), verbose=False)
    to_onnx(str(tmp_path / "sm"), str(tmp_path / "m.onnx"))
    to_openvino(str(tmp_path / "m.onnx"), str(tmp_path / "m.xml"))
    fp = ov.Core().read_model(str(tmp_path / "m.xml"))
    ids = rng.integers(0, 20, (32, 10)).astype("int32")
    q = calibration.calibrate(fp, ids, verbose=False)
    fq_inputs = [op.input(0).get_element_type() for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert fq_inputs and all(t.is_real() for t in fq_inputs)
    compiled = ov.Core().compile_model(q, "CPU")
    assert calibration.int8_layers(compiled)["int8"] >= 1
    _assert_int8_error_below(fp, ids, _f32(fp)({0: ids})[0], 0.25)


def test_fast_bias_correction_removes_the_mean_error_of_a_linear_layer(rng):
    import openvino.opset13 as ops

    # one fully-connected layer with a bias; with ranges that clip nothing (range_estimator="max") the mean
    # error left after quantization is the weights' rounding, (W - Wq) E[x], which the correction removes
    w = rng.normal(size=(16, 4)).astype("float32")
    b = rng.uniform(1, 2, size=4).astype("float32")
    p = ops.parameter([-1, 16], ov.Type.f32)
    fp = ov.Model([ops.add(ops.matmul(p, ops.constant(w), False, False), ops.constant(b[None])).output(0)], [p])
    x = rng.normal(loc=1.0, size=(300, 16)).astype("float32")
    plain = calibration.calibrate(fp, x, bias_correction=False, range_estimator="max", verbose=False)
    corrected = calibration.calibrate(fp, x, range_estimator="max", verbose=False)
    ref = x @ w + b
    err = {name: (_f32(m)({0: x})[0] - ref).mean(axis=0) for name, m in (("plain", plain), ("bc", corrected))}
    assert np.abs(err["plain"]).max() > 1e-3  # weight rounding alone biases the outputs
    assert np.abs(err["bc"]).max() < np.abs(err["plain"]).max() / 5


def test_bias_shift_of_a_pointwise_layer_uses_the_irs_own_quantized_weights(rng):
    """The shift of a fully-connected layer is (W - Wq) E[x] with Wq the IR's int8 weights. The float32
    weights include some at a rounding tie, where round(w / step) and OpenVINO's FakeQuantize arithmetic land
    one step apart (each such weight moves the shift by ~step * E[x], 1e-2 here); the shift must follow the IR."""
    import openvino.opset13 as ops

    w = rng.normal(size=(1024, 256)).astype("float32")
    b = rng.uniform(1, 2, size=256).astype("float32")
    p = ops.parameter([-1, 1024], ov.Type.f32)
    fp = ov.Model([ops.add(ops.matmul(p, ops.constant(w), False, False), ops.constant(b[None])).output(0)], [p])
    x = rng.normal(loc=1.0, size=(64, 1024)).astype("float32")
    q = calibration.calibrate(fp, x, range_estimator="max", overflow_fix="disable", verbose=False)
    (wq,) = _dequantized_weights(q)
    step = np.abs(w).max(axis=0) / 127
    assert np.sum(np.round(w / step) != np.round(wq / step)) > 0, "the test needs weights at a rounding tie"
    (add,) = [op for op in q.get_ordered_ops() if op.get_type_name() == "Add"]
    bias = add.input_value(1).get_node().get_data().ravel()
    expected = b + x.astype(np.float64).mean(axis=0) @ (w - wq)
    # float32 sums differ by ~5e-5; one misrounded weight moves a channel's bias by ~1e-2
    np.testing.assert_allclose(bias, expected, rtol=0, atol=2e-4)


def _conv_pair(rng, consumer_pads=(0, 0), extra_reader=False):
    """conv 3x3 (+ bias) -> conv 1x1 (+ bias) -> ReLU, the middle tensor's 8 channels spread over very
    different ranges (widths 0.05 .. 50, offsets up to 30): per-tensor INT8 loses the narrow channels."""
    import openvino.opset13 as ops

    spread = np.geomspace(0.05, 50, 8).astype("float32")
    w_in = rng.normal(size=(8, 4, 3, 3)).astype("float32") * spread[:, None, None, None] / 6
    b_in = (rng.uniform(-30, 30, 8) * (spread > 1)).astype("float32")
    w_out = (rng.normal(size=(6, 8, 1, 1)) / spread[None, :, None, None]).astype("float32")
    b_out = rng.normal(size=6).astype("float32")
    p = ops.parameter([-1, 4, 16, 16], ov.Type.f32)
    mid = ops.add(ops.convolution(p, ops.constant(w_in), [1, 1], [1, 1], [1, 1], [1, 1]), ops.constant(b_in.reshape(1, 8, 1, 1)))
    out = ops.add(ops.convolution(mid, ops.constant(w_out), [1, 1], list(consumer_pads), list(consumer_pads), [1, 1]),
                  ops.constant(b_out.reshape(1, 6, 1, 1)))
    results = [ops.relu(out).output(0)] + ([mid.output(0)] if extra_reader else [])
    return ov.Model(results, [p])


def test_channel_alignment_keeps_the_float_model_and_cuts_the_int8_error(rng):
    from tfcompress.calibration import alignment

    fp = _conv_pair(rng)
    x = rng.normal(size=(64, 4, 16, 16)).astype("float32")
    pairs = alignment.alignment_pairs(fp)
    assert len(pairs) == 1
    aligned = fp.clone()
    middle = fp.clone()
    middle.add_outputs([middle.get_ordered_ops()[pairs[0].tensor[0]].output(0)])
    lo, hi = np.quantile(np.moveaxis(_f32(middle)({0: x})[1], 1, 0), [0, 1], axis=(1, 2, 3))
    assert alignment.align(aligned, pairs, {pairs[0].tensor: (lo, hi)}) == 1
    ref = _f32(fp)({0: x})[0]
    np.testing.assert_allclose(_f32(aligned)({0: x})[0], ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())

    plain = calibration.calibrate(fp, x, bias_correction=False, verbose=False)
    better = calibration.calibrate(fp, x, bias_correction=False, channel_alignment=True, verbose=False)
    err = {name: np.abs(_f32(m)({0: x})[0] - ref).mean() for name, m in (("plain", plain), ("aligned", better))}
    assert err["aligned"] < err["plain"] / 3, err
    assert len(fp.get_ordered_ops()) == len(_conv_pair(rng).get_ordered_ops())  # the input is not modified


@pytest.mark.parametrize("kwargs", [{"consumer_pads": (1, 1)}, {"extra_reader": True}])
def test_channel_alignment_leaves_pairs_it_cannot_change_exactly(rng, kwargs):
    from tfcompress.calibration import alignment

    # zero padding after a shift is not a shift; a tensor the user also reads (a model output) must not change
    assert alignment.alignment_pairs(_conv_pair(rng, **kwargs)) == []


def _int8_weight_maxima(model) -> list[int]:
    """Largest |integer| of each int8 weight constant, in graph order (the first convolution first)."""
    return [int(np.abs(op.get_data()).max()) for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]


@pytest.mark.parametrize("overflow_fix, expected", [
    ("first_layer", [63] + [127] * 9), ("enable", [63] * 10), ("disable", [127] * 10)])
def test_overflow_fix_keeps_chosen_weights_on_seven_bits(resnet8_ir, overflow_fix, expected):
    # u8 x i8 pairs summed in int16 (CPUs without VNNI) cannot saturate with weights in [-63, 63]
    xml, calib, val = resnet8_ir
    q = calibration.calibrate(xml, calib, overflow_fix=overflow_fix, verbose=False)
    assert _int8_weight_maxima(q) == expected
    acc, fp32 = accuracy(ov.Core().compile_model(q, "CPU"), val), accuracy(_f32(ov.Core().read_model(xml)), val)
    if overflow_fix == "disable" and calibration.cpu_saturates_int8():
        # what the fix is for: on this CPU the first convolution's pair sums over raw pixels saturate
        assert acc < fp32 - 0.05, (acc, fp32)
    else:
        assert acc >= fp32 - 0.01, (acc, fp32)


def test_overflow_fix_covers_a_fully_connected_first_layer(rng):
    import openvino.opset13 as ops

    # an MLP on raw features: its first MatMul reads the u8-filling input as a first convolution would
    w1, w2 = rng.normal(size=(32, 16)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")
    p = ops.parameter([-1, 32], ov.Type.f32)
    hidden = ops.relu(ops.matmul(p, ops.constant(w1), False, False))
    fp = ov.Model([ops.matmul(hidden, ops.constant(w2), False, False).output(0)], [p])
    x = rng.normal(loc=1.0, size=(256, 32)).astype("float32")
    ref = x @ w1
    ref = np.maximum(ref, 0) @ w2
    err = {}
    for fix, expected in (("first_layer", [63, 127]), ("disable", [127, 127])):
        # ranges that clip nothing ("max"): what is left is rounding, and saturation where the CPU has it
        q = calibration.calibrate(fp, x, overflow_fix=fix, range_estimator="max", verbose=False)
        assert _int8_weight_maxima(q) == expected
        assert calibration.int8_layers(ov.Core().compile_model(q, "CPU"))["int8"] == 2
        err[fix] = np.abs(_f32(q)({0: x})[0] - ref).mean() / np.abs(ref).mean()
    assert err["first_layer"] < 0.03, err
    if calibration.cpu_saturates_int8():  # full-range weights saturate the int16 pair sums here
        assert err["disable"] > 3 * err["first_layer"], err
    else:
        assert err["disable"] < 0.03, err


def _dequantized_weights(model) -> list[np.ndarray]:
    """Each int8 weight constant times its per-channel scale (Constant i8 -> Convert -> Multiply), in graph order."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8:
            convert = next(iter(op.output(0).get_target_inputs())).get_node()
            multiply = next(iter(convert.output(0).get_target_inputs())).get_node()
            out.append(op.get_data().astype(np.float64) * multiply.input_value(1).get_node().get_data())
    return out


def test_seven_bit_grid_is_the_finest_that_keeps_every_weight_within_half_a_step(rng):
    """The overflow fix's grid: integers in [-63, 63] with a step of abs-max / 63.5 per output channel, so the
    channel's largest weight (clipped to level 63) is off by half a step, as every other weight at most; the
    full 8-bit grid of the next layer keeps its abs-max exactly."""
    import openvino.opset13 as ops

    w1, w2 = rng.normal(size=(32, 16)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")
    p = ops.parameter([-1, 32], ov.Type.f32)
    fp = ov.Model([ops.matmul(ops.relu(ops.matmul(p, ops.constant(w1), False, False)), ops.constant(w2),
                              False, False).output(0)], [p])
    q = calibration.calibrate(fp, rng.normal(loc=1.0, size=(64, 32)).astype("float32"), verbose=False)
    assert _int8_weight_maxima(q) == [63, 127]
    first, second = _dequantized_weights(q)
    step = np.abs(w1).max(axis=0) / 63.5
    np.testing.assert_allclose(np.abs(first).max(axis=0), 63 * step, rtol=1e-5)
    assert np.all(np.abs(first - w1) <= step / 2 * (1 + 1e-4))
    assert np.abs(first - w1).max(axis=0) == pytest.approx(step / 2, rel=1e-4)  # reached at the clipped abs-max
    np.testing.assert_allclose(np.abs(second).max(axis=0), np.abs(w2).max(axis=0), rtol=1e-5)


def test_weights_on_the_seven_bit_grid_are_read_as_such_even_where_a_channel_is_only_zero_and_its_max(rng):
    """QAT weights on the overflow fix's grid, as a converter folds them into float constants: every channel
    is read back with integers in [-63, 63], also one holding only 0 and +-abs-max (which the 8-bit grid fits
    too, with 127s that can saturate a CPU without VNNI); a channel on the 8-bit grid keeps its 127s."""
    from tfcompress.int8_policy import on_int8_grid

    step = rng.uniform(0.01, 0.1, size=6)
    q7 = rng.integers(-63, 64, size=(3, 3, 4, 6)).astype(np.float64)
    q7[..., :, 2] = rng.choice([-63.0, 0.0, 63.0], size=(3, 3, 4))
    q7[0, 0, 0, :] = 63  # each channel reaches its abs-max
    q, scale = on_int8_grid(q7 * step, axis=3)
    np.testing.assert_array_equal(q, q7)
    np.testing.assert_allclose(scale, step, rtol=1e-12)
    q8 = rng.integers(-127, 128, size=(3, 3, 4, 6)).astype(np.float64)
    q8[0, 0, 0, :] = 127
    q, scale = on_int8_grid(q8 * step, axis=3)
    np.testing.assert_array_equal(q, q8)


def test_float16_weights_on_the_int8_grid_are_read_back_whatever_their_channels_size(rng):
    """mixed_float16 QAT weights, folded into float16 constants: q * scale rounded to float16 (2^-11 of the
    value), the abs-max that gave the scale rounded too. Read against abs-max / 127, a 3x3x256x256 layer's
    weights strayed up to 0.12 steps from their integers, beyond the 0.1 allowed: the layer stayed float in
    the IR. Unquantized float16 weights of the same shape are not read as on the grid."""
    from tfcompress.int8_policy import on_int8_grid

    q8 = np.clip(np.round(rng.normal(0, 60, size=(3, 3, 256, 256))), -127, 127)
    q8[0, 0, 0, :] = rng.choice([-127.0, 127.0], size=256)  # each channel reaches its abs-max
    step = rng.uniform(1e-3, 0.1, size=256).astype(np.float32)
    w = (q8.astype(np.float32) * step).astype(np.float16)
    q, scale = on_int8_grid(w.astype(np.float64), axis=3, tolerance=0.1)
    assert q is not None
    np.testing.assert_array_equal(q, q8)
    np.testing.assert_allclose(scale, step, rtol=2.0 ** -11)
    unquantized = rng.normal(0, 0.05, size=(3, 3, 256, 256)).astype(np.float16)
    assert on_int8_grid(unquantized.astype(np.float64), axis=3, tolerance=0.1) == (None, None)


def test_ranking_model_switches_each_candidate_like_a_built_trial(resnet8_ir):
    """The one model accuracy control ranks with (a boolean input per candidate) orders the candidate reverts
    as the trial models built with each layer in float do. Its quantizers run as float FakeQuantize, the built
    models' as INT8 kernels whose rounding differs, so the outputs agree in total error, not element by element."""
    from tfcompress.calibration.accuracy_control import _candidates, _Ranker, _Search
    from tfcompress.calibration.placement import find_points
    from tfcompress.calibration.quantize import _calibration_state

    xml, calib, val = resnet8_ir
    model = ov.Core().read_model(xml)
    acts, weights = find_points(model, (), "first_layer")
    ranges, shifts = _calibration_state(model, calib, "performance", 300, True, (), "minmax", "first_layer", False)
    assert shifts, "the test needs bias shifts to switch"
    # the calibration's own shifts change ResNet-8's output error by less than INT8 kernels and float
    # FakeQuantize differ; ten times larger, reverting each candidate moves the error by its own distinct amount
    shifts = {k: 10 * v for k, v in shifts.items()}
    search = _Search(model, ranges, shifts, (), "first_layer", _f32)
    candidates, _ = _candidates(model, acts, weights)
    ranker = _Ranker(search, candidates, batch=16)
    x = val[0][:128]
    fp = np.asarray(_f32(model)({0: x})[0])
    samples = [(x[i:i + 1],) for i in range(len(x))]  # what the ranking runs: one array per input, per sample

    def ranked(skip):
        return np.concatenate(ranker.outputs(skip, samples)[0])

    def error(out):
        return float(np.abs(out - fp).sum())

    built = error(_f32(search.build(set()))({0: x})[0])
    assert error(ranked(set())) == pytest.approx(built, rel=0.05)
    tried = candidates[:10]
    by_build = [error(_f32(search.build({c}))({0: x})[0]) for c in tried]
    by_ranker = [error(ranked({c})) for c in tried]
    assert np.corrcoef(by_build, by_ranker)[0, 1] > 0.99, (by_build, by_ranker)
    assert np.argmin(by_build) == np.argmin(by_ranker)
    # a set of reverts switches all of them; everything reverted is the FP32 model
    pair = error(_f32(search.build(set(tried[:2])))({0: x})[0])
    assert error(ranked(set(tried[:2]))) == pytest.approx(pair, rel=0.05)
    np.testing.assert_allclose(ranked(set(candidates)), fp, atol=1e-4 * np.abs(fp).max())


def _masked_attention_ir(mask: str):
    """Self-attention with a mask as tf2onnx writes Keras' ``where(mask, scores, float32 min)``: two products
    with the mask cast to float, added. ``mask="causal"`` comes from the input's shape; ``"padding"`` from its
    values (a comparison, as Keras derives a padding mask from token ids)."""
    import openvino.opset13 as ops

    x = ops.parameter([1, 6, 8], ov.Type.f32, name="x")
    scores = ops.matmul(x, x, False, True)
    if mask == "causal":
        r = ops.range(ops.constant(0, ov.Type.i64), ops.gather(ops.shape_of(x), ops.constant(1), ops.constant(0)),
                      ops.constant(1, ov.Type.i64), ov.Type.i64)
        valid = ops.greater_equal(ops.unsqueeze(r, ops.constant(1)), ops.unsqueeze(r, ops.constant(0)))
    else:  # the keys whose first feature is positive
        first = ops.gather(x, ops.constant([0]), ops.constant(2))  # (1, 6, 1)
        valid = ops.greater(ops.transpose(first, ops.constant([0, 2, 1])), ops.constant(np.float32(0)))
    keep = ops.multiply(ops.convert(valid, ov.Type.f32), scores)
    drop = ops.multiply(ops.constant(np.float32(-2.37e38)), ops.convert(ops.logical_not(valid), ov.Type.f32))
    out = ops.matmul(ops.softmax(ops.add(keep, drop), -1), x, False, False)
    return ov.Model([out], [x])


@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_a_mask_gets_no_quantizer(rng, mask):
    """A tensor computed from the input's shape (a causal mask) or through a comparison of its values (a padding
    mask), here at float32's minimum where it masks, is not a feature map: a quantizer over its range would round
    every attention score to zero, and the scores it is added to stay float (the sum does not run INT8)."""
    model = _masked_attention_ir(mask)
    x = rng.normal(size=(16, 1, 6, 8)).astype("float32")
    x[:, :, 1::2, 0] = -np.abs(x[:, :, 1::2, 0])  # some keys masked in every sample
    q = calibration.calibrate(model, list(x), subset_size=16)
    quantized = {op.input_value(0).get_node().get_friendly_name() for op in q.get_ordered_ops()
                 if op.get_type_name() == "FakeQuantize"}
    products = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Multiply"]
    assert len(products) == 2 and not quantized & set(products)
    core = ov.Core()
    ref = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x[0])[0]
    got = core.compile_model(q, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x[0])[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_a_half_precision_ir_is_quantized_in_its_own_type(rng):
    """An IR of a Keras mixed-precision model computes in f16 (f16 weights, f16 biases): its quantizers and
    shifted biases are built in f16 too (OpenVINO refuses an f32 FakeQuantize on an f16 convolution's weights)."""
    import openvino.opset13 as ops

    p = ops.parameter([-1, 3, 12, 12], ov.Type.f32)
    x = ops.convert(p, ov.Type.f16)
    for cin, cout in ((3, 8), (8, 8)):
        w = ops.constant(rng.normal(size=(cout, cin, 3, 3)).astype(np.float16))
        b = ops.constant(rng.uniform(-0.2, 0.2, (1, cout, 1, 1)).astype(np.float16))
        x = ops.relu(ops.add(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]), b))
    model = ov.Model([ops.convert(x, ov.Type.f32).output(0)], [p])
    data = rng.normal(size=(16, 3, 12, 12)).astype("float32")
    q = calibration.calibrate(model, data, subset_size=16, verbose=False)
    assert calibration.int8_layers(ov.Core().compile_model(q, "CPU")) == {"int8": 2, "total": 2}
    ref, got = _f32(model)({0: data})[0], _f32(q)({0: data})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
