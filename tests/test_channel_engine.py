"""The channel-dependency engine: one test per layer rule, on small real Keras models.

Every strip test compares the stripped model's outputs with the original's (Keras forward pass,
relative max error < 1e-5) and checks that the channels really went away.
"""

import re

import keras
import numpy as np
import pytest
from keras import layers as L

import tfcompress
from tfcompress.graph import UnsupportedModelError, build_graph
from conftest import randomize_batchnorm, randomize_biases, rel_error

TOL = 1e-5


def _x(rng, shape=(3, 12, 12, 3)):
    return rng.uniform(-1, 1, shape).astype("float32")


def _groups_by_layer(model):
    return {g.layers: g for g in tfcompress.channel_groups(model)}


def _zero_and_strip(model, rng, x, fraction=0.25, groups=None):
    """Zero a fraction of every group's channels, strip, check outputs equal; return the stripped model."""
    groups = tfcompress.channel_groups(model) if groups is None else groups
    for g in groups:
        k = max(1, int(g.size * fraction))
        tfcompress.zero_channels(model, g, rng.choice(g.size, k, replace=False))
    ref = model(x)
    stripped = tfcompress.strip(model)
    out = stripped(x)
    assert rel_error(out, ref) < TOL
    return stripped


def _width(model, name):
    return model.get_layer(name).output.shape[-1]


def test_sequential_chain_pass_through_layers(rng):
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Conv2D(8, 3, padding="same", name="c1"),
        L.BatchNormalization(name="bn1"),
        L.ReLU(),
        L.ZeroPadding2D(1),
        L.MaxPooling2D(),
        L.Rescaling(0.5, offset=0.1),  # a removed channel's constant is folded into c2
        L.Dropout(0.3),
        L.UpSampling2D(),
        L.Cropping2D(1),
        L.Conv2D(6, 3, name="c2"),
        L.GlobalAveragePooling2D(),
        L.Dense(5, name="head"),
    ])
    randomize_batchnorm(model, rng)
    groups = _groups_by_layer(model)
    assert set(groups) == {("c1",), ("c2",)}  # the output layer "head" is never a group
    assert groups[("c1",)].size == 8
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert isinstance(stripped, keras.Model) and not isinstance(stripped, keras.Sequential)
    assert _width(stripped, "c1") == 6 and _width(stripped, "c2") == 5
    assert stripped.get_layer("bn1").gamma.shape == (6,)


def test_zero_channels_makes_outputs_exactly_zero(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="act")(x)
    out = L.Dense(3)(L.Flatten()(L.Conv2D(4, 3)(x)))
    model = keras.Model(inp, out)
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    (g,) = [g for g in tfcompress.channel_groups(model) if g.layers == ("c1",)]
    tfcompress.zero_channels(model, g, [1, 5])
    probe = keras.Model(inp, [model.get_layer("c1").output, model.get_layer("act").output])
    conv, act = probe(_x(rng))
    for t in (conv, act):
        t = keras.ops.convert_to_numpy(t)
        assert np.all(t[..., [1, 5]] == 0)
        assert np.all(np.abs(t[..., [0, 2, 3, 4, 6, 7]]).max(axis=(0, 1, 2)) > 0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        tfcompress.zero_channels(model, g, [8])
    before = [w.copy() for w in model.get_weights()]
    mask = np.zeros(8, bool)
    mask[[3, 6]] = True  # a mask would have been read as channels 0 and 1
    for bad in (mask, [0.5], "3", [[2, 3]]):
        with pytest.raises(TypeError, match="integers"):
            tfcompress.zero_channels(model, g, bad)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    tfcompress.zero_channels(model, g, np.flatnonzero(mask))
    tfcompress.zero_channels(model, g, np.array([2.0]))  # whole numbers of any dtype are indices
    assert np.all(model.get_layer("c1").get_weights()[1][[1, 2, 3, 5, 6]] == 0)


def test_residual_add_joins_groups(rng):
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(8, 3, padding="same", name="stem")(inp)
    b = L.Conv2D(8, 3, padding="same", name="body")(L.ReLU()(a))
    b = L.BatchNormalization()(b)
    s = L.Add(name="add")([a, b])
    c = L.Conv2D(8, 1, name="proj")(s)
    s2 = L.Subtract()([s, c])
    m = L.Maximum()([s2, L.Conv2D(8, 1, name="side")(s2)])
    out = L.Dense(2)(L.GlobalMaxPooling2D()(m))
    model = keras.Model(inp, out)
    randomize_batchnorm(model, rng)
    groups = tfcompress.channel_groups(model)
    assert [g.layers for g in groups] == [("stem", "body", "proj", "side")]
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert _width(stripped, "add") == 6


def test_depthwise_ties_channels_and_multiplier(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(6, 1, name="expand")(inp)
    x = L.ReLU(6.0)(L.BatchNormalization()(x))
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.Conv2D(4, 1, name="project")(x)
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    groups = _groups_by_layer(model)
    assert ("expand",) in groups and groups[("expand",)].size == 6
    tfcompress.zero_channels(model, groups[("expand",)], [0, 4])
    x = _x(rng)
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert _width(stripped, "expand") == 4
    assert _width(stripped, "dw") == 8  # 4 channels x multiplier 2
    assert stripped.get_layer("dw").kernel.shape == (3, 3, 4, 2)
    assert stripped.get_layer("project").kernel.shape == (1, 1, 8, 4)


def test_concatenate_maps_offsets_into_each_input(rng):
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(6, 3, padding="same", name="b")(inp)
    c = L.Concatenate(name="cat")([a, b, a])
    c = L.BatchNormalization()(c)
    y = L.Conv2D(5, 1, name="consumer")(L.ReLU()(c))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(y)))
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    groups = _groups_by_layer(model)
    assert groups[("a",)].size == 4 and groups[("b",)].size == 6
    tfcompress.zero_channels(model, groups[("a",)], [1])
    tfcompress.zero_channels(model, groups[("b",)], [0, 5])
    x = _x(rng)
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert _width(stripped, "cat") == 3 + 4 + 3
    assert stripped.get_layer("consumer").kernel.shape == (1, 1, 10, 5)


def test_concatenate_on_spatial_axis_is_a_join(rng):
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 3, padding="same", name="b")(inp)
    c = L.Concatenate(axis=1)([a, b])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(3, 1)(c))))
    assert ("a", "b") in _groups_by_layer(model)
    _zero_and_strip(model, rng, _x(rng))


def test_grouped_conv_removes_equal_counts_per_block(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="pre")(inp)
    x = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="post")(x))))
    randomize_biases(model, rng)
    groups = _groups_by_layer(model)
    assert groups[("pre",)].blocks == 2 and groups[("grouped",)].blocks == 2
    # 2 channels zeroed in block 0 and 1 in block 1: only one per block can go
    tfcompress.zero_channels(model, groups[("pre",)], [0, 1, 5])
    tfcompress.zero_channels(model, groups[("grouped",)], [2, 3, 6, 7])
    x = _x(rng)
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert _width(stripped, "pre") == 6
    assert stripped.get_layer("grouped").kernel.shape == (3, 3, 3, 4)
    assert stripped.get_layer("post").kernel.shape == (1, 1, 4, 4)


def test_squeeze_and_excite_joins_the_excite_layer(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    x = L.Activation("swish")(L.BatchNormalization(name="bn")(x))
    se = L.GlobalAveragePooling2D()(x)
    se = L.Reshape((1, 1, 8), name="se_reshape")(se)
    se = L.Conv2D(4, 1, activation="swish", name="se_reduce")(se)
    se = L.Conv2D(8, 1, activation="sigmoid", name="se_expand")(se)
    x = L.Multiply(name="excite")([x, se])
    x = L.Conv2D(6, 1, name="project")(x)
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    groups = _groups_by_layer(model)
    assert ("conv", "se_expand") in groups
    assert ("se_reduce",) in groups
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert _width(stripped, "excite") == 6
    assert stripped.get_layer("se_reshape").output.shape[-1] == 6
    assert stripped.get_layer("se_expand").kernel.shape == (1, 1, 3, 6)


def test_dense_squeeze_and_excite(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inp)
    se = L.Dense(4, activation="relu", name="fc1")(L.GlobalAveragePooling2D(keepdims=True)(x))
    se = L.Dense(8, activation="sigmoid", name="fc2")(se)
    x = L.Multiply()([x, se])
    model = keras.Model(inp, L.Dense(3)(L.Flatten()(L.Conv2D(2, 1)(x))))
    randomize_biases(model, rng)
    assert ("conv", "fc2") in _groups_by_layer(model)
    _zero_and_strip(model, rng, _x(rng))


@pytest.mark.parametrize("flatten", [
    lambda: L.Flatten(),
    lambda: L.Reshape((-1,)),
    lambda: L.Reshape((4 * 4 * 5,)),  # names the count: stripping rewrites it
    lambda: lambda t: keras.ops.reshape(t, (-1, 4 * 4 * 5)),
])
def test_flatten_to_dense_slices_tiled_rows(rng, flatten):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(5, 3, name="conv")(inp)
    x = flatten()(x)
    model = keras.Model(inp, L.Dense(3, name="head")(L.Dense(7, name="fc")(x)))
    randomize_biases(model, rng)
    groups = _groups_by_layer(model)
    assert set(groups) == {("conv",), ("fc",)}
    tfcompress.zero_channels(model, groups[("conv",)], [0, 3])
    x = _x(rng, (3, 6, 6, 3))
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert stripped.get_layer("fc").kernel.shape == (4 * 4 * 3, 7)


@pytest.mark.parametrize("blocker", [
    lambda: L.Reshape((8, 16)),
    lambda: L.Permute((3, 1, 2)),
    lambda: L.Lambda(lambda t: t * 2.0),
    lambda: L.LayerNormalization(),
    lambda: L.Activation("softmax"),
    lambda: L.Activation("log_softmax"),
    lambda: L.Softmax(),
])
def test_unknown_or_mixing_layers_block_the_group(blocker):
    inp = keras.Input((4, 4, 8))
    a = L.Conv2D(8, 1, name="blocked")(inp)
    b = L.Conv2D(8, 1, name="free")(inp)
    layer = blocker()
    y = layer(a)
    model = keras.Model(inp, [L.Flatten()(y), L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(3, 1)(b)))])
    names = {g.layers for g in tfcompress.channel_groups(model)}
    assert ("free",) in names and ("blocked",) not in names
    if "softmax" in type(layer).__name__.lower() + str(getattr(layer, "activation", "")):  # says why
        reason = {g.layers: g.reason for g in tfcompress.explain(model)}[("blocked",)]
        assert re.fullmatch(rf"the (log_)?softmax of layer '{layer.name}' combines them", reason), reason


@pytest.mark.parametrize("axis", [1, -2, (1, 2)])
def test_softmax_over_positions_turns_a_removed_channel_into_a_constant_its_consumer_absorbs(axis, rng):
    """Each channel is normalised over the positions on its own: a zero channel comes out as 1 / positions."""
    inp = keras.Input((4, 5, 3))
    h = L.Softmax(axis=axis)(L.Conv2D(8, 1, name="c")(inp))
    model = keras.Model(inp, L.Flatten()(L.Conv2D(3, 1, name="t")(h)))
    randomize_biases(model, rng)
    (group,) = tfcompress.channel_groups(model)
    tfcompress.zero_channels(model, group, [2, 5], compensate=False)
    stripped = tfcompress.strip(model)
    assert stripped.get_layer("c").filters == 6
    x = rng.normal(size=(2, 4, 5, 3)).astype("float32")
    assert rel_error(stripped(x), model(x)) < TOL


@pytest.mark.parametrize("layer", [
    lambda: L.Permute((2, 1, 3)),  # swaps height and width, channels stay last
    lambda: L.Resizing(9, 7, interpolation="bilinear"),
    lambda: L.Resizing(5, 5, interpolation="bicubic", crop_to_aspect_ratio=True),
    lambda: L.Resizing(8, 4, pad_to_aspect_ratio=True),  # pads with 0: a zero channel stays zero
])
def test_layers_that_move_positions_but_not_channels_pass_them(layer, rng):
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(5, 3, padding="same", name="b")(layer()(a))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(b)))
    randomize_biases(model, rng)
    assert ("a",) in _groups_by_layer(model)
    stripped = _zero_and_strip(model, rng, _x(rng, (3, 6, 6, 3)))
    assert _width(stripped, "a") == 6


def test_resizing_that_pads_with_another_value_blocks(rng):
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(5, 3, name="b")(L.Resizing(8, 4, pad_to_aspect_ratio=True, fill_value=1.0)(a))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(b)))
    assert ("a",) not in _groups_by_layer(model)


def _tcn(rng):
    """A temporal convolutional network: dilated causal Conv1D blocks with residual adds."""
    inp = keras.Input((40, 6))
    x = L.Conv1D(16, 1, name="stem")(inp)
    for i, d in enumerate([1, 2, 4]):
        h = L.Conv1D(16, 3, padding="causal", dilation_rate=d, activation="relu", name=f"c{i}a")(x)
        x = L.Add()([x, L.Conv1D(16, 3, padding="causal", dilation_rate=d, name=f"c{i}b")(h)])
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    randomize_biases(model, rng)
    return model


def test_causal_convolutions_are_pruned_like_any_convolution(rng):
    model = _tcn(rng)
    assert set(_groups_by_layer(model)) == {("stem", "c0b", "c1b", "c2b"), ("c0a",), ("c1a",), ("c2a",)}
    stripped = _zero_and_strip(model, rng, _x(rng, (3, 40, 6)))
    assert {_width(stripped, n) for n in ("stem", "c0a", "c1a", "c2a")} == {12}


def test_causal_convolution_keeps_a_constant_input_channel_its_padding_would_change(rng):
    """Causal padding puts zeros before the sequence: a constant input channel is not the same constant in
    every window of a causal convolution, so it cannot be folded into the bias and stays."""
    model = _tcn(rng)
    c0a = model.get_layer("c0a")
    kernel, bias = (w.numpy() for w in c0a.weights)
    kernel[..., 5] = 0.0
    bias[5] = 0.8  # relu(0.8): channel 5 of c0a's output is the constant 0.8, read by causal c0b
    c0a.set_weights([kernel, bias])
    x = _x(rng, (3, 40, 6))
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert _width(stripped, "c0a") == 16


def _into_recurrent(rnn, rng):
    inp = keras.Input((20, 4))
    x = L.Conv1D(8, 3, padding="causal", activation="relu", name="c1")(inp)
    model = keras.Model(inp, L.Dense(3, name="head")(rnn()(L.BatchNormalization(name="bn")(x))))
    randomize_biases(model, rng)
    return model


@pytest.mark.parametrize("rnn", [
    lambda: L.LSTM(6, name="rnn"),
    lambda: L.GRU(6, name="rnn"),
    lambda: L.GRU(6, reset_after=False, name="rnn"),
    lambda: L.SimpleRNN(5, name="rnn"),
    lambda: L.Bidirectional(L.LSTM(4), name="rnn"),
    lambda: L.Bidirectional(L.GRU(4), merge_mode="sum", name="rnn"),
])
def test_recurrent_layers_read_channels_through_kernel_rows(rnn, rng, tmp_path):
    """An LSTM/GRU/SimpleRNN reads its input channels like a Dense layer at every time step: the layer before
    it can be pruned (the kernel rows go), while its units, which feed each other, never are."""
    model = _into_recurrent(rnn, rng)
    reasons = {g.layers: g.reason for g in tfcompress.explain(model)}
    assert reasons[("c1",)] == "" and "feed each other" in reasons[("rnn",)]
    x = _x(rng, (3, 20, 4))
    stripped = _zero_and_strip(model, rng, x)
    assert _width(stripped, "c1") == 6
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x), stripped(x))



@pytest.mark.parametrize("rnn", [lambda: L.GRU(6, name="rnn"), lambda: L.Bidirectional(L.LSTM(4), name="rnn")])
def test_masked_recurrent_layers_read_channels_through_kernel_rows(rnn, rng):
    """A padding mask (``Embedding(mask_zero=True)``) reaches a recurrent layer as a second tensor: it only says
    which time steps count, so the layer before it is still pruned, and the stripped model keeps the mask (the
    padded steps would change the outputs otherwise)."""
    inp = keras.Input((12,), dtype="int32")
    x = L.Dense(8, activation="relu", name="c1")(L.Embedding(30, 5, mask_zero=True)(inp))
    model = keras.Model(inp, L.Dense(3, name="head")(rnn()(x)))
    randomize_biases(model, rng)
    tokens = np.where(np.arange(12) < rng.integers(3, 12, (6, 1)), rng.integers(1, 30, (6, 12)), 0).astype("int32")
    reasons = {g.layers: g.reason for g in tfcompress.explain(model)}
    assert reasons[("c1",)] == "" and "feed each other" in reasons[("rnn",)]
    stripped = _zero_and_strip(model, rng, tokens)
    assert _width(stripped, "c1") == 6


def _padded_tokens(rng, n=6, steps=12, vocab=30):
    return np.where(np.arange(steps) < rng.integers(3, steps, (n, 1)), rng.integers(1, vocab, (n, steps)),
                    0).astype("int32")


def _masked_pooling(kind):
    """Token features pooled over the unpadded steps: Keras's masked GlobalAveragePooling1D (the mask of
    ``Embedding(mask_zero=True)`` reaches it by itself), or by hand, ``where(mask, x, 0)`` summed over the steps."""
    inp = keras.Input((12,), dtype="int32")
    e = L.Embedding(30, 6, mask_zero=kind == "layer")(inp)
    x = L.Dense(10, activation="relu", name="c1")(L.Dense(8, name="c0")(e))
    if kind == "layer":
        pooled = L.GlobalAveragePooling1D()(x)
    else:
        present = keras.ops.expand_dims(keras.ops.not_equal(inp, 0), -1)
        pooled = keras.ops.sum(keras.ops.where(present, x, 0.0), axis=1)
    return keras.Model(inp, L.Dense(3, name="head")(L.Dense(7, activation="relu", name="c2")(pooled)))


@pytest.mark.parametrize("kind", ["layer", "ops"])
def test_pooling_over_unpadded_steps_passes_channels(kind, rng, tmp_path):
    """A mask only says which steps count: a channel that is 0 at every step pools to 0 over any of them, so the
    channels before the pooling are pruned and removed, by both strippers (in the SavedModel the mask is a
    one-channel condition broadcast over the channels of a select)."""
    from tfcompress.stripping.savedmodel_strip import freeze_saved_model, strip_saved_model

    model = _masked_pooling(kind)
    assert {g.layers: g.reason for g in tfcompress.explain(model)} == {
        ("c0",): "", ("c1",): "", ("c2",): "", ("head",): "they are a model output"}
    tokens = _padded_tokens(rng)
    stripped = _zero_and_strip(model, rng, tokens)
    assert [_width(stripped, n) for n in ("c0", "c1", "c2")] == [6, 8, 6]
    model.export(str(tmp_path / "src"), verbose=False)
    (name,) = freeze_saved_model(str(tmp_path / "src")).specs
    result = strip_saved_model(str(tmp_path / "src"), str(tmp_path / "dst"), check_inputs={name: tokens})
    assert result.max_rel_error < TOL
    assert result.params_before - result.params_after == model.count_params() - stripped.count_params()


def test_a_sum_over_positions_keeps_a_constant_channel(rng):
    """A constant channel sums to the constant times the steps, which a mean-like rule would fold wrongly: with a
    mask in the sum it is not even one known multiple, so it stays (a zero channel still goes)."""
    model = _masked_pooling("ops")
    c1 = model.get_layer("c1")
    kernel, bias = (w.numpy() for w in c1.weights)
    kernel[:, :2] = 0.0
    bias[:2] = [0.0, 0.7]
    c1.set_weights([kernel, bias])
    tokens = _padded_tokens(rng)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(tokens), model(tokens)) < TOL
    assert _width(stripped, "c1") == 9


def test_recurrent_layer_macs_shrink_with_its_input(rng):
    model = _into_recurrent(lambda: L.LSTM(6, name="rnn"), rng)
    # per example: c1 20 x 3 x 4 x 8; the LSTM 20 steps x (8 inputs + 6 units) x 4 gates x 6; the head 6 x 3
    assert tfcompress.count_flops(model) == 2 * (20 * 3 * 4 * 8 + 20 * (8 + 6) * 24 + 6 * 3)
    stripped = _zero_and_strip(model, rng, _x(rng, (3, 20, 4)))
    assert tfcompress.count_flops(stripped) == 2 * (20 * 3 * 4 * 6 + 20 * (6 + 6) * 24 + 6 * 3)


def test_recurrent_layer_keeps_a_constant_input_channel(rng):
    """A constant input channel adds to the gates at every step; it is not folded into the recurrent layer's
    biases, so it stays (and the outputs with it)."""
    model = _into_recurrent(lambda: L.LSTM(6, name="rnn"), rng)
    c1 = model.get_layer("c1")
    kernel, bias = (w.numpy() for w in c1.weights)
    kernel[..., 2] = 0.0
    bias[2] = 0.8
    c1.set_weights([kernel, bias])
    x = _x(rng, (3, 20, 4))
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL and _width(stripped, "c1") == 8


def _encoder(rng, call=lambda m, x: m(x, x)):
    """Two transformer encoder blocks (self-attention and an MLP, each added to the residual stream and
    layer-normalized) on a Dense embedding."""
    inp = keras.Input((10, 6))
    x = L.Dense(16, name="embed")(inp)
    for b in ("b1", "b2"):
        a = call(L.MultiHeadAttention(2, 8, name=f"{b}_mha"), x)
        x = L.LayerNormalization(name=f"{b}_ln1")(L.Add()([x, a]))
        f = L.Dense(16, name=f"{b}_ff2")(L.Dense(32, activation="gelu", name=f"{b}_ff1")(x))
        x = L.LayerNormalization(name=f"{b}_ln2")(L.Add()([x, f]))
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    randomize_biases(model, rng)
    for layer in model.layers:
        if isinstance(layer, L.LayerNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, 16), rng.uniform(-0.3, 0.3, 16)])
    return model


@pytest.mark.parametrize("call", [
    lambda m, x: m(x, x),
    lambda m, x: m(query=x, value=x, key=x),
    lambda m, x: m(x, x, use_causal_mask=True),
])
def test_attention_reads_and_writes_the_residual_stream(call, rng, tmp_path):
    """MultiHeadAttention reads its inputs through the rows of its query/key/value projections and writes
    its output through the output projection: added to the residual stream, it joins the stream's group, so
    a transformer's model width is pruned; its heads are a group of their own."""
    model = _encoder(rng, call)
    assert set(_groups_by_layer(model)) == {("embed", "b1_mha", "b1_ff2", "b2_mha", "b2_ff2"), ("b1_ff1",),
                                            ("b2_ff1",), ("b1_mha:heads",), ("b2_mha:heads",)}
    # per example: embed 10 x 6 x 16; per block q, k, v and output projections 4 x 10 x 16 x 16, scores and
    # their weighted sum 2 heads x 10 x 10 x (8 + 8), the MLP 2 x 10 x 16 x 32; the head 16 x 3
    block = 4 * 10 * 16 * 16 + 2 * 10 * 10 * 16 + 2 * 10 * 16 * 32
    assert tfcompress.count_flops(model) == 2 * (10 * 6 * 16 + 2 * block + 16 * 3)
    x = _x(rng, (3, 10, 6))
    stripped = _zero_and_strip(model, rng, x)
    assert stripped.get_layer("b1_mha").output_dense.kernel.shape == (1, 8, 12)  # one of two heads zeroed
    assert stripped.get_layer("b2_mha").query_dense.kernel.shape == (12, 1, 8)
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x), stripped(x))


def test_cross_attention_output_width_follows_its_own_group(rng):
    """Without a residual add the output channels are a group of their own: the stripped layer is given the
    kept count as ``output_shape`` (by default it would follow the query's width)."""
    q_in, v_in = keras.Input((6, 5)), keras.Input((9, 7))
    q = L.Dense(16, name="q")(q_in)
    v = L.Dense(12, name="v")(v_in)
    a = L.MultiHeadAttention(2, 4, name="mha")(q, v)
    model = keras.Model([q_in, v_in], L.Dense(3, name="head")(L.GlobalAveragePooling1D()(a)))
    randomize_biases(model, rng)
    assert set(_groups_by_layer(model)) == {("q",), ("v",), ("mha",), ("mha:heads",)}
    x = [_x(rng, (3, 6, 5)), _x(rng, (3, 9, 7))]
    stripped = _zero_and_strip(model, rng, x)
    mha = stripped.get_layer("mha")
    assert mha.query_dense.kernel.shape[0] == 12 and mha.value_dense.kernel.shape[0] == 9
    assert mha.key_dense.kernel.shape[0] == 9 and mha.output_dense.kernel.shape[-1] == 12


def test_attention_returning_its_scores_blocks(rng):
    inp = keras.Input((10, 6))
    x = L.Dense(16, name="embed")(inp)
    a, scores = L.MultiHeadAttention(2, 8, name="mha2")(x, x, return_attention_scores=True)
    model = keras.Model(inp, [L.Dense(3)(L.GlobalAveragePooling1D()(L.Add()([x, a]))),
                              L.Dense(2)(L.Flatten()(scores))])  # scores: (batch, heads, 10, 10)
    assert ("embed", "mha2") not in _groups_by_layer(model) and ("embed",) not in _groups_by_layer(model)


def test_custom_layer_blocks_and_is_kept_by_strip(rng):
    class Scale(L.Layer):
        def call(self, x):
            return x * 3.0

    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(6, 3, name="a")(inp)
    b = L.Conv2D(6, 3, name="b")(Scale(name="custom")(a))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(b)))
    assert [g.layers for g in tfcompress.channel_groups(model)] == [("b",)]
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert _width(stripped, "custom") == 6 and _width(stripped, "b") == 5


def test_nested_models_are_analysed_and_inlined(rng):
    block = keras.Sequential(
        [keras.Input((12, 12, 8)), L.Conv2D(8, 3, padding="same", name="conv"), L.BatchNormalization(name="bn")],
        name="block",
    )
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = L.Add()([x, block(x)])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="out_conv")(x))))
    randomize_batchnorm(model, rng)
    groups = _groups_by_layer(model)
    assert ("stem", "block/conv") in groups
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert stripped.get_layer("block_conv").kernel.shape[-1] == 6


def test_shared_layer_reads_the_same_channels_at_every_call(rng):
    shared = L.Conv2D(4, 1, name="shared")
    inp = keras.Input((12, 12, 3))
    a = L.Conv2D(6, 3, padding="same", name="a")(inp)
    b = L.Conv2D(6, 3, padding="same", name="b")(inp)
    y = L.Concatenate()([shared(a), shared(b)])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(3, 1)(y))))
    groups = _groups_by_layer(model)
    assert ("a", "b") in groups and ("shared",) in groups
    _zero_and_strip(model, rng, _x(rng))


@pytest.mark.parametrize("dropout", [L.SpatialDropout2D(0.3), L.Dropout(0.3), L.GaussianDropout(0.2)])
def test_dropout_layers_pass_channels(rng, dropout):
    """Every Dropout passes channels; SpatialDropout2D (a Dropout subclass with its own ``call``) matches
    its own entry of the layer table, not Dropout's."""
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    x = L.Conv2D(6, 3, padding="same", name="b")(dropout(x))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    randomize_biases(model, rng)
    assert set(_groups_by_layer(model)) == {("a",), ("b",)}
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert _width(stripped, "a") == 6


def channel_softmax(t):
    return keras.ops.softmax(t, axis=-1)


@pytest.mark.parametrize("activation", ["softmax", "log_softmax", "sparsemax", channel_softmax])
def test_a_softmax_activation_inside_a_layer_blocks_its_outputs_only(rng, activation):
    """Removing a channel before a softmax changes every other channel, so a Conv2D / Dense whose own
    activation is a softmax keeps its outputs (with the reason); the channels it reads stay prunable."""
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    x = L.Conv2D(6, 3, padding="same", activation=activation, name="soft")(x)
    x = L.Dense(5, activation=activation, name="dense_soft")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Dense(2)(x))
    randomize_biases(model, rng)
    assert set(_groups_by_layer(model)) == {("a",)}
    reasons = {g.layers: g.reason for g in tfcompress.explain(model)}
    name = getattr(activation, "__name__", activation)
    assert name in reasons[("soft",)] and name in reasons[("dense_soft",)]
    for name in ("soft", "dense_soft"):  # zeroed by hand: strip must keep them and stay exact
        kernel, bias = model.get_layer(name).get_weights()
        kernel[..., :2], bias[:2] = 0, 0
        model.get_layer(name).set_weights([kernel, bias])
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert (_width(stripped, "a"), _width(stripped, "soft"), _width(stripped, "dense_soft")) == (6, 6, 5)


def test_transpose_and_separable_convolutions(rng):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(inp)
    x = L.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.Conv2DTranspose(4, 3, name="up2")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    randomize_biases(model, rng)
    assert set(_groups_by_layer(model)) == {("up",), ("sep",), ("up2",)}
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 8, 8, 3)))
    assert stripped.get_layer("sep").depthwise_kernel.shape == (3, 3, 5, 2)
    assert stripped.get_layer("sep").pointwise_kernel.shape == (1, 1, 10, 6)
    assert stripped.get_layer("up2").kernel.shape == (3, 3, 3, 6)  # (h, w, out, in)


def test_nonzero_bias_is_folded_into_dense_consumer(rng):
    inp = keras.Input((10,))
    h = L.Dense(6, activation="sigmoid", name="h")(inp)  # a zero column outputs sigmoid(b) != 0
    model = keras.Model(inp, L.Dense(3, name="out")(h))
    randomize_biases(model, rng)
    (g,) = tfcompress.channel_groups(model)
    tfcompress.zero_channels(model, g, [2, 4])
    model.get_layer("h").bias.assign(np.linspace(-1, 1, 6).astype("float32"))  # constants, not zeros
    x = rng.normal(size=(5, 10)).astype("float32")
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert stripped.get_layer("h").kernel.shape == (10, 4)


def test_constant_channel_is_kept_where_it_cannot_be_folded(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(6, 3, padding="same", name="a")(inp)
    x = L.Conv2D(4, 3, padding="same", name="b")(x)  # 3x3 'same': a constant input is not constant at borders
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    (g, _) = tfcompress.channel_groups(model)
    tfcompress.zero_channels(model, g, [0, 1])
    bias = np.zeros(6, "float32")
    bias[0] = 0.7  # channel 0 is the constant 0.7, channel 1 is exactly 0
    model.get_layer("a").bias.assign(bias)
    x = _x(rng)
    ref = model(x)
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), ref) < TOL
    assert _width(stripped, "a") == 5


def test_nothing_zero_gives_an_equivalent_copy(rng):
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=4, alpha=0.35, classifier_activation=None
    )
    randomize_batchnorm(model, rng)
    before = [w.copy() for w in model.get_weights()]
    x = _x(rng, (2, 32, 32, 3))
    stripped = tfcompress.strip(model)
    assert stripped is not model
    assert stripped.count_params() == model.count_params()
    assert rel_error(stripped(x), model(x)) < TOL
    conv = next(layer for layer in stripped.layers if isinstance(layer, L.Conv2D))
    conv.kernel.assign(np.zeros(conv.kernel.shape))  # the copy's weights are its own
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_an_activation_layer_with_a_function_that_mixes_channels_blocks(rng):
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="a")(inp)
    y = L.Conv2D(8, 3, padding="same", name="b")(inp)
    x = L.Concatenate()([L.Activation(channel_softmax)(x), L.Activation(lambda t: 2.0 * t + 1.0)(y)])
    model = keras.Model(inp, L.Conv2D(4, 1)(x))
    assert set(_groups_by_layer(model)) == {("b",)}


def test_layers_with_a_python_function_as_activation_are_rebuilt(rng):
    """A lambda or closure as activation has no config Keras loads in safe mode; the stripped layers use the
    function itself."""
    slope = 0.3
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", activation=lambda t: keras.ops.maximum(t, slope * t), name="a")(inp)
    x = L.Activation(lambda t: t * keras.ops.sigmoid(t), name="act")(x)
    x = L.Conv2D(6, 3, padding="same", name="b")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    randomize_biases(model, rng)
    stripped = _zero_and_strip(model, rng, _x(rng))
    assert _width(stripped, "a") == 6 and stripped.get_layer("a").activation is model.get_layer("a").activation


def test_strip_does_not_modify_the_original_and_round_trips_through_save(rng, tmp_path):
    inp = keras.Input((12, 12, 3))
    x = L.BatchNormalization()(L.Conv2D(8, 3, name="c")(inp))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1)(L.ReLU()(x)))))
    model.compile(optimizer="adam", loss="mse")
    randomize_batchnorm(model, rng)
    (g, _) = tfcompress.channel_groups(model)
    tfcompress.zero_channels(model, g, [0, 3, 4])
    before = [w.copy() for w in model.get_weights()]
    stripped = tfcompress.strip(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert stripped.compiled
    stripped.save(tmp_path / "s.keras")
    again = keras.models.load_model(tmp_path / "s.keras")
    x = _x(rng)
    assert rel_error(again(x), model(x)) < TOL


def test_subclassed_model_gets_a_clear_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    for fn in (tfcompress.channel_groups, tfcompress.strip):
        with pytest.raises(UnsupportedModelError, match="subclassed"):
            fn(net)


def test_unbuilt_sequential_gets_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="input shape"):
        tfcompress.channel_groups(keras.Sequential([L.Dense(3)]))


def test_group_from_another_model_is_rejected():
    a = keras.Sequential([keras.Input((4,)), L.Dense(5, name="x"), L.Dense(2)])
    b = keras.Sequential([keras.Input((4,)), L.Dense(5, name="y"), L.Dense(2)])
    (g,) = tfcompress.channel_groups(a)
    with pytest.raises(ValueError, match="not a prunable channel group"):
        tfcompress.zero_channels(b, g, [0])


def test_engine_records_constants_for_every_tensor():
    model = keras.Sequential([keras.Input((4,)), L.Dense(5), L.ReLU(), L.Dense(2)])
    kg = build_graph(model)
    consts = kg.graph.constants()
    assert set(consts) == set(kg.graph.maps)
    assert all(np.isnan(c).all() for c in consts.values())  # random weights: nothing is constant


def test_reshape_that_keeps_the_channel_axis_passes_channels(rng):
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(8, 1, name="c")(inp)
    x = L.Reshape((16, 8), name="merge_spatial")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling1D()(L.Conv1D(3, 1)(x))))
    assert ("c",) in _groups_by_layer(model)
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 4, 4, 3)))
    assert stripped.get_layer("merge_spatial").output.shape == (None, 16, 6)


def test_flops_count_matches_hand_computation():
    model = keras.Sequential([
        keras.Input((10, 10, 3)),
        L.Conv2D(8, 3, padding="same"),          # 10*10 * 9*3 * 8
        L.DepthwiseConv2D(3, strides=2, padding="same"),  # 5*5 * 9 * 8
        L.Conv2D(4, 1, groups=2),                 # 5*5 * 1 * 8 * 4 / 2
        L.Flatten(),
        L.Dense(6),                               # 100 * 6
    ])
    macs = 100 * 27 * 8 + 25 * 9 * 8 + 25 * 8 * 4 / 2 + 100 * 6
    assert tfcompress.count_flops(model) == 2 * macs


def test_layer_normalization_over_channels_is_per_channel_and_strips_exactly(rng, tmp_path):
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(12, 3, padding="same", name="stem")(inp)
    n = L.LayerNormalization(name="ln")(a)
    h = L.Dense(16, activation="gelu", name="expand")(n)
    h = L.Dense(12, name="project")(h)
    r = L.Add()([a, h])
    out = L.Dense(4, name="head")(L.GlobalAveragePooling2D()(L.LayerNormalization(name="ln2")(r)))
    model = keras.Model(inp, out)
    randomize_biases(model, rng)
    for ln in (model.get_layer("ln"), model.get_layer("ln2")):
        ln.set_weights([rng.uniform(0.5, 1.5, 12), rng.uniform(-0.3, 0.3, 12)])
    assert set(_groups_by_layer(model)) == {("stem", "project"), ("expand",)}
    x = _x(rng, (3, 6, 6, 3))
    stripped = _zero_and_strip(model, rng, x)
    assert type(stripped.get_layer("ln")).__name__ == "PartialLayerNormalization"
    assert stripped.get_layer("ln").gamma.shape[0] == 9 and stripped.get_layer("expand").units == 12
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x), stripped(x))
    # a second strip of the stripped model keeps the statistics of the original channels
    again = _zero_and_strip(stripped, rng, x)
    assert again.get_layer("ln").gamma.shape[0] < 9


def test_layer_normalization_without_scale_blocks_the_channels_it_reads(rng):
    """Without gamma nothing can zero a LayerNormalization's output channel: a zeroed input channel still
    comes out as ``(0 - mean) / std`` (+ beta), which varies with the input, so no channel could ever be
    stripped; pruning them would only cost accuracy (and report FLOPs it does not save)."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    b = L.Conv2D(8, 3, padding="same", name="b")(inp)
    x = L.Concatenate()([L.LayerNormalization(scale=False, name="ln")(a), L.LayerNormalization(name="ln_ok")(b)])
    model = keras.Model(inp, L.Conv2D(4, 1)(x))
    assert set(_groups_by_layer(model)) == {("b",)}
    assert "ln" in {g.layers: g.reason for g in tfcompress.explain(model)}[("a",)]


def _normalized_block(norm, rng, width=12):
    """stem conv -> ``norm`` -> conv -> head, with random biases and random (positive) norm weights."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(width, 3, padding="same", name="stem")(inp)
    h = L.Conv2D(8, 1, name="mix")(norm()(a))
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(h)))
    randomize_biases(model, rng)
    layer = model.get_layer("norm")
    layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if "beta" not in w.path else rng.uniform(-0.3, 0.3, w.shape)
                       for w in layer.weights])
    return model


@pytest.mark.parametrize("norm, partial", [
    (lambda: L.GroupNormalization(groups=4, name="norm"), "PartialGroupNormalization"),
    (lambda: L.GroupNormalization(groups=-1, name="norm"), "PartialGroupNormalization"),  # instance norm
    (lambda: L.GroupNormalization(groups=1, name="norm"), "PartialGroupNormalization"),
    (lambda: L.RMSNormalization(name="norm"), "PartialRMSNormalization"),
    (lambda: L.UnitNormalization(name="norm"), "PartialUnitNormalization"),
])
def test_normalizations_over_channels_strip_exactly_and_reload(norm, partial, rng, tmp_path):
    """Their statistics read every channel (of a group): the stripped layer still counts the removed ones, so
    the stripped model computes what the pruned one did; it saves, reloads, and strips again."""
    model = _normalized_block(norm, rng)
    assert set(_groups_by_layer(model)) == {("stem",), ("mix",)}
    x = _x(rng, (3, 6, 6, 3))
    stripped = _zero_and_strip(model, rng, x, fraction=0.3)
    assert type(stripped.get_layer("norm")).__name__ == partial
    assert _width(stripped, "norm") == 9
    stripped.save(tmp_path / "m.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "m.keras")(x), stripped(x))
    again = _zero_and_strip(stripped, rng, x, fraction=0.3)
    assert _width(again, "norm") == 7


def test_group_normalization_counts_removed_constant_channels_in_their_own_group(rng):
    """Channels 1 and 6 of the stem are constants (zero filters, non-zero biases) whose normalized outputs are
    constants too (gamma 0, beta not): they are removed, and groups 0 and 1 then hold different numbers of
    channels; each group's statistics still count its constant, over every position."""
    model = _normalized_block(lambda: L.GroupNormalization(groups=3, name="norm"), rng)
    stem, norm = model.get_layer("stem"), model.get_layer("norm")
    kernel, bias = (w.numpy() for w in stem.weights)
    kernel[..., [1, 6]] = 0.0
    bias[[1, 6]] = [0.7, -1.3]
    stem.set_weights([kernel, bias])
    gamma, beta = (w.numpy() for w in norm.weights)
    gamma[[1, 6]] = 0.0
    norm.set_weights([gamma, beta])
    x = _x(rng, (3, 6, 6, 3))
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    layer = stripped.get_layer("norm")
    assert layer.channel_groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert layer.removed_values == [[pytest.approx(0.7)], [pytest.approx(-1.3)], []]


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("norm", [
    lambda: L.GroupNormalization(groups=4, scale=False, name="norm"),  # (0 - mean) / std + beta varies
    lambda: L.LayerNormalization(rms_scaling=True, name="norm"),
])
def test_normalizations_that_cannot_lose_a_channel_block_it(norm, rng):
    assert ("stem",) not in _groups_by_layer(_normalized_block(norm, rng))


def test_layer_normalization_over_other_axes_blocks(rng):
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    n = L.LayerNormalization(axis=(1, 2, 3))(a)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(L.Conv2D(4, 1, name="b")(n))))
    assert ("a",) not in _groups_by_layer(model)


def test_grouped_conv_with_one_channel_per_group_is_depthwise(rng):
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    d = L.Conv2D(16, 3, groups=8, padding="same", name="dw")(a)  # multiplier 2
    out = L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="b")(d)))
    model = keras.Model(inp, out)
    randomize_biases(model, rng)
    assert ("a",) in _groups_by_layer(model)
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 8, 8, 3)))
    assert stripped.get_layer("dw").groups == 6 and stripped.get_layer("dw").filters == 12


class _ChannelScale(L.Layer):
    """A custom per-channel scale (like ConvNeXt's LayerScale), weight created without a name."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def build(self, shape):
        self.scale = self.add_weight(shape=(self.channels,), initializer="ones")

    def call(self, x):
        return x * self.scale + 0.0

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


def test_register_layer_declares_a_custom_layers_channel_rule(rng, monkeypatch):
    from tfcompress.graph import custom_layers

    monkeypatch.setattr(custom_layers, "_REGISTRY", dict(custom_layers._REGISTRY))
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    s = _ChannelScale(8, name="scale")(a)
    out = L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="b")(s)))
    model = keras.Model(inp, out)
    model.get_layer("scale").scale.assign(rng.uniform(0.5, 2, 8).astype("float32"))
    assert ("a",) not in _groups_by_layer(model)  # unknown custom layer: blocked
    tfcompress.register_layer(_ChannelScale, "elementwise", channel_weights=["scale"],
                              resize_config=lambda cfg, n: {**cfg, "channels": n})
    assert ("a",) in _groups_by_layer(model)
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 6, 6, 3)))
    assert stripped.get_layer("scale").channels == 6
    with pytest.raises(ValueError, match="'sideways'"):
        tfcompress.register_layer(_ChannelScale, "sideways")
    with pytest.raises(ValueError, match="Layer subclass"):
        tfcompress.register_layer(int)


class _HardSwish(L.Layer):
    """A custom hard-swish, declared as the table's ``hard_silu``."""

    def call(self, x):
        return x * keras.ops.relu6(x + 3.0) / 6.0


class _Cap(L.Layer):
    """A custom cap whose bound is in its config, declared as the table's ``clip`` with parameters."""

    def __init__(self, cap=6.0, **kwargs):
        super().__init__(**kwargs)
        self.cap = cap

    def call(self, x):
        return keras.ops.clip(x, 0.0, self.cap)

    def get_config(self):
        return {**super().get_config(), "cap": self.cap}


def test_register_layer_against_a_canonical_op(rng, monkeypatch):
    """A custom layer declared as an op of the table: constants go through the table's semantics (equal to the
    layer's own call), so zeroed channels whose constant passes through it fold into the next conv and go."""
    from tfcompress.graph import custom_layers

    monkeypatch.setattr(custom_layers, "_REGISTRY", dict(custom_layers._REGISTRY))
    tfcompress.register_layer(_HardSwish, op="hard_silu")
    tfcompress.register_layer(_Cap, op="clip", params=lambda layer: {"x_min": 0.0, "x_max": layer.cap})
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    c = _Cap(2.5, name="cap")(_HardSwish(name="hs")(a))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="b")(c))))
    randomize_biases(model, rng)
    kinds = build_graph(model).kinds
    v = rng.uniform(-5, 5, 8)
    for name in ("hs", "cap"):
        expected = np.asarray(model.get_layer(name)(v[None].astype("float32")))[0]
        assert np.allclose(kinds[name].const_out([v])[0], expected, atol=1e-5)
    assert ("a",) in _groups_by_layer(model)
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 6, 6, 3)))
    assert _width(stripped, "a") == 6
    for bad in ("conv", "nope"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            tfcompress.register_layer(_Cap, op=bad)
    with pytest.raises(ValueError, match="params"):
        tfcompress.register_layer(_Cap, op="clip", params={"x_max": 1.0})


def split_model(rng, shape):
    """A convolution ``up`` added to a concatenation, as in Inception-ResNet's blocks and NASNet's cells.

    ``shape``: "cat+up" (Concatenate of three convolutions, then Add), "up+cat" (the same, Add's inputs swapped),
    "nested" (a Concatenate of a Concatenate and a convolution), "cat+cat" (two concatenations whose parts do
    not line up: 4+6 against 6+4). A second residual convolution ``up2`` is then added to the sum.
    Returns the model and the expected groups as {frozenset of layers: size}.
    """
    inp = keras.Input((10, 10, 3))
    stem = L.Conv2D(6, 3, padding="same", name="stem")(inp)
    b = [L.Conv2D(w, k, padding="same", name=f"b{i}")(stem) for i, (w, k) in enumerate([(4, 1), (6, 3), (2, 1)])]
    expected = {("b0", "up", "up2"): 4, ("b1", "up", "up2"): 6, ("b2", "up", "up2"): 2}
    if shape == "cat+cat":
        c = [L.Conv2D(w, 1, name=f"c{i}")(stem) for i, w in enumerate([6, 4])]
        left, right = L.Concatenate()(b[:2]), L.Concatenate()(c)
        expected = {("b0", "c0", "up2"): 4, ("b1", "c0", "up2"): 2, ("b1", "c1", "up2"): 4}
    else:
        cat = L.Concatenate(name="cat")([L.Concatenate()(b[:2]), b[2]] if shape == "nested" else b)
        cat = L.BatchNormalization()(cat)
        up = L.Conv2D(12, 1, name="up")(L.ReLU()(stem))
        left, right = (up, cat) if shape == "up+cat" else (cat, up)
    x = L.ReLU()(L.BatchNormalization()(L.Add(name="add")([left, right])))
    x = L.Add(name="add2")([x, L.Conv2D(x.shape[-1], 1, name="up2")(x)])
    out = L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="head")(L.ReLU()(x))))
    model = keras.Model(inp, out)
    randomize_batchnorm(model, rng)
    randomize_biases(model, rng)
    return model, {frozenset(k): v for k, v in expected.items()}


@pytest.mark.parametrize("shape", ["cat+up", "up+cat", "nested", "cat+cat"])
def test_convolution_added_to_a_concatenation_splits_into_one_group_per_part(rng, shape):
    model, expected = split_model(rng, shape)
    groups = {frozenset(g.layers): g.size for g in tfcompress.channel_groups(model)}
    assert {k: v for k, v in groups.items() if k & {"up", "up2"}} == expected
    assert all(not g.reason for g in tfcompress.explain(model) if {"up", "up2"} & set(g.layers))
    stripped = _zero_and_strip(model, rng, _x(rng, (3, 10, 10, 3)))
    assert stripped.count_params() < model.count_params()
    assert _width(stripped, "add") == (7 if shape == "cat+cat" else 9)  # one channel of each group went


def test_squeeze_and_excite_on_a_concatenation_splits_the_excite_layer(rng):
    inp = keras.Input((8, 8, 3))
    cat = L.Concatenate()([L.Conv2D(4, 3, padding="same", name="a")(inp), L.Conv2D(6, 1, name="b")(inp)])
    se = L.Conv2D(3, 1, activation="relu", name="squeeze")(L.GlobalAveragePooling2D(keepdims=True)(cat))
    x = L.Multiply()([cat, L.Conv2D(10, 1, activation="sigmoid", name="excite")(se)])
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(5, 1, name="head")(x))))
    randomize_biases(model, rng)
    groups = {frozenset(g.layers): g.size for g in tfcompress.channel_groups(model)}
    assert groups[frozenset({"a", "excite"})] == 4 and groups[frozenset({"b", "excite"})] == 6
    stripped = _zero_and_strip(model, rng, _x(rng, (2, 8, 8, 3)))
    assert stripped.get_layer("excite").kernel.shape == (1, 1, 2, 8)  # squeeze 3 -> 2, excite 4+6 -> 3+5


def test_a_join_that_cannot_be_split_to_line_up_stays_blocked_with_a_reason(rng):
    """A depthwise output (each channel twice) or a grouped convolution's output added to a concatenation."""
    inp = keras.Input((6, 6, 3))
    a, b, c, d, e = (L.Conv2D(4, 1, name=n)(inp) for n in "abcde")
    dw = L.DepthwiseConv2D(1, depth_multiplier=2, name="dw")(L.Conv2D(4, 1, name="f")(inp))
    grouped = L.Conv2D(8, 1, groups=2, name="grouped")(L.Conv2D(4, 1, name="g")(inp))
    s = L.Add(name="add")([L.Concatenate()([a, b]), dw])
    s2 = L.Add(name="add2")([L.Concatenate()([c, d]), grouped])
    out = L.Concatenate()([L.Conv2D(4, 1, name="h")(s), L.Conv2D(4, 1, name="i")(s2), e])
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(out)))
    reasons = {g.layers: g.reason for g in tfcompress.explain(model)}
    for layers in [("a",), ("b",), ("f",), ("c",), ("d",), ("grouped",)]:
        assert "do not line up" in reasons[layers], layers
    assert reasons[("g",)] == reasons[("e",)] == reasons[("h",)] == reasons[("i",)] == ""
    _zero_and_strip(model, rng, _x(rng, (2, 6, 6, 3)))


def test_pruning_ranks_the_part_of_a_split_convolution_that_belongs_to_each_group(rng):
    from tfcompress.pruning.masking import GroupMasks

    model, _ = split_model(rng, "cat+up")
    kg = build_graph(model)
    g = next(g for g in kg.groups() if "b1" in g.layers)  # channels 4:10 of up's and up2's 12 filters
    masks = GroupMasks(kg, kg.groups())
    assert [r.shape for r in masks.filters(g)] == [(6, 6 * 9), (6, 6), (6, 12)]  # b1 (3x3x6), up, up2 rows
    up = model.get_layer("up")
    kernel = up.kernel.numpy()
    kernel[..., 4 + 3] = 0.0  # up's filter for channel 3 of the group
    up.kernel.assign(kernel)
    assert np.nonzero(masks.zero_channels(g))[0].tolist() == []
    tfcompress.zero_channels(model, g, [3], graph=kg, compensate=False)
    assert np.nonzero(masks.zero_channels(g))[0].tolist() == [3]


def test_explain_gives_every_unprunable_group_a_reason():
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 1, name="a")(inp)
    b = L.Conv2D(8, 1, name="b")(inp)
    mixed = L.Lambda(lambda t: t[..., ::-1], name="mixer")(a)  # unknown layer
    c = L.Conv2D(4, 1, name="c")(L.Concatenate()([mixed, b]))
    one = L.Conv2D(1, 1, name="one")(c)
    res = L.Add()([L.Conv2D(3, 1, name="res")(inp), inp])  # joined with the model input
    out = L.Dense(3, name="head")(L.Flatten()(one))
    model = keras.Model(inp, [out, L.GlobalAveragePooling2D()(L.Conv2D(2, 1, name="r2")(res))])
    groups = {g.layers: g for g in tfcompress.explain(model)}
    assert groups[("res",)].reason.startswith("joined with the untracked output of 'input:")
    assert groups[("b",)].reason == "" and groups[("c",)].reason == ""
    assert "mixer" in groups[("a",)].reason
    assert groups[("one",)].reason == "a single channel"
    assert groups[("head",)].reason == "they are a model output"
    prunable = {g.layers for g in tfcompress.channel_groups(model)}
    assert prunable == {layers for layers, g in groups.items() if not g.reason}


# --------------------------------------------------------------------------- the op table (graph/ops.py)

@pytest.mark.parametrize("op, layer", [("add", L.Add), ("sub", L.Subtract), ("mul", L.Multiply),
                                       ("max", L.Maximum), ("min", L.Minimum), ("mean", L.Average)])
def test_op_table_joins_match_keras(rng, op, layer):
    """The table's constant propagation of a join equals the Keras layer run on per-channel constants."""
    from tfcompress.graph import ops

    a, b = rng.uniform(-2, 2, 6), rng.uniform(-2, 2, 6)
    a[0] = b[1] = 0.0
    x = [np.broadcast_to(v, (1, 4, 4, 6)).astype("float32") for v in (a, b)]
    out = np.asarray(layer()(x))
    assert np.allclose(out, ops.const_out(op, [a, b]), atol=1e-6)


def test_op_table_zero_absorbs_an_unknown_in_a_product():
    from tfcompress.graph import ops

    a, b = np.array([0.0, 2.0, np.nan]), np.array([np.nan, np.nan, 3.0])
    out = ops.const_out("mul", [a, b])
    assert out[0] == 0.0 and np.isnan(out[1:]).all()


def test_op_table_batchnorm_matches_keras(rng):
    """A constant input through a BatchNormalization (one gamma exactly 0) as Keras computes it."""
    from tfcompress.graph import ops

    bn = L.BatchNormalization(epsilon=1e-3)
    bn.build((None, 5))
    gamma, beta = rng.uniform(0.5, 2, 5), rng.uniform(-1, 1, 5)
    mean, var = rng.uniform(-1, 1, 5), rng.uniform(0.5, 2, 5)
    gamma[2] = 0.0
    bn.set_weights([gamma, beta, mean, var])
    c = rng.uniform(-2, 2, 5)
    c[2] = np.nan  # an unknown channel under gamma 0 is the constant beta
    expected = np.asarray(bn(np.nan_to_num(c)[None].astype("float32"), training=False))[0]
    out = ops.const_out("batchnorm", [c], gamma=gamma, beta=beta, mean=mean, var=var, epsilon=1e-3)
    assert np.allclose(out, expected, atol=1e-5)


def test_op_table_conv_macs_match_counted_flops():
    """count_flops of a grouped conv + dense model is 2 x the table's MACs, which are the textbook products."""
    model = keras.Sequential([keras.Input((10, 10, 8)), L.Conv2D(12, 3, groups=4), L.Flatten(), L.Dense(5)])
    conv = 8 * 8 * 9 * 8 * 12 / 4
    dense = 8 * 8 * 12 * 5
    assert tfcompress.count_flops(model) == 2 * (conv + dense)


def _snake(name):
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")


def _call_raw(raw, t):
    """A unary ``tf.raw_ops`` op on ``t``, whatever its input argument is named."""
    for arg in ("x", "features", "input"):
        try:
            return raw(**{arg: t})
        except TypeError:
            continue
    raise TypeError(raw)


def _activation_values(rng):
    return np.concatenate([[0.0, -1.0, 1.0, 3.0, -3.0, 7.0], rng.uniform(-4, 4, 10)])


_KERAS_ACTIVATIONS = ("relu", "relu6", "elu", "selu", "celu", "sigmoid", "hard_sigmoid", "silu", "hard_silu",
                      "gelu", "mish", "tanh", "softplus", "softsign", "log_sigmoid", "exponential", "leaky_relu",
                      "linear")


def test_op_table_activations_match_keras(rng):
    """Each Keras activation the Keras adapter maps to the table computes what Keras computes."""
    from tfcompress.graph import keras_kinds, ops

    v = _activation_values(rng)
    for name in _KERAS_ACTIVATIONS:
        op, params = keras_kinds.activation_op(name)
        assert op == name
        expected = np.asarray(keras.activations.get(name)(v.astype("float32")))
        assert np.allclose(ops.const_out(op, [v], **params), expected, rtol=1e-5, atol=1e-5), name


def test_op_table_matches_the_keras_ops_and_tf_ops_the_adapters_map_to_it(rng):
    """Every unary ``keras.ops`` node and TF op the adapters translate into the table agrees with Keras /
    TensorFlow, through the adapter (parameters read from the node), on positive and negative inputs."""
    import tensorflow as tf
    from tfcompress.graph import graphdef_adapter, keras_adapter, ops

    v = np.abs(_activation_values(rng)) + 0.1
    positive_only = {"sqrt", "rsqrt", "log"}
    checked = 0
    for cls, op in keras_adapter._POINTWISE_OPS.items():
        fn = getattr(keras.ops, _snake(cls), None)
        if op not in ops.UNARY or op in ("clip", "linear") or fn is None:
            continue
        inp = keras.Input((v.size,))
        kind = build_graph(keras.Model(inp, fn(inp))).records[-1].kind
        assert kind.op == op
        for x in (v,) if op in positive_only else (v, -v):
            expected = np.asarray(fn(x[None].astype("float32")))[0]
            assert np.allclose(kind.const_out([x])[0], expected, rtol=1e-5, atol=1e-5, equal_nan=True), (cls, op)
        checked += 1
    for tf_op, op in graphdef_adapter._UNARY.items():
        raw = getattr(tf.raw_ops, tf_op)
        for x in (v,) if op in positive_only else (v, -v):
            t = tf.constant(x.astype("float32"))
            out = raw(x=t, DstT=tf.float32) if tf_op == "Cast" else _call_raw(raw, t)
            expected = np.asarray(out)
            assert np.allclose(ops.const_out(op, [x]), expected, rtol=1e-5, atol=1e-5, equal_nan=True), (tf_op, op)
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("shared_axes, removed", [([1, 2], 2), (None, 0)])
def test_prelu_passes_constants_when_alpha_is_shared_over_space(rng, shared_axes, removed):
    """A conv filter zeroed without its (negative) bias gives a constant through PReLU only when alpha is the
    same at every position; the constant folds into the 1x1 conv after it and the channel goes. Per-position
    alphas keep it."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    p = L.PReLU(shared_axes=shared_axes, name="prelu")(a)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="b")(p))))
    alpha = model.get_layer("prelu").alpha
    alpha.assign(rng.uniform(0.1, 0.5, alpha.shape).astype("float32"))
    conv = model.get_layer("a")
    conv.bias.assign(-rng.uniform(0.1, 1.0, 8).astype("float32"))
    kernel = np.asarray(conv.kernel)
    kernel[..., [1, 4]] = 0.0
    conv.kernel.assign(kernel)
    x = _x(rng, (2, 6, 6, 3))
    stripped = tfcompress.strip(model)
    assert rel_error(stripped(x), model(x)) < TOL
    assert _width(stripped, "a") == 8 - removed


def test_only_single_kernel_producers_take_a_folded_channel_into_their_bias():
    """Compensation asks the op table, not Keras classes, which consumers can absorb a removed channel's value."""
    from tfcompress.graph import ops
    assert ops.folds_into_bias("conv") and ops.folds_into_bias("dense")
    for op in ("conv_transpose", "separable_conv", "depthwise", "batchnorm", "add", "no_such_op"):
        assert not ops.folds_into_bias(op), op
