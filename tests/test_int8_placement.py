"""A QAT model and a calibrated IR of the same float model quantize the same tensors.

One float model, two routes to INT8: (a) ``quantize_model``, one ``RangeInit`` step, ``model.export`` and the
export (the QAT quantizers carried as FakeQuantize); (b) ``model.export``, the export and post-training
``calibrate``. Both follow :mod:`tfcompress.int8_policy`; here the two IRs must agree on which inputs of
which ops (convolutions, fully connected layers, residual adds, gates, pooling, concatenations) read a
quantized tensor, and their compiled models on which layers run INT8 (all of them).
"""

import warnings

import keras
import numpy as np
import openvino as ov
import pytest

from tfcompress.calibration import calibrate, int8_layers
from tfcompress.export import export_saved_model
from tfcompress.quantization import RangeInit, quantize_model

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


MODELS = {"keras_ops": _keras_ops_model, "sequential_flatten": _sequential_flatten_model,
          "concat_transpose": _concat_transpose_model}


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
    (constant: weights, biases, axes)."""
    rows = []
    for op in ov.Core().read_model(xml).get_ordered_ops():
        if op.get_type_name() not in COMPARED:
            continue
        sources = [i.get_source_output() for i in op.inputs()]
        flags = tuple("c" if _constant(s) else "q" if _quantized(s) else "f" for s in sources)
        if op.get_type_name() in ("Add", "Multiply") and "c" in flags:
            continue
        rows.append((op.get_type_name(), flags))
    return rows


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qat_and_calibrated_ir_quantize_the_same_tensors(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x = np.random.default_rng(0).uniform(0, 1, (16, 16, 16, 3)).astype("float32")

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
    qat = str(tmp_path / "qat_ir" / "model_fp32.xml")

    assert quantized_inputs(qat) == quantized_inputs(ptq)
    assert "f" not in {flag for _, flags in quantized_inputs(ptq) for flag in flags
                       if _ not in ("Concat", "Multiply")}, quantized_inputs(ptq)
    core = ov.Core()
    counts = [int8_layers(core.compile_model(p, "CPU")) for p in (qat, ptq)]
    assert counts[0] == counts[1] and counts[0]["int8"] == counts[0]["total"] > 0, counts
