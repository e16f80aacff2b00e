"""Functional models holding raw ``keras.ops`` nodes (``x + y``, ``x * 0.5``, hard-swish, concatenate, mean,
reshape): channel groups, zeroing, exact stripping, quantization and the save/load round trip.

Outputs are compared with the original Keras model's (relative max error < 1e-5); save/load must be exact.
"""

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import tfcompress
from tfcompress.graph import build_graph
from conftest import randomize_batchnorm, randomize_biases, rel_error

TOL = 1e-5


def _hard_swish(x):
    return x * ops.relu6(x + 3.0) / 6.0


def ops_model():
    """A residual network written with keras.ops arithmetic instead of merge layers."""
    inp = keras.Input((10, 10, 3))
    a = L.Conv2D(8, 3, padding="same", name="stem")(inp)
    a = L.BatchNormalization(name="bn")(a)
    a = _hard_swish(a)
    b = L.Conv2D(8, 1, name="branch")(a)
    r = ops.add(a, b) * 0.5  # residual: joins stem and branch
    e = L.Conv2D(8, 1, activation="sigmoid", name="excite")(ops.mean(r, axis=(1, 2), keepdims=True))
    r = r * e  # squeeze-and-excite with a keras.ops product (broadcast over space)
    c = L.Conv2D(6, 1, name="side")(r)
    cat = ops.concatenate([ops.gelu(r), ops.relu(c) - 1.0], axis=-1)
    pooled = ops.reshape(ops.mean(cat, axis=(1, 2), keepdims=True), (-1, 14))
    out = L.Dense(4, name="head")(pooled)
    return keras.Model(inp, out)


def _zero_quarter(model, rng):
    kg = build_graph(model)
    groups = kg.groups()
    for g in groups:
        tfcompress.zero_channels(model, g, rng.choice(g.size, max(1, g.size // 4), replace=False), graph=kg)
    return groups


def test_ops_nodes_join_and_pass_channels():
    groups = {g.layers: g.size for g in tfcompress.channel_groups(ops_model())}
    assert groups == {("stem", "branch", "excite"): 8, ("side",): 6}


@pytest.mark.parametrize("blocker", [
    lambda t: ops.softmax(t, axis=-1),  # mixes channels
    lambda t: t[..., ::2] * 2.0,  # takes every other channel
    lambda t: ops.expand_dims(t[..., 3], -1),  # drops the channel axis
    lambda t: t + ops.ones((6, 6, 8)),  # a constant array that varies over positions
    lambda t: t * ops.mean(t, axis=-1, keepdims=True),  # broadcast over the channel axis
    lambda t: ops.transpose(t, (0, 3, 1, 2)),
])
def test_other_ops_block_without_crashing(blocker, rng):
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    y = blocker(a)
    y = L.Conv2D(4, 1, name="b")(y)
    model = keras.Model(inp, L.Flatten()(y))
    assert ("a",) not in {g.layers for g in tfcompress.channel_groups(model)}
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    assert rel_error(tfcompress.strip(model)(x), model(x)) < TOL


def sliced_model():
    """Channel ranges taken with ``split`` and ``x[..., a:b]`` across a concatenation: the cuts fall inside the
    spaces of ``a`` (at 5, 10 and 12) and ``b`` (at 4), and a range across the a|b border is added to ``c``."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(16, 3, padding="same", name="a")(inp)
    b = L.Conv2D(8, 3, padding="same", name="b")(inp)
    cat = ops.concatenate([a, b], axis=-1)  # a | b: 24 channels
    left, right = ops.split(cat, [10], axis=-1)  # a[:10]; a[10:] | b
    p, q = ops.split(left, 2, axis=-1)  # a[:5]; a[5:10]: equal parts, until stripping
    c = L.Conv2D(8, 1, name="c")(ops.concatenate([q, p], axis=-1))
    joined = ops.relu(cat[..., 12:20] + c)  # a[12:] | b[:4], joined with c
    top, bottom = ops.split(joined[:, 1:-1], 2, axis=1)  # along the rows: every channel in each
    y = L.Dense(4, name="head")(ops.concatenate([right[:, 1:4], top + bottom * 0.5], axis=-1)[:, -1])  # a row
    return keras.Model(inp, L.Flatten()(y))


def test_channel_ranges_split_their_groups(rng, tmp_path):
    """A range of channels is what it takes of the spaces it reads: the spaces are cut at its ends into groups
    of their own; stripping is exact and moves the ranges to the channels kept."""
    model = sliced_model()
    groups = {(g.layers, g.size) for g in tfcompress.channel_groups(model)}
    assert groups == {(("a",), 5), (("a",), 5), (("a",), 2), (("a", "c"), 4), (("b", "c"), 4), (("b",), 4)}
    randomize_biases(model, rng)
    groups = _zero_quarter(model, rng)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.get_layer("a").filters < 16 and stripped.get_layer("c").filters < 8
    assert stripped.get_layer("head").kernel.shape[0] < 22
    stripped.save(tmp_path / "s.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "s.keras")(x), stripped(x))


@pytest.mark.parametrize("width, parts", [
    (10, lambda h: ops.split(h, [4], axis=-1)),
    (8, lambda h: ops.split(h, 2, axis=-1)),  # parts of one size
    (10, lambda h: (h[..., :4], h[..., 4:])),
])
def test_zero_channels_zeroes_the_part_of_a_sliced_producer_it_is_given(width, parts, rng):
    """The parts of one producer's channels are groups with the same layer names: each is zeroed as itself."""
    inp = keras.Input((6, 6, 3))
    a, b = parts(L.Conv2D(width, 1, name="p")(inp))
    model = keras.Model(inp, ops.concatenate([L.Conv2D(2, 1, name="ta")(a), L.Conv2D(2, 1, name="tb")(b)], -1))
    first, second = [g for g in tfcompress.channel_groups(model) if g.layers == ("p",)]
    tfcompress.zero_channels(model, second, [1, second.size - 1], compensate=False)
    tfcompress.zero_channels(model, first, [0], compensate=False)
    zero = np.flatnonzero(np.abs(model.get_layer("p").kernel.numpy()).sum(axis=(0, 1, 2)) == 0)
    assert zero.tolist() == [0, first.size + 1, first.size + second.size - 1]
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert stripped.get_layer("p").filters == first.size + second.size - 3
    assert rel_error(stripped(x), model(x)) < TOL


def test_gated_linear_units_prune_both_halves_together(rng):
    """GLU ``a * sigmoid(b)`` with ``a, b`` the halves of one convolution (``split`` and slicing): channel j of the
    group is filters j and j + C/2; FilterPruning zeroes them in pairs and stripping removes both, exactly."""
    inp = keras.Input((16, 4))
    a, b = ops.split(L.Conv1D(16, 3, padding="same", name="glu")(inp), 2, axis=-1)
    x = L.Conv1D(12, 3, padding="same", name="glu2")(a * ops.sigmoid(b))
    x = x[..., :6] * ops.sigmoid(x[..., 6:])
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(L.Conv1D(8, 1, name="c")(x))))
    assert {g.layers: g.size for g in tfcompress.channel_groups(model)} == {("glu",): 8, ("glu2",): 6, ("c",): 8}
    x = rng.normal(size=(32, 16, 4)).astype("float32")
    model.compile("adam", "mse")
    pruner = tfcompress.pruning.FilterPruning(target=0.5, pruning_epochs=1, prune_first_conv=True)
    model.fit(x, rng.normal(size=(32, 3)), epochs=2, batch_size=16, callbacks=[pruner], verbose=0)
    zero = np.nonzero(np.abs(model.get_layer("glu").kernel.numpy()).sum(axis=(0, 1)) == 0)[0]
    assert len(zero) == 8 and set(zero[zero < 8] + 8) == set(zero[zero >= 8])
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert (stripped.get_layer("glu").filters, stripped.get_layer("glu2").filters) == (8, 6)


def test_filter_pruning_masks_of_a_split_producer_cover_its_whole_output(rng):
    """A producer whose channels a split cut into two groups has one ``masks`` entry: the keep mask of all its
    filters (both parts), False exactly where FilterPruning zeroed a filter."""
    inp = keras.Input((6, 6, 3))
    a, b = ops.split(L.Conv2D(16, 3, padding="same", name="p")(inp), [6], axis=-1)
    y = ops.concatenate([L.Conv2D(4, 1, name="ta")(a), L.Conv2D(4, 1, name="tb")(b)], -1)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(y)))
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    model.compile("sgd", "mse")
    pruner = tfcompress.pruning.FilterPruning(target=0.5, pruning_epochs=1, prune_first_conv=True)
    model.fit(x, rng.normal(size=(16, 2)), epochs=1, batch_size=16, callbacks=[pruner], verbose=0)
    assert sorted(g.size for g in pruner.groups if g.layers == ("p",)) == [6, 10]
    zero = np.abs(model.get_layer("p").kernel.numpy()).sum(axis=(0, 1, 2)) == 0
    assert 0 < zero[:6].sum() < 6 and 0 < zero[6:].sum() < 10  # both parts pruned
    np.testing.assert_array_equal(pruner.masks[("p",)], ~zero)


@pytest.mark.parametrize("layer, blocked", [
    (lambda: L.DepthwiseConv2D(1, depth_multiplier=2, name="g"), ("a",)),  # a range of repeated channels
    (lambda: L.Conv2D(8, 1, groups=2, name="g"), ("g",)),  # a range across a grouped convolution's blocks
])
def test_channel_range_of_repeated_or_grouped_channels_blocks(layer, blocked, rng):
    inp = keras.Input((6, 6, 8))
    a = L.Conv2D(8, 1, name="a")(inp)
    y = L.Conv2D(4, 1, name="b")(layer()(a)[..., 3:11])
    model = keras.Model(inp, L.Flatten()(y))
    assert "takes a range of them" in {g.layers: g.reason for g in tfcompress.explain(model)}[blocked]
    x = rng.normal(size=(2, 6, 6, 8)).astype("float32")
    assert rel_error(tfcompress.strip(model)(x), model(x)) < TOL


def spatial_gate_model():
    """CBAM-style spatial attention: a one-channel map (from channel statistics, a 7x7 convolution and a
    sigmoid) multiplies every channel of the features, with a ``Multiply`` layer and with ``*``; a one-channel
    map is also added (``Add`` of a (..., 1) tensor)."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(12, 3, padding="same", name="a")(inp)
    stats = ops.concatenate([ops.mean(x, axis=-1, keepdims=True), ops.max(x, axis=-1, keepdims=True)], axis=-1)
    gate = L.Conv2D(1, 7, padding="same", activation="sigmoid", name="gate")(stats)
    y = L.Multiply()([L.Conv2D(10, 1, name="b0")(x), gate])
    z = L.Conv2D(12, 3, padding="same", name="b")(y)
    z = L.Add()([L.Conv2D(1, 1, name="bias_map")(inp), z]) * gate
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(L.Conv2D(6, 1, name="c")(z))))


def test_one_channel_broadcast_over_the_channels_passes_them(rng):
    """``x * s`` and ``x + s`` with ``s`` of one channel: x's channels pass (a zero channel stays zero through
    the product, becomes ``s`` through the sum, which the next layer cannot fold: kept); ``s`` is blocked."""
    model = spatial_gate_model()
    reasons = {g.layers: g.reason for g in tfcompress.explain(model)}
    assert reasons[("b0",)] == reasons[("b",)] == reasons[("c",)] == ""
    assert "mean" in reasons[("a",)]  # the channel statistics read every channel of a
    assert "broadcasts" in reasons[("gate",)]
    randomize_biases(model, rng)
    groups = {g.layers: g for g in tfcompress.channel_groups(model)}
    for name, idx in (("b0", [0, 3]), ("b", [0, 5, 7]), ("c", [1, 2])):
        tfcompress.zero_channels(model, groups[(name,)], idx)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.get_layer("b0").filters == 8  # a zero channel times the gate is zero
    assert stripped.get_layer("b").filters == 12  # after the broadcast sum, a zeroed channel of b is not 0
    assert stripped.get_layer("c").filters == 4


def where_model():
    """Comparisons and ``where`` on features: a leaky ReLU as ``where(x > 0, x, 0.1 * x)``, a threshold with a
    scalar (``where(x >= 0.5, x, 0.0)``) and a NaN guard (``where(x != x, 0.0, x)``)."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(12, 3, padding="same", name="a")(inp)
    a = ops.where(ops.greater(a, 0.0), a, 0.1 * a)
    b = L.Conv2D(10, 3, padding="same", name="b")(a)
    b = ops.where(b >= 0.5, b, 0.0)
    c = L.Conv2D(6, 1, name="c")(b)
    c = ops.where(ops.not_equal(c, c), 0.0, ops.clip(c, -1.0, 1.0))
    return keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(c)))


def test_comparisons_and_where_pass_channels(rng):
    """A comparison or ``where`` is position-wise: its tensors' channels join and pass; a zeroed channel
    compares as 0 and ``where`` picks 0 on either side, so stripping removes it exactly."""
    model = where_model()
    assert {g.layers: g.reason for g in tfcompress.explain(model)} == {
        ("a",): "", ("b",): "", ("c",): "", ("head",): "they are a model output"}
    randomize_biases(model, rng)
    groups = {g.layers: g for g in tfcompress.channel_groups(model)}
    for name, idx in (("a", [0, 3, 4]), ("b", [1, 5]), ("c", [2])):
        tfcompress.zero_channels(model, groups[(name,)], idx)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert [stripped.get_layer(n).filters for n in "abc"] == [9, 8, 5]


def test_strip_ops_model_is_exact_smaller_and_round_trips(rng, tmp_path):
    model = ops_model()
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)  # zeroed channels become constants that consumers must fold
    groups = _zero_quarter(model, rng)
    x = rng.normal(size=(3, 10, 10, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.count_params() < model.count_params()
    assert stripped.get_layer("side").filters < 6
    assert sum(g.size for g in tfcompress.channel_groups(stripped)) < sum(g.size for g in groups)
    stripped.save(tmp_path / "s.keras")
    loaded = keras.saving.load_model(tmp_path / "s.keras")
    np.testing.assert_array_equal(loaded(x), stripped(x))


@pytest.mark.parametrize("per_channel", [
    lambda t, v: t * v,  # a per-channel scale as a numpy vector
    lambda t, v: ops.add(t, ops.convert_to_tensor(v.reshape(1, 1, 1, -1))),  # a backend tensor, broadcast shape
    lambda t, v: ops.subtract(v, t),
])
def test_per_channel_constants_pass_channels_and_are_sliced(per_channel, rng, tmp_path):
    """Arithmetic with a constant holding one value per channel is per-channel: stripping slices the constant
    (an added constant makes a zeroed channel a constant that the next convolution folds)."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    y = per_channel(a, rng.uniform(0.5, 1.5, 8).astype("float32"))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="b")(y))))
    randomize_biases(model, rng)
    (group,) = [g for g in tfcompress.channel_groups(model) if g.layers == ("a",)]
    tfcompress.zero_channels(model, group, [1, 4, 5])
    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.get_layer("a").filters == 5 and stripped.get_layer("b").kernel.shape[2] == 5
    stripped.save(tmp_path / "s.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "s.keras")(x), stripped(x))


def test_reshape_op_follows_the_kept_channel_count(rng):
    model = ops_model()
    _zero_quarter(model, rng)
    stripped = tfcompress.strip(model)
    reshape = next(op for op in stripped.operations if type(op).__name__ == "Reshape")
    assert reshape.get_config()["newshape"][-1] == stripped.get_layer("head").kernel.shape[0] < 14


def test_quantize_ops_model_runs_and_round_trips(rng, tmp_path):
    model = ops_model()
    q = tfcompress.quantization.quantize_model(model)
    x = rng.normal(size=(3, 10, 10, 3)).astype("float32")
    q.compile("sgd", "mse")
    q.fit(x, rng.normal(size=(3, 4)), epochs=1, verbose=0)
    assert rel_error(q(x), model(x)) < 0.1
    q.save(tmp_path / "q.keras")
    loaded = keras.saving.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(loaded(x), q(x))


def test_prune_in_fit_then_strip_and_quantize(rng):
    """The whole path on a keras.ops model: FilterPruning in fit, strip (exact, smaller), quantize_model."""
    model = ops_model()
    model.compile("adam", "mse")
    x = rng.normal(size=(32, 10, 10, 3)).astype("float32")
    pruner = tfcompress.pruning.FilterPruning(target=0.5, pruning_epochs=1, prune_first_conv=True)
    model.fit(x, rng.normal(size=(32, 4)), epochs=2, batch_size=16, callbacks=[pruner], verbose=0)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert stripped.get_layer("stem").filters < 8 and stripped.get_layer("side").filters < 6
    assert np.all(np.isfinite(tfcompress.quantization.quantize_model(stripped)(x)))
