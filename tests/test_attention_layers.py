"""Keras's ``Attention`` and ``AdditiveAttention`` through the channel engine: the query and key channels are
summed together (one group), the value's channels pass to the output; pruning, both strippers and QAT.

Every strip is checked against the masked Keras model's outputs (relative max error < 1e-5)."""

import warnings

import keras
import numpy as np
import openvino as ov
import pytest
import tensorflow as tf
from keras import layers as L

import tfcompress
from tfcompress.export import export_saved_model
from tfcompress.quantization import quantize_model
from tfcompress.stripping.savedmodel_strip import freeze_saved_model, strip_saved_model
from conftest import rel_error

TOL = 1e-5


def _inputs(rng, n=3):
    return [rng.uniform(-1, 1, (n, 6, 5)).astype("float32"), rng.uniform(-1, 1, (n, 9, 7)).astype("float32")]


def _model(rng, variant: str, call_kw: dict | None = None):
    """Query from a Conv1D over one sequence, value (and key) from Dense layers over another: query 8 channels,
    value 12 (8 when it is also the key)."""
    qi, vi = keras.Input((6, 5), name="qi"), keras.Input((9, 7), name="vi")
    q = L.Conv1D(8, 3, padding="same", activation="relu", name="q")(qi)
    layer = {
        "dot": lambda: L.Attention(name="att"),
        "scaled": lambda: L.Attention(use_scale=True, name="att"),
        "concat": lambda: L.Attention(score_mode="concat", use_scale=True, name="att"),
        "additive": lambda: L.AdditiveAttention(name="att"),
        "no_key": lambda: L.Attention(name="att"),
    }[variant]()
    if variant == "no_key":
        inputs = [q, L.Dense(8, name="v")(vi)]
    else:
        inputs = [q, L.Dense(12, name="v")(vi), L.Dense(8, activation="tanh", name="k")(vi)]
    a = layer(inputs, **(call_kw or {}))
    model = keras.Model([qi, vi], L.Dense(3, name="head")(L.GlobalAveragePooling1D()(a)))
    for w in model.weights:  # biases, scales and AdditiveAttention's scale vector away from their initial values
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    return model


def _zero(model, rng, groups=None):
    for g in tfcompress.channel_groups(model) if groups is None else groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, g.size // 4, replace=False))


def _widths(model, names):
    return {n: model.get_layer(n).output.shape[-1] for n in names}


VARIANTS = ["dot", "scaled", "concat", "additive", "no_key"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_and_key_are_one_group_and_strip_exactly(variant, rng):
    model = _model(rng, variant)
    groups = {g.layers: g.size for g in tfcompress.channel_groups(model)}
    if variant == "no_key":  # the value is the key: query, key and output are one group
        assert groups == {("q", "v"): 8}
    else:
        assert groups == {("q", "k"): 8, ("v",): 12}
    _zero(model, rng)
    x = _inputs(rng)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    expected = {"q": 6, "v": 6} if variant == "no_key" else {"q": 6, "v": 9, "k": 6}
    assert _widths(stripped, list(expected)) == expected
    if variant == "additive":  # its learned scale is a vector over the query/key channels
        assert stripped.get_layer("att").scale.shape == (6,)


def test_flops_count_scores_and_weighted_sum(rng):
    """Per example: q 6 x 3 x 5 x 8, v 9 x 7 x 12, k 9 x 7 x 8, the scores 6 x 9 x 8 and the weighted sum
    6 x 9 x 12, the head 12 x 3; tanh(q + k) scores have no multiply-accumulates."""
    dense = 6 * 3 * 5 * 8 + 9 * 7 * 12 + 9 * 7 * 8 + 12 * 3
    assert tfcompress.count_flops(_model(rng, "dot")) == 2 * (dense + 6 * 9 * (8 + 12))
    assert tfcompress.count_flops(_model(rng, "additive")) == 2 * (dense + 6 * 9 * 12)


def test_a_channel_zero_in_the_query_only_stays(rng):
    """A channel adds nothing to q . k only where both hold 0 (a nonzero key channel times a zero query channel
    is 0 too, but the rule asks both): zeroing it in the query alone removes nothing."""
    model = _model(rng, "dot")
    q = model.get_layer("q")
    kernel, bias = (w.numpy() for w in q.weights)
    kernel[..., :2], bias[:2] = 0.0, 0.0
    q.set_weights([kernel, bias])
    stripped = tfcompress.strip(model)
    assert _widths(stripped, ["q", "k"]) == {"q": 8, "k": 8}


def test_masks_causal_mask_dropout_and_scores_leave_the_channel_rule(rng):
    """Masks (explicit tensors, causal) only say which positions count, dropout acts in training only and the
    attention scores output is over positions: the groups are those of the plain layer, the strip exact."""
    qi, vi = keras.Input((6, 5), name="qi"), keras.Input((9, 7), name="vi")
    qm, vm = keras.Input((6,), dtype="bool", name="qm"), keras.Input((9,), dtype="bool", name="vm")
    q = L.Conv1D(8, 3, padding="same", name="q")(qi)
    v, k = L.Dense(12, name="v")(vi), L.Dense(8, name="k")(vi)
    a, scores = L.Attention(dropout=0.3, name="att")([q, v, k], mask=[qm, vm], use_causal_mask=True,
                                                    return_attention_scores=True)
    outs = [L.Dense(3, name="head")(keras.ops.mean(a, axis=1)), L.Dense(2, name="from_scores")(L.Flatten()(scores))]
    model = keras.Model([qi, vi, qm, vm], outs)
    for w in model.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))
    assert {g.layers: g.size for g in tfcompress.channel_groups(model)} == {("q", "k"): 8, ("v",): 12}
    _zero(model, rng)
    x = _inputs(rng) + [rng.uniform(size=(3, 6)) < 0.7, np.arange(9) < rng.integers(3, 9, (3, 1))]
    stripped = tfcompress.strip(model)
    assert all(rel_error(got, ref) < TOL for got, ref in zip(stripped(x), model(x)))
    assert _widths(stripped, ["q", "v", "k"]) == {"q": 6, "v": 9, "k": 6}


def _export_and_strip(model, tmp_path):
    model.export(str(tmp_path / "src"), verbose=False)
    return strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))


def _layer_channels(result, name):
    (row,) = [r for r in result.layers if f"/{name}_1/" in r["name"] or f"/{name}/" in r["name"]]
    return row["channels_after"]


@pytest.mark.parametrize("variant", ["dot", "scaled", "additive", "no_key"])
def test_savedmodel_stripper_removes_what_keras_removes(variant, rng, tmp_path):
    """Exported, the layer is a BatchMatMulV2 of the query and the transposed key (dot) or tanh(q + k) summed
    over the channels (additive), a Softmax, and a BatchMatMulV2 of the weights and the value."""
    model = _model(rng, variant)
    _zero(model, rng)
    result = _export_and_strip(model, tmp_path)
    ops = {n.op for n in freeze_saved_model(str(tmp_path / "src")).graph_def.node}
    assert "BatchMatMulV2" in ops and "Softmax" in ops
    stripped = tfcompress.strip(model)
    expected = {"q": 6, "v": 6} if variant == "no_key" else {"q": 6, "v": 9, "k": 6}
    assert {n: _layer_channels(result, n) for n in expected} == _widths(stripped, list(expected)) == expected
    x = _inputs(rng)
    sig = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"]
    (out,) = sig(qi=tf.constant(x[0]), vi=tf.constant(x[1])).values()
    assert rel_error(out, model(x)) < TOL


@pytest.mark.parametrize("adjoint, after", [((False, True), {"a": 6, "b": 6}), ((True, False), {"a": 8, "b": 6}),
                                           ((False, False), {"a": 8, "b": 6})])
def test_matmul_of_two_tensors_sums_channels_only_against_channels(adjoint, after, rng, tmp_path):
    """``a @ b`` written by hand (8 positions, 8 channels): with ``b`` adjoint the two channel axes are summed
    together (their zeroed channels go); an adjoint ``a`` moves its channels onto the output's rows, and a plain
    ``a @ b`` sums ``a``'s channels against ``b``'s positions: ``a`` keeps them, while ``b``'s channels pass to
    the output's channel axis (the Dense after the Flatten reads them: its rows go)."""
    adj_a, adj_b = adjoint
    inp = keras.Input((8, 6), name="x")
    a = L.Dense(8, name="a")(inp)
    b = L.Dense(8, name="b")(inp)
    prod = L.Lambda(lambda t: tf.linalg.matmul(t[0], t[1], adjoint_a=adj_a, adjoint_b=adj_b))([a, b])
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(prod)))
    for layer in (model.get_layer("a"), model.get_layer("b")):  # the same two channels zeroed in both
        kernel, bias = (w.numpy() for w in layer.weights)
        kernel[:, :2], bias[:2] = 0.0, 0.0
        bias[2:] = rng.uniform(-0.5, 0.5, 6)
        layer.set_weights([kernel, bias])
    result = _export_and_strip(model, tmp_path)
    assert {n: _layer_channels(result, n) for n in after} == after
    x = rng.uniform(-1, 1, (3, 8, 6)).astype("float32")
    sig = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"]
    (out,) = sig(x=tf.constant(x)).values()
    assert rel_error(out, model(x)) < TOL


def test_qat_model_with_attention_trains_and_exports(rng, tmp_path):
    """QAT quantizes the producers around the attention layer (the layer itself has no twin and stays float,
    its query and key producers still one group); the QAT model exports to an OpenVINO IR that computes what
    Keras does."""
    model = _model(rng, "additive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the attention layer stays float
        q = quantize_model(model)
    assert {g.layers: g.size for g in tfcompress.channel_groups(q)} == {("q", "k"): 8, ("v",): 12}
    x = _inputs(rng, 32)
    q.compile("adam", "mse")
    q.fit(x, rng.normal(size=(32, 3)), epochs=1, batch_size=16, verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), verbose=False)
    compiled = ov.Core().compile_model(str(tmp_path / "out" / "model_fp32.xml"), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({"qi": x[0], "vi": x[1]})[compiled.outputs[0]]
    assert rel_error(got, q(x)) < 1e-3  # fake-quant grids: a rounding flip moves an output by a step
