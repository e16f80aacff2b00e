"""A normalization by a tensor's own statistics is float on both INT8 routes, and a gate is not one.

RMSNormalization, UnitNormalization, ``keras.ops.rms_normalization``, LayerNormalization over a convolution's
channels and normalizations written with ``keras.ops`` (mean, var, square, rsqrt): the calibrated IR
(post-training) and the QAT IR put no FakeQuantize inside them (only before the layers with weights that read
them, which run INT8), and both compute what the Keras model does. A weightless gate ``x * sigmoid(mean(x))``
keeps its quantizers on both routes. The rule itself (:func:`tfcompress.int8_policy.normalizations`) is
checked on hand-built op lists first.
"""

import keras
import numpy as np
import openvino as ov
import pytest

from tfcompress import int8_policy as policy
from tfcompress.calibration.placement import normalization_ops
from conftest import assert_int8_where_the_cpu_can
from test_int8_placement import PASS_THROUGH, two_routes

# runtime layers with weights: the only readers of a quantized tensor in the normalization models below
WEIGHTED = {"MatMul", "Convolution", "GroupConvolution"}


def _ops(*rows) -> list:
    """StatisticsOps from ``(key, role, inputs...)`` rows (an input None is a constant)."""
    return [policy.StatisticsOp(key, role, tuple(inputs)) for key, role, *inputs in rows]


def test_the_rule_finds_normalizations_by_what_they_compute():
    x = ("x", "")
    layer_norm = _ops(x, ("m", "reduce", "x"), ("d", "subtract", "x", "m"), ("dd", "multiply", "d", "d"),
                      ("v", "reduce", "dd"), ("e", "add", "v", None), ("r", "arithmetic", "e"),
                      ("n", "multiply", "d", "r"), ("g", "multiply", "n", None), ("out", "", "g"))
    assert policy.normalizations(layer_norm) == {"m", "d", "dd", "v", "n"}
    rms = _ops(x, ("sq", "square", "x", None), ("v", "reduce", "sq"), ("e", "add", "v", None),
               ("s", "arithmetic", "e"), ("n", "divide", "x", "s"), ("out", "", "n"))
    assert policy.normalizations(rms) == {"sq", "v", "n"}
    keras_ops = _ops(x, ("m", "reduce", "x"), ("v", "moment", "x"), ("d", "subtract", "x", "m"),
                     ("e", "add", "v", None), ("r", "arithmetic", "e"), ("n", "multiply", "d", "r"))
    assert policy.normalizations(keras_ops) == {"m", "v", "d", "n"}
    unit = _ops(x, ("xx", "multiply", "x", "x"), ("s", "reduce", "xx"), ("r", "arithmetic", "s"),
                ("c", "arithmetic", "r"), ("n", "multiply", "x", "c"))
    assert policy.normalizations(unit) == {"xx", "s", "n"}


@pytest.mark.parametrize("rows", [
    [("m", "reduce", "x"), ("g", "", "m"), ("y", "multiply", "x", "g")],  # x * sigmoid(mean(x)): a gate
    [("m", "reduce", "x"), ("y", "multiply", "x", "m")],  # x * mean(x): a scaling, not centered, no square
    [("m", "reduce", "x"), ("y", "add", "x", "m")],  # x + mean(x): a global context added back
    [("xx", "multiply", "x", "x"), ("m", "reduce", "xx"), ("s", "", "m"), ("y", "multiply", "x", "s")],  # energy gate
    [("m", "reduce", "x"), ("w", "", "m"), ("s", "", "w"), ("y", "multiply", "x", "s")],  # squeeze-and-excite
    [("q", "", "x"), ("a", "", "q"), ("y", "", "a", "x")],  # attention: softmax, a product of two activations
    [("m", "reduce", "x"), ("w", "", "m")],  # a pooling read by a dense layer
])
def test_the_rule_takes_no_gate_or_context_for_a_normalization(rows):
    assert policy.normalizations(_ops(("x", ""), *rows)) == set()


def _keras_ops_layer_norm(x, eps=1e-3):
    mean = keras.ops.mean(x, axis=-1, keepdims=True)
    return (x - mean) * keras.ops.rsqrt(keras.ops.var(x, axis=-1, keepdims=True) + eps) * 1.5 + 0.1


def _sequence_model():
    """Dense layers, each reading a different normalization of the one before over the features."""
    i = keras.Input((8, 16))
    x = keras.layers.Dense(16)(i)
    x = keras.layers.Dense(16, activation="relu")(keras.layers.RMSNormalization()(x))
    x = keras.layers.Dense(16)(keras.layers.UnitNormalization()(x))
    x = keras.layers.Dense(16)(keras.ops.rms_normalization(x, scale=1.0))
    x = keras.layers.Dense(16)(_keras_ops_layer_norm(x))
    x = x / keras.ops.sqrt(keras.ops.mean(keras.ops.square(x), axis=-1, keepdims=True) + 1e-6)
    return keras.Model(i, keras.layers.Dense(4)(keras.layers.Flatten()(x)))


def _convnext_model():
    """ConvNeXt-style: a depthwise convolution, LayerNormalization over its channels, Dense(4x) -> GELU ->
    Dense, then a normalization over the channels written with keras.ops before a pointwise convolution."""
    i = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(16, 4, strides=4)(i)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Dense(64)(keras.layers.LayerNormalization(epsilon=1e-6)(x))
    x = keras.layers.Dense(16)(keras.activations.gelu(x, approximate=True))
    x = keras.layers.Conv2D(8, 1)(_keras_ops_layer_norm(x, 1e-6))
    return keras.Model(i, keras.layers.Dense(4)(keras.layers.Flatten()(x)))


def _gate_model():
    """A weightless spatial gate ``x * sigmoid(mean(x))`` between two convolutions: not a normalization."""
    i = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(i)
    x = x * keras.ops.sigmoid(keras.ops.mean(x, axis=-1, keepdims=True))
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    return keras.Model(i, keras.layers.Dense(4)(keras.layers.Flatten()(x)))


def _readers(output) -> set[str]:
    """The op types reading ``output``, seen through ops that keep a quantized tensor's grid."""
    found = set()
    for r in output.get_target_inputs():
        node = r.get_node()
        if node.get_type_name() in PASS_THROUGH | {"ShapeOf"}:
            found |= _readers(node.output(0)) if node.get_type_name() != "ShapeOf" else set()
        else:
            found.add(node.get_type_name())
    return found


def _activation_quantizers(model) -> list:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
            and op.input(0).get_source_output().get_node().get_type_name() not in ("Constant", "Convert")]


def _rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


# the INT8 IRs' outputs against the Keras model each comes from, relative RMS error: measured 0.025 and 0.04 for the
# calibrated IRs against the float model, below 1e-6 for the QAT IRs against the quantization-aware model
TOLERANCE = 0.1


@pytest.mark.parametrize("build, shape", [(_sequence_model, (8, 16)), (_convnext_model, (16, 16, 3))])
def test_normalizations_are_float_on_both_routes(build, shape, tmp_path):
    model = build()
    x = np.random.default_rng(0).normal(size=(32, *shape)).astype("float32")
    qat, ptq, qmodel = two_routes(model, x[:16], tmp_path)
    core = ov.Core()
    for path, reference in ((ptq, model), (qat, qmodel)):
        ir = core.read_model(path)
        assert normalization_ops(ir.get_ordered_ops())
        # every activation quantizer is read by layers with weights only: none inside a normalization
        assert [_readers(fq.output(0)) for fq in _activation_quantizers(ir)
                if not _readers(fq.output(0)) <= WEIGHTED] == [], path
        compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        assert_int8_where_the_cpu_can(compiled)  # the normalizations' readers still run INT8
        error = _rel_rms(compiled({0: x[16:]})[0], reference.predict(x[16:], verbose=0))
        assert error < TOLERANCE, (path, error)


def test_a_weightless_gate_keeps_its_quantizers_on_both_routes(tmp_path):
    model = _gate_model()
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    for path in two_routes(model, x, tmp_path)[:2]:
        ir = ov.Core().read_model(path)
        gate = next(op for op in ir.get_ordered_ops() if op.get_type_name() == "Multiply"
                    and not any(i.get_source_output().get_node().get_type_name() in ("Constant", "Convert")
                                for i in op.inputs()))
        assert [_producer(i.get_source_output()) for i in gate.inputs()] == ["FakeQuantize"] * 2, path


def _producer(output) -> str:
    """The type of the op computing ``output``, seen through ops that keep a quantized tensor's grid."""
    node = output.get_node()
    if node.get_type_name() in PASS_THROUGH:
        return _producer(node.input(0).get_source_output())
    return node.get_type_name()
