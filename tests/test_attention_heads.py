"""MultiHeadAttention's heads as a channel group: zeroed, pruned in ``fit`` and stripped to a layer with fewer
``num_heads``; every strip is checked against the zeroed Keras model (relative max error < 1e-5)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import tfcompress
from tfcompress.pruning import FilterPruning
from tfcompress.quantization import quantize_model
from tfcompress.stripping.savedmodel_strip import strip_saved_model
from conftest import rel_error

TOL = 1e-5


def _randomize(model, rng):
    """Every weight (biases too) away from its initial value."""
    for w in model.weights:
        w.assign(rng.normal(0, 0.5, w.shape).astype("float32"))


def _attention_model(rng, variant: str):
    """An attention layer of 4 heads between Dense layers: query from one sequence (10 x 6), value and key from
    the same one (self) or from another (9 x 5, cross), with a residual add when the output is the query's width."""
    qi = keras.Input((10, 6), name="qi")
    vi = keras.Input((9, 5), name="vi")
    mask = keras.Input((10, 9), dtype="bool", name="mask")
    q = L.Dense(16, name="q")(qi)
    kw = dict(num_heads=4, key_dim=5, name="mha")
    kw.update({"no_bias": dict(use_bias=False), "value_dim": dict(value_dim=3),
               "output_shape": dict(output_shape=7)}.get(variant, {}))
    mha = L.MultiHeadAttention(**kw)
    inputs = [qi]
    if variant == "cross":
        a = mha(q, L.Dense(12, name="v")(vi), key=L.Dense(8, name="k")(vi))
        inputs.append(vi)
    elif variant == "mask":
        v = L.Dense(12, name="v")(vi)
        a = mha(q, v, attention_mask=mask)
        inputs += [vi, mask]
    else:
        a = mha(q, q)
    x = a if variant == "output_shape" else L.Add()([q, a])
    model = keras.Model(inputs, L.Dense(3, name="out")(L.GlobalAveragePooling1D()(x)))
    _randomize(model, rng)
    return model


def _inputs(model, rng, n=3):
    out = []
    for t in model.inputs:
        shape = (n, *t.shape[1:])
        out.append(rng.uniform(size=shape) > 0.3 if t.dtype == "bool" else rng.normal(size=shape).astype("float32"))
    return out


def _heads(model, name="mha"):
    (g,) = [g for g in tfcompress.channel_groups(model) if g.layers == (f"{name}:heads",)]
    return g


VARIANTS = ["self", "cross", "no_bias", "value_dim", "output_shape", "mask"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_heads_are_zeroed_and_stripped_exactly(variant, rng, tmp_path):
    model = _attention_model(rng, variant)
    g = _heads(model)
    assert g.size == 4 and not g.reason
    full = tfcompress.count_flops(model)
    tfcompress.zero_channels(model, g, [0, 2])
    x = _inputs(model, rng)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    mha, old = stripped.get_layer("mha"), model.get_layer("mha")
    assert mha.num_heads == 2
    for new_dense, old_dense in [(mha.query_dense, old.query_dense), (mha.key_dense, old.key_dense),
                                 (mha.value_dense, old.value_dense)]:
        assert new_dense.kernel.shape[1] == 2 and new_dense.kernel.shape[0] == old_dense.kernel.shape[0]
        np.testing.assert_array_equal(new_dense.kernel.numpy(), old_dense.kernel.numpy()[:, [1, 3]])
    np.testing.assert_array_equal(mha.output_dense.kernel.numpy(), old.output_dense.kernel.numpy()[[1, 3]])
    # the projections and the scores of two heads are gone (the Dense layers around are unchanged)
    qpos, kpos, kd, vd = 10, (9 if variant in ("cross", "mask") else 10), 5, old.value_dense.kernel.shape[-1]
    width = {"cross": (16, 12, 8), "mask": (16, 12, 12)}.get(variant, (16, 16, 16))
    per_head = qpos * width[0] * kd + kpos * width[2] * kd + kpos * width[1] * vd + qpos * kpos * (kd + vd)
    per_head += qpos * vd * old.output_dense.kernel.shape[-1]
    assert full - tfcompress.count_flops(stripped) == 2 * 2 * per_head
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x), stripped(x))


def _set_head(dense, head, kernel=None, bias=None):
    k, b = dense.kernel.numpy(), dense.bias.numpy()
    if kernel is not None:
        k[:, head] = kernel
    if bias is not None:
        b[head] = bias
    dense.kernel.assign(k)
    dense.bias.assign(b)


def test_a_head_that_adds_only_its_value_bias_is_folded(rng):
    """A head whose value columns are zero outputs its value bias at every position (the attention weights sum
    to one), whatever its query and key: stripping folds it into the output bias. A head with zero query and
    key columns still averages its values: it stays."""
    model = _attention_model(rng, "cross")
    mha = model.get_layer("mha")
    _set_head(mha.value_dense, 1, kernel=0.0)  # its value bias stays, and its query and key columns
    _set_head(mha.query_dense, 3, kernel=0.0, bias=0.0)
    _set_head(mha.key_dense, 3, kernel=0.0, bias=0.0)
    x = _inputs(model, rng)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.get_layer("mha").num_heads == 3
    np.testing.assert_array_equal(stripped.get_layer("mha").value_dense.bias.numpy(),
                                  mha.value_dense.bias.numpy()[[0, 2, 3]])
    assert not np.allclose(stripped.get_layer("mha").output_dense.bias.numpy(), mha.output_dense.bias.numpy())


def test_strip_keeps_at_least_one_head(rng):
    model = _attention_model(rng, "self")
    tfcompress.zero_channels(model, _heads(model), [0, 1, 2, 3])
    x = _inputs(model, rng)
    stripped = tfcompress.strip(model)
    assert stripped.get_layer("mha").num_heads == 1 and rel_error(stripped(x), model(x)) < TOL


def _vit(rng, blocks=2, heads=4, dim=32):
    """A small ViT: 4x4 patches of a 16x16 image embedded by a convolution, pre-norm encoder blocks
    (self-attention and a GELU MLP, each added to the residual stream), a LayerNormalization and a pooled head."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Reshape((16, dim), name="tokens")(L.Conv2D(dim, 4, strides=4, name="patch")(inp))
    for b in range(blocks):
        y = L.LayerNormalization(name=f"b{b}_ln1")(x)
        x = L.Add(name=f"b{b}_add1")([x, L.MultiHeadAttention(heads, dim // heads, name=f"b{b}_mha")(y, y)])
        y = L.Dense(2 * dim, activation="gelu", name=f"b{b}_fc1")(L.LayerNormalization(name=f"b{b}_ln2")(x))
        x = L.Add(name=f"b{b}_add2")([x, L.Dense(dim, name=f"b{b}_fc2")(y)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(name="ln")(x))
    return keras.Model(inp, L.Dense(10, name="logits")(x))


def test_filter_pruning_removes_heads_in_fit_and_strip_is_exact(rng, tmp_path):
    model = _vit(rng)
    x = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, 64)
    model.compile("adam", "sparse_categorical_crossentropy")
    pruner = FilterPruning(target=0.5, criterion="l2", pruning_epochs=2)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[pruner], verbose=0)
    for b in range(2):
        mha = model.get_layer(f"b{b}_mha")
        zero = [not any(np.any(d.kernel.numpy()[:, h]) for d in (mha.query_dense, mha.key_dense, mha.value_dense))
                and not np.any(mha.output_dense.kernel.numpy()[h]) for h in range(4)]
        assert sum(zero) == 2, zero  # half of the heads, whole
    stripped = tfcompress.strip(model)
    assert [stripped.get_layer(f"b{b}_mha").num_heads for b in range(2)] == [2, 2]
    assert rel_error(stripped(x[:8]), model(x[:8])) < TOL
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x[:8]), stripped(x[:8]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # attention and normalizations stay float
        q = quantize_model(model)
    q_stripped = tfcompress.strip(q)
    assert [q_stripped.get_layer(f"b{b}_mha").num_heads for b in range(2)] == [2, 2]
    assert rel_error(q_stripped(x[:8]), q(x[:8])) < TOL


def test_pruned_heads_and_channels_stay_removed_through_qat(rng, tmp_path):
    """Prune -> QAT -> strip: quantize_model keeps the removed heads (their projection columns and output rows)
    and the removed channels of the stream the attention reads and writes exactly zero while the QAT model trains
    (constraints on the projections' weights, saved with the model), and zeroes the projection rows that read
    removed channels (their weight ranges are per output unit, over all rows): the trained QAT model strips to
    fewer heads and channels and computes the same."""
    model = _vit(rng, blocks=1)
    kg = tfcompress.graph.build_graph(model)
    groups = {g.layers: g for g in kg.groups()}
    stream = next(g for layers, g in groups.items() if "b0_mha" in layers)
    tfcompress.zero_channels(model, groups[("b0_mha:heads",)], [1, 2], graph=kg)
    tfcompress.zero_channels(model, stream, [0, 5, 9, 30], graph=kg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # normalizations stay float
        q = quantize_model(model)
    mha = q.get_layer("b0_mha")
    assert not np.any(mha.query_dense.kernel.numpy()[[0, 5, 9, 30]])  # rows reading removed channels
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    q.compile(keras.optimizers.Adam(0.05), "mse")
    q.fit(x, rng.normal(size=(32, 10)), epochs=2, batch_size=8, verbose=0)
    for d in (mha.query_dense, mha.key_dense, mha.value_dense):
        assert not np.any(d.kernel.numpy()[:, [1, 2]]) and not np.any(d.kernel.numpy()[[0, 5, 9, 30]])
    assert not np.any(mha.output_dense.kernel.numpy()[[1, 2]])
    assert not np.any(mha.output_dense.kernel.numpy()[..., [0, 5, 9, 30]])
    stripped = tfcompress.strip(q)
    assert stripped.get_layer("b0_mha").num_heads == 2
    assert stripped.get_layer("b0_mha").output_dense.kernel.shape[-1] == 28
    assert rel_error(stripped(x[:8]), q(x[:8])) < TOL
    q.save(tmp_path / "q.keras")
    again = keras.saving.load_model(tmp_path / "q.keras")
    assert again.get_layer("b0_mha").query_dense.kernel.constraint is not None


def test_savedmodel_stripper_keeps_the_heads(rng, tmp_path):
    """Exported, the heads are Einsums over reshaped projections, which the SavedModel stripper does not take
    apart: the zeroed heads stay and the stripped SavedModel computes what the model does (strip the Keras model
    before ``model.export`` to remove them)."""
    model = _attention_model(rng, "self")
    tfcompress.zero_channels(model, _heads(model), [0, 2])
    model.export(str(tmp_path / "src"), verbose=False)
    strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"))
    x = _inputs(model, rng)
    sig = tf.saved_model.load(str(tmp_path / "dst")).signatures["serving_default"]
    (out,) = sig(qi=tf.constant(x[0])).values()
    assert rel_error(out, model(x)) < TOL


def test_head_constants_and_macs_from_the_op_table():
    """Without Keras: a head is constant when its value columns are zero (its value bias, 1; 0 without one),
    whatever its query and key; the heads' and the output projection's MACs scale with the kept heads."""
    from tfcompress.graph import ops

    kernel = np.ones((6, 3, 2))
    kernel[:, 0], kernel[:, 1] = 0.0, 0.0
    bias = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 1.0]])
    c = ops.const_out("attention_heads", [np.full(6, np.nan)], value_kernel=kernel, value_bias=bias)
    np.testing.assert_array_equal(c, [0.0, 1.0, np.nan])
    geometry = dict(input_positions=[10, 9], head_columns=[4, 4 + 2], query_positions=10, key_positions=9,
                    key_dim=4, value_dim=2)
    one = 10 * 6 * 4 + 9 * 5 * 6 + 10 * 9 * 6
    assert ops.macs("attention_heads", [6, 5], 3, **geometry) == 3 * one
    assert ops.macs("attention_heads", [6, 5], 1, **geometry) == one
    assert ops.macs("attention", [2], 7, positions=10, value_dim=2) == 10 * 2 * 2 * 7
