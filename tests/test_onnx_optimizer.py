"""The export's ONNX optimizer passes (tf2onnx's, its transpose pass in linear time) against tf2onnx's own.

A quantization-aware network with separable convolutions, residual adds, a concatenation and pooling is
converted by tf2onnx twice, once optimized by tf2onnx's default passes and once by ours: the two ONNX models
must compute the same function (both run by OpenVINO at f32), ours may keep no more
Transposes than tf2onnx's, and its transpose pass must visit a number of nodes that grows with the graph, not
with the graph times the transposes it moves (what made exports of large models take minutes).
"""

import copy
import warnings

import keras
import numpy as np
import onnx
import pytest
from keras import layers as L

from tfcompress.export import convert
from tfcompress.export.onnx_optimizer import onnx_optimizer_passes
from tfcompress.quantization import quantize_model


def _network(blocks: int) -> keras.Model:
    x = inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    for i in range(blocks):
        y = L.SeparableConv2D(8, 3, padding="same")(x)
        y = L.BatchNormalization()(y)
        y = L.ReLU()(y)
        y = L.DepthwiseConv2D(3, padding="same")(y)
        x = x + L.Conv2D(8, 1)(y) if i % 2 else L.Conv2D(8, 1)(L.Concatenate()([x, y]))
    x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(4)(x))


@pytest.fixture(scope="module")
def tf2onnx_graph(tmp_path_factory):
    """The tf2onnx graph (before its ONNX passes) of a quantized ``_network``, and check inputs."""
    keras.utils.set_random_seed(0)
    model = _network(6)
    model(np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype("float32"), training=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = quantize_model(model)
    x = np.random.default_rng(1).standard_normal((4, 16, 16, 3)).astype("float32")
    q(x, training=True)  # ranges from a batch
    sm = str(tmp_path_factory.mktemp("onnx_optimizer") / "sm")
    q.export(sm, verbose=False)
    frozen = convert.freeze_for_export(sm)
    inputs, outputs = list(frozen.inputs.values()), list(frozen.outputs.values())
    return convert.tf2onnx_graph(convert.prepare_for_tf2onnx(frozen.graph_def), inputs, outputs), {inputs[0]: x}


def _optimize(graph, passes, counts: dict, monkeypatch):
    """``graph`` (copied) through ``optimize_graph`` with ``passes`` (None: tf2onnx's own); counts the nodes
    the transpose pass examines and the whole-graph sorts of the run."""
    from tf2onnx import optimizer
    from tf2onnx.graph import Graph
    from tf2onnx.optimizer import transpose_optimizer as tp

    is_transpose, sort = tp.is_transpose, Graph.topological_sort

    def counting_is_transpose(node):
        counts["examined"] += 1
        return is_transpose(node)

    def counting_sort(self, ops):
        counts["sorts"] += 1
        return sort(self, ops)

    monkeypatch.setattr(tp, "is_transpose", counting_is_transpose)
    monkeypatch.setattr(Graph, "topological_sort", counting_sort)
    try:
        return optimizer.optimize_graph(copy.deepcopy(graph), catch_errors=False, optimizers=passes)
    finally:
        monkeypatch.undo()


def test_our_passes_compute_the_same_model_in_linear_work(tf2onnx_graph, tmp_path, monkeypatch):
    graph, x = tf2onnx_graph
    nodes = len(graph.get_nodes())
    transposes = sum(n.type == "Transpose" for n in graph.get_nodes())
    assert transposes >= 20  # the test needs transposes to move

    stock, ours = {"examined": 0, "sorts": 0}, {"examined": 0, "sorts": 0}
    results = {}
    for name, passes, counts in (("stock", None, stock), ("ours", onnx_optimizer_passes(), ours)):
        optimized = _optimize(graph, passes, counts, monkeypatch)
        model = optimized.make_model(name)
        convert.rejoin_quantize_dequantize(model)
        convert.raise_quantize_above_reshapes(model)
        path = str(tmp_path / f"{name}.onnx")
        onnx.save_model(model, path)
        results[name] = (model, convert.run_onnx(path, x))

    (stock_model, stock_out), (our_model, our_out) = results["stock"], results["ours"]
    for key in stock_out:
        np.testing.assert_allclose(our_out[key], stock_out[key], rtol=1e-5, atol=1e-5 * np.abs(stock_out[key]).max())

    def count(model, op):
        return sum(n.op_type == op for n in model.graph.node)

    assert count(our_model, "Transpose") <= count(stock_model, "Transpose")
    assert count(our_model, "Conv") == count(stock_model, "Conv")
    # tf2onnx's optimizer runs its passes until none changes the graph (a few rounds): each round our
    # transpose pass scans the graph a few times; tf2onnx's scans it again after every transpose it moves
    assert ours["examined"] <= 16 * nodes < stock["examined"], (ours, stock, nodes)
    assert ours["sorts"] < stock["sorts"], (ours, stock)
