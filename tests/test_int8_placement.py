"""A QAT model and a calibrated IR of the same float model quantize the same tensors.

One float model, two routes to INT8: (a) ``quantize_model``, one ``RangeInit`` step, ``model.export`` and the
export (the QAT quantizers carried as FakeQuantize); (b) ``model.export``, the export and post-training
``calibrate``. Both follow :mod:`tfcompress.int8_policy`; here the two IRs must agree on which inputs of
which ops (convolutions, fully connected layers, residual adds, gates, pooling, concatenations) read a
quantized tensor, and their compiled models on which layers run INT8 (all of them, but a transposed
convolution with a dynamic batch on a CPU without AVX-512, which OpenVINO runs in float whatever the IR).
"""

import warnings

import keras
import numpy as np
import openvino as ov
import pytest

from tfcompress.calibration import calibrate, int8_layers
from tfcompress.calibration.placement import normalization_ops
from tfcompress.export import export_saved_model
from tfcompress.quantization import RangeInit, quantize_model
from conftest import assert_int8_where_the_cpu_can, rel_error

# the ops whose quantized inputs are compared (Add / Multiply with a constant operand are biases and scales)
COMPARED = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul", "Add", "Multiply", "AvgPool",
            "ReduceMean", "MaxPool", "Concat"}
# ops a quantized tensor passes through unchanged in grid (layout, padding, max pooling, type conversion)
PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Pad", "MaxPool", "Convert", "StridedSlice"}


def _keras_ops_model():
    """keras.ops nodes (hard-swish, ``x + y``), depthwise, a squeeze-and-excitation gate, separable, pooling."""
    i = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(i)
    x = keras.layers.BatchNormalization()(x)
    x = x * keras.ops.relu6(x + 3.0) / 6.0
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = x + y
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    s = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    s = keras.layers.Conv2D(4, 1, activation="relu")(s)
    s = keras.layers.Conv2D(8, 1, activation="sigmoid")(s)
    x = x * s
    x = keras.layers.SeparableConv2D(8, 3, padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(i, keras.layers.Dense(10)(x))


def _sequential_flatten_model():
    """Sequential, average pooling, and a Dense reading a flattened feature map (tf2onnx puts a transpose
    between that tensor's quantize and dequantize)."""
    return keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.AveragePooling2D(2),
        keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(), keras.layers.Dense(10)])


def _concat_transpose_model():
    """Concatenation of two branches, a transposed convolution, a residual ``Add`` layer."""
    i = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(i)
    a = keras.layers.Conv2D(4, 1, activation="relu")(x)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.Add()([keras.layers.Concatenate()([a, b]), x])
    x = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(i, keras.layers.Dense(10)(x))


def _transformer_model():
    """Patches, a MultiHeadAttention block (its four projections; the products of two activations inside stay
    float on both routes) after a LayerNormalization (pre-LN), an EinsumDense feed-forward layer, residual adds
    and a LayerNormalization after them (post-LN). LayerNormalization stays float on both routes: calibration
    quantized the statistics and products its traced form is made of (ReduceMean, Multiply, Add), QAT leaves
    the layer float."""
    i = keras.Input((16, 16, 3))
    x = keras.layers.Reshape((16, 16))(keras.layers.Conv2D(16, 4, strides=4)(i))
    n = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.MultiHeadAttention(2, 8)(n, n)
    y = keras.layers.EinsumDense("abc,cd->abd", (None, 16), bias_axes="d", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(x + y))
    return keras.Model(i, keras.layers.Dense(10)(x))


MODELS = {"keras_ops": _keras_ops_model, "sequential_flatten": _sequential_flatten_model,
          "concat_transpose": _concat_transpose_model, "transformer": _transformer_model}


def _constant(out) -> bool:
    node = out.get_node()
    if node.get_type_name() == "Constant":
        return True
    return (node.get_type_name() in PASS_THROUGH | {"Multiply", "Subtract", "FakeQuantize"}
            and all(_constant(i.get_source_output()) for i in node.inputs()))


def _quantized(out) -> bool:
    """Whether ``out`` is a quantized tensor: a FakeQuantize, or the dequantization of an integer tensor,
    possibly seen through ops that keep the grid."""
    node = out.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Convert" and node.input(0).get_element_type().is_integral():
        return True
    if kind in PASS_THROUGH:
        return _quantized(node.input(0).get_source_output())
    if kind in ("Multiply", "Subtract") and _constant(node.input(1).get_source_output()):
        return _quantized(node.input(0).get_source_output())  # a dequantization's scale or zero point
    return False


def quantized_inputs(xml: str) -> list[tuple[str, tuple[str, ...]]]:
    """Per compared op, in topological order: its type and, per input, "q" (quantized), "f" (float) or "c"
    (constant: weights, biases, axes). The ops of a normalization are float on both routes and not compared:
    what they read is the tensor their input is (QAT quantizes a tensor once for all its readers)."""
    rows = []
    ops = ov.Core().read_model(xml).get_ordered_ops()
    normalization = normalization_ops(ops)
    for op in ops:
        if op.get_type_name() not in COMPARED or op.get_name() in normalization:
            continue
        sources = [i.get_source_output() for i in op.inputs()]
        flags = tuple("c" if _constant(s) else "q" if _quantized(s) else "f" for s in sources)
        if op.get_type_name() in ("Add", "Multiply") and "c" in flags:
            continue
        rows.append((op.get_type_name(), flags))
    return rows


def two_routes(model, x, tmp_path) -> tuple[str, str, keras.Model]:
    """The two INT8 IRs of ``model`` (the paths of the QAT one and the calibrated one, both calibrated or
    initialized on ``x``) and the quantization-aware Keras model the QAT IR is exported from."""
    model.export(str(tmp_path / "float"), verbose=False)
    export_saved_model(str(tmp_path / "float"), str(tmp_path / "float_ir"), verbose=False)
    ptq = str(tmp_path / "ptq.xml")
    ov.save_model(calibrate(str(tmp_path / "float_ir" / "model_fp32.xml"), x, verbose=False), ptq)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = quantize_model(model)
    q.compile(keras.optimizers.SGD(1e-5), "mse")
    q.fit(x, model.predict(x, verbose=0), batch_size=16, epochs=1, callbacks=[RangeInit(1)], verbose=0)
    q.export(str(tmp_path / "qat"), verbose=False)
    export_saved_model(str(tmp_path / "qat"), str(tmp_path / "qat_ir"), verbose=False)
    return str(tmp_path / "qat_ir" / "model_fp32.xml"), ptq, q


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qat_and_calibrated_ir_quantize_the_same_tensors(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x = np.random.default_rng(0).uniform(0, 1, (16, 16, 16, 3)).astype("float32")
    qat, ptq, _ = two_routes(model, x, tmp_path)

    assert quantized_inputs(qat) == quantized_inputs(ptq)
    # calibration adds no quantizer for a normalization's ops alone
    ops = ov.Core().read_model(ptq).get_ordered_ops()
    normalization = normalization_ops(ops)
    assert not [op.get_friendly_name() for op in ops if op.get_type_name() == "FakeQuantize" and all(
        r.get_node().get_name() in normalization for r in op.output(0).get_target_inputs())]
    # every layer with weights reads a quantized input (a product of two activations, in attention, stays float)
    assert "f" not in {flag for op, flags in quantized_inputs(ptq) for flag in flags
                       if op not in ("Concat", "Multiply") and not (op == "MatMul" and "c" not in flags)}, \
        quantized_inputs(ptq)
    core = ov.Core()
    counts = [int8_layers(core.compile_model(p, "CPU")) for p in (qat, ptq)]
    assert counts[0] == counts[1], counts
    for p in (qat, ptq):
        assert_int8_where_the_cpu_can(core.compile_model(p, "CPU"))


# --- quantizers of signed tensors before a zero padding (MobileNetV3's strided depthwise convolutions after
# hard-swish, a causal Conv1D on a signed signal): small OpenVINO models, no Keras

def _seven_bit_weights(w: np.ndarray):
    """``w`` as int8 per output channel (axis 0) decompressed by Convert -> Multiply (a calibrated IR's form), on
    the 7-bit grid: exact also on CPUs whose INT8 kernels saturate."""
    import openvino.opset13 as ops

    scale = (np.abs(w.reshape(len(w), -1)).max(1) / 63).reshape((-1,) + (1,) * (w.ndim - 1))
    q = np.round(w / scale).astype(np.int8)
    return ops.multiply(ops.convert(ops.constant(q), "f32"), ops.constant(scale.astype(np.float32)))


def _padded_conv(x, kind: str, channels: int, quantized_weights: bool):
    """NHWC ``x`` -> zero Pad (bottom/right, as Keras' ZeroPadding2D before a strided convolution) -> NHWC-to-NCHW
    Transpose (what OpenVINO's TensorFlow and ONNX readers put before every convolution) -> stride-2 3x3
    depthwise or full convolution -> ReLU."""
    import openvino.opset13 as ops

    x = ops.pad(x, np.array([0, 0, 0, 0], np.int64), np.array([0, 1, 1, 0], np.int64), "constant", np.float32(0))
    x = ops.transpose(x, np.array([0, 3, 1, 2], np.int64))
    shape = (channels, 1, 1, 3, 3) if kind == "depthwise" else (channels, channels, 3, 3)
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    if quantized_weights:
        w = _seven_bit_weights(w)
    conv = ops.group_convolution if kind == "depthwise" else ops.convolution
    return ops.relu(conv(x, w, [2, 2], [0, 0], [0, 0], [1, 1]))


def _fq_before_pad(kind: str, low: float, high: float = 6.0, pad_value: float = 0.0, channels: int = 12):
    import openvino.opset13 as ops

    p = ops.parameter([1, 16, 16, channels], np.float32, name="x")
    lo, hi = np.float32(low), np.float32(high)
    x = ops.fake_quantize(p, lo, hi, lo, hi, 256)
    if pad_value:
        x = ops.pad(x, np.array([0, 1, 1, 0], np.int64), np.array([0, 0, 0, 0], np.int64), "constant",
                    np.float32(pad_value))
    return ov.Model([_padded_conv(x, kind, channels, True)], [p])


def _outputs(model, x):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]


# signed ranges: symmetric on the int8 grid (preset "performance") and asymmetric (preset "mixed"; -0.375 is
# hard-swish's minimum); unsigned: [0, 6]
SIGNED = {"symmetric": -6.0 * 128 / 127, "asymmetric": -0.375}


@pytest.mark.parametrize("kind", ["depthwise", "conv"])
@pytest.mark.parametrize("signed", sorted(SIGNED))
def test_signed_quantizer_goes_after_the_pad_and_the_convolution_runs_int8(kind, signed):
    from tfcompress.calibration.placement import quantize_after_signed_pads

    model = _fq_before_pad(kind, SIGNED[signed])
    x = np.random.default_rng(0).uniform(-1, 6, (1, 16, 16, 12)).astype(np.float32)
    before = _outputs(model, x)
    assert quantize_after_signed_pads(model) == 1
    pad = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Pad")
    assert pad.input(0).get_source_output().get_node().get_type_name() == "Parameter"
    assert [r.get_node().get_type_name() for r in pad.output(0).get_target_inputs()] == ["FakeQuantize"]
    # zero is on the grid: the same values (to float rounding: the convolution now runs on integers)
    assert rel_error(_outputs(model, x), before) < 1e-5
    assert int8_layers(ov.Core().compile_model(model, "CPU")) == {"int8": 1, "total": 1}
    assert quantize_after_signed_pads(model) == 0  # nothing left to move


@pytest.mark.parametrize("kind", ["depthwise", "conv"])
def test_unsigned_quantizer_stays_before_the_pad(kind):
    """Zero point 0: the Pad runs on the u8 tensor and the convolution in INT8 on every CPU."""
    from tfcompress.calibration.placement import quantize_after_signed_pads

    model = _fq_before_pad(kind, 0.0)
    assert quantize_after_signed_pads(model) == 0
    assert int8_layers(ov.Core().compile_model(model, "CPU")) == {"int8": 1, "total": 1}


def test_quantizers_that_do_not_commute_with_the_pad_stay():
    """A pad value other than zero, or a grid without zero on it: moving the quantizer would change values."""
    from tfcompress.calibration.placement import quantize_after_signed_pads

    assert quantize_after_signed_pads(_fq_before_pad("conv", -1.0, pad_value=0.5)) == 0
    assert quantize_after_signed_pads(_fq_before_pad("conv", -1.0, high=6.1234)) == 0  # 0 between two levels


def test_calibration_runs_padded_convolutions_on_signed_inputs_in_int8(tmp_path):
    """calibrate on a float model whose strided convolutions read signed tensors through zero pads and layout
    transposes (both presets: symmetric and asymmetric signed ranges): every convolution runs INT8."""
    import openvino.opset13 as ops

    p = ops.parameter([-1, 16, 16, 12], np.float32, name="x")
    y = _padded_conv(p, "depthwise", 12, False)  # reads the signed input
    y = ops.transpose(ops.subtract(y, np.float32(0.5)), np.array([0, 2, 3, 1], np.int64))  # signed again, NHWC
    ov.save_model(ov.Model([_padded_conv(y, "conv", 12, False)], [p]), tmp_path / "float.xml")
    model = ov.Core().read_model(tmp_path / "float.xml")  # an IR, as calibrate's callers give it
    x = np.random.default_rng(0).normal(size=(32, 16, 16, 12)).astype(np.float32)
    for preset in ("performance", "mixed"):
        q = calibrate(model, x, preset=preset, verbose=False)
        assert int8_layers(ov.Core().compile_model(q, "CPU")) == {"int8": 2, "total": 2}, preset
        pads = [op for op in q.get_ordered_ops() if op.get_type_name() == "Pad"]
        assert all(op.input(0).get_source_output().get_node().get_type_name() != "FakeQuantize" for op in pads)


def _pointwise(channels: int, strides, spatial=(32, 32), pads=0, kernel=1, quantized=True):
    """A float model: a 3x3 convolution, ReLU, then a pointwise (``kernel``) convolution with ``strides`` reading
    ``channels`` channels, with :func:`_seven_bit_weights` behind an unsigned per-tensor quantizer when
    ``quantized``."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(channels)
    rank = len(spatial)
    p = ops.parameter([-1, 3, *spatial], np.float32, name="x")
    x = ops.relu(ops.convolution(p, rng.normal(size=(channels, 3, *[3] * rank)).astype(np.float32),
                                 [1] * rank, [1] * rank, [1] * rank, [1] * rank))
    w = rng.normal(size=(16, channels, *[kernel] * rank)).astype(np.float32)
    if quantized:
        x = ops.fake_quantize(x, np.float32(0), np.float32(4), np.float32(0), np.float32(4), 256)
        w = _seven_bit_weights(w)
    y = ops.convolution(x, w, list(strides), [pads] * rank, [pads] * rank, [1] * rank)
    y.output(0).get_tensor().set_names({"y"})
    return ov.Model([y], [p])


def _assert_int8_and_same_as_one_thread(model, x, int8: dict) -> None:
    """The compiled ``model`` runs ``int8`` (:func:`int8_layers`) and returns on each of 5 calls what a one-thread
    compile of it returns."""
    one_thread = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1})({0: x})[0]
    compiled = ov.Core().compile_model(model, "CPU")
    assert int8_layers(compiled) == int8
    for _ in range(5):
        np.testing.assert_array_equal(compiled({0: x})[0], one_thread)


@pytest.mark.parametrize("channels, strides, spatial", [
    (8, (2, 2), (32, 32)), (24, (2, 2), (28, 28)), (40, (4, 4), (32, 32)), (8, (1, 2), (16, 32)), (8, (2,), (64,)),
    (24, (3, 3), (33, 33)),
])
def test_strided_pointwise_int8_convolutions_compute_the_same_on_every_call(channels, strides, spatial):
    """An INT8 1x1 convolution with a stride and an odd multiple of 8 input channels: on CPUs without AVX-512 the
    CPU plugin's kernel for it writes wrong values into some outputs when it runs on several threads, others on
    each call. The rewrite gives it stride 1 behind a StridedSlice: the same numbers in exact arithmetic (to
    float rounding), and the compiled model's outputs are those of one thread on every call, in INT8."""
    from tfcompress.calibration.placement import rewrite_for_cpu
    from tfcompress.export.ov_run import run_openvino

    model = _pointwise(channels, strides, spatial)
    x = np.random.default_rng(1).uniform(0, 1, (32, 3, *spatial)).astype(np.float32)
    exact = run_openvino(model, {"x": x}, exact=True)
    rewrite_for_cpu(model)
    model.validate_nodes_and_infer_types()
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("StridedSlice") == 1
    assert rel_error(run_openvino(model, {"x": x}, exact=True)["y"], exact["y"]) < 1e-6
    # the pointwise one runs INT8: the first convolution reads a float input
    _assert_int8_and_same_as_one_thread(model, x, {"int8": 1, "total": 2})


@pytest.mark.parametrize("kw", [dict(channels=16, strides=(2, 2)), dict(channels=12, strides=(2, 2)),
                                dict(channels=8, strides=(1, 1)), dict(channels=8, strides=(2, 2), kernel=3),
                                dict(channels=8, strides=(2, 2), pads=1),
                                dict(channels=8, strides=(2, 2), quantized=False),
                                dict(channels=8, strides=(2, 2), spatial=(32, 33))])
def test_other_convolutions_are_left_as_they_are(kw):
    """Only quantized, unpadded, strided 1x1 convolutions with an odd multiple of 8 input channels change, and
    only where each stride divides its input size (or the size is unknown): else the plugin runs another kernel."""
    from tfcompress.calibration.placement import slice_before_strided_pointwise

    assert slice_before_strided_pointwise(_pointwise(**kw)) == 0


def test_calibrated_irs_get_the_rewrite():
    """calibrate's INT8 model of a float model with such a convolution computes the same on every call."""
    model = _pointwise(8, (2, 2), quantized=False)
    x = np.random.default_rng(2).uniform(0, 1, (64, 3, 32, 32)).astype(np.float32)
    q = calibrate(model, x[:32], verbose=False)
    assert [op.get_type_name() for op in q.get_ordered_ops()].count("StridedSlice") == 1
    _assert_int8_and_same_as_one_thread(q, x, {"int8": 2, "total": 2})


def test_normalization_ops_are_normalizations_not_gates_or_context_adds():
    """A ReduceMean combined back with its own input is a normalization only when it centers the input or scales
    it by a second statistic (LayerNormalization's decomposition): a weightless gate ``x * sigmoid(mean(x))``
    and a global context added back ``x + mean(x)`` were taken for normalizations, which dropped the gate's and
    the add's quantizers that QAT keeps."""
    import openvino.opset13 as ops

    def graph(body):
        x = ops.parameter([-1, 6, 6, 16], np.float32, name="x")
        return ov.Model([body(x)], [x], "g").get_ordered_ops()

    def mean(x, axes=(-1,)):
        return ops.reduce_mean(x, np.int64(axes), keep_dims=True)

    def layer_norm(x):
        d = ops.subtract(x, mean(x))
        inv = ops.power(ops.add(mean(ops.multiply(d, d)), np.float32(1e-3)), np.float32(-0.5))
        return ops.add(ops.multiply(ops.multiply(d, inv), np.full(16, 0.5, np.float32)), np.float32(0.1))

    ln = graph(layer_norm)
    found = [op.get_type_name() for op in ln if op.get_name() in normalization_ops(ln)]
    assert found.count("ReduceMean") == 2 and "Subtract" in found, found
    dense = np.ones((16, 16), np.float32)
    for body in (lambda x: ops.multiply(x, ops.sigmoid(mean(x))),  # a gate without weights (CBAM-like)
                 lambda x: ops.multiply(x, ops.sigmoid(mean(x, (1, 2)))),  # squeeze-and-excitation without weights
                 lambda x: ops.multiply(x, ops.sigmoid(ops.matmul(mean(x, (1, 2)), dense, False, False))),  # SE
                 lambda x: ops.add(x, mean(x, (1, 2))),  # global context added back
                 lambda x: ops.matmul(mean(x, (1, 2)), dense, False, False)):  # a pooling read by a dense layer
        assert normalization_ops(graph(body)) == set()
