"""Quantization-aware twins of every Keras convolution kind (1D, 2D, 3D; plain, depthwise, separable, transposed):
each twin trains, saves and loads exactly, and its exported model runs INT8 in OpenVINO."""

import warnings

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

import tfcompress
from tfcompress import calibration
from tfcompress.export import export_saved_model
from tfcompress.quantization import ActivationQuantizer, RangeInit, quantize_model
from conftest import assert_int8_where_the_cpu_can, rel_error

def temporal_net():
    """Every 1D kind: a causal dilated Conv1D, depthwise, separable and transposed 1D convolutions."""
    inp = keras.Input((32, 6), name="signal")
    x = L.Conv1D(8, 3, padding="causal", dilation_rate=2, activation="relu", name="conv")(inp)
    x = L.ReLU()(L.BatchNormalization(name="bn")(L.DepthwiseConv1D(3, padding="same", depth_multiplier=2,
                                                                    name="dw")(x)))
    x = L.SeparableConv1D(12, 3, padding="same", activation="relu", name="sep")(x)
    x = L.Conv1DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(L.GlobalAveragePooling1D()(x)))


def volume_net():
    """The 3D kinds: Conv3D and Conv3DTranspose."""
    inp = keras.Input((6, 6, 6, 3), name="volume")
    x = L.Conv3D(8, 3, strides=2, padding="same", activation="relu", name="conv")(inp)
    x = L.Conv3DTranspose(6, 3, strides=2, padding="same", activation="relu", name="up")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(L.GlobalAveragePooling3D()(x)))


def attention_net():
    """Token features, self-attention (query and value by name, value_dim != key_dim) around a residual add, an
    EinsumDense feed-forward layer."""
    inp = keras.Input((10, 6), name="tokens")
    x = L.Dense(16, name="embed")(inp)
    x = x + L.MultiHeadAttention(2, 8, value_dim=6, name="mha")(query=x, value=x)
    x = L.EinsumDense("abc,cd->abd", (None, 12), bias_axes="d", activation="relu", name="ffn")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(L.GlobalAveragePooling1D()(x)))


# model, its input shape, the twin each weighted layer becomes, and the layers OpenVINO runs with weights
# (a separable convolution runs as two, a MultiHeadAttention's four projections as four)
NETS = {
    "attention": (attention_net, (10, 6), {"embed": "QuantDense", "mha": "QuantMultiHeadAttention",
                                           "ffn": "QuantEinsumDense", "logits": "QuantDense"}, 7),
    "1d": (temporal_net, (32, 6), {"conv": "QuantConv1D", "dw": "QuantDepthwiseConv1D",
                                   "sep": "QuantSeparableConv1D", "up": "QuantConv1DTranspose",
                                   "logits": "QuantDense"}, 6),
    "3d": (volume_net, (6, 6, 6, 3), {"conv": "QuantConv3D", "up": "QuantConv3DTranspose", "logits": "QuantDense"},
           3),
}


def trained_qat(name, rng):
    """The QAT model of ``NETS[name]`` after a few steps on random data (ranges from data via RangeInit)."""
    build, shape, _, _ = NETS[name]
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weighted layer has a twin: nothing left in float
        q = quantize_model(model)
    x = rng.normal(size=(64, *shape)).astype("float32")
    q.compile(keras.optimizers.Adam(1e-3), "mse")
    q.fit(x, rng.normal(size=(64, 4)), epochs=1, batch_size=16, callbacks=[RangeInit(2)], verbose=0)
    return model, q, x


@pytest.mark.parametrize("name", sorted(NETS))
def test_twins_train_and_save_exactly(name, rng, tmp_path):
    _, _, twins, _ = NETS[name]
    model, q, x = trained_qat(name, rng)
    assert {n: type(q.get_layer(n)).__name__ for n in twins} == twins
    # the channel engine sees each twin as its Keras class: the same prunable groups
    assert [g.layers for g in tfcompress.channel_groups(q)] == [g.layers for g in tfcompress.channel_groups(model)]
    # the inputs of every twin are quantized
    for n in twins:
        assert all(isinstance(t._keras_history[0], ActivationQuantizer)
                   for t in q.get_layer(n)._inbound_nodes[0].input_tensors), n
    q.save(tmp_path / "q.keras")
    again = keras.saving.load_model(tmp_path / "q.keras")
    assert {n: type(again.get_layer(n)).__name__ for n in twins} == twins
    np.testing.assert_array_equal(again(x), q(x))
    for n in twins:
        assert again.get_layer(n).get_config() == q.get_layer(n).get_config()


def int8_reference(kernel, out_axes, half_range: bool):
    """Symmetric per-output-channel rounding in NumPy: the output channels are ``out_axes`` of the kernel
    (flattened in order), each on the grid of its abs-max / 127, or with ``half_range`` (the overflow fix) of its
    abs-max / 63.5 with integers clipped to [-63, 63]."""
    k = np.moveaxis(kernel, out_axes, list(range(kernel.ndim - len(out_axes), kernel.ndim)))
    flat = k.reshape(-1, int(np.prod(k.shape[kernel.ndim - len(out_axes):])))
    step = np.abs(flat).max(0) / (63.5 if half_range else 127)
    top = 63 if half_range else 127
    q = (np.clip(np.round(flat / step), -top, top) * step).reshape(k.shape)
    return np.moveaxis(q, list(range(kernel.ndim - len(out_axes), kernel.ndim)), out_axes)


# the kernel axes of each layout that are output channels
OUT_AXES = {"QuantConv1D": [-1], "QuantConv3D": [-1], "QuantDense": [-1], "QuantDepthwiseConv1D": [-2, -1],
            "QuantConv1DTranspose": [-2], "QuantConv3DTranspose": [-2], "QuantEinsumDense": [-1]}


@pytest.mark.parametrize("name", sorted(NETS))
def test_each_twin_computes_its_keras_layer_on_int8_weights(name, rng):
    """Every twin (but the separable one, whose intermediate quantizer test_qat checks) gives its Keras base
    layer's output with each output channel's weights rounded to the symmetric int8 grid (7 bits for the
    first layer: the overflow fix)."""
    _, _, twins, _ = NETS[name]
    _, q, _ = trained_qat(name, rng)
    for n, twin in twins.items():
        if twin not in OUT_AXES:
            continue
        layer = q.get_layer(n)
        keras_class = next(c for c in type(layer).__mro__ if c.__module__.startswith("keras."))
        cfg = {k: v for k, v in layer.get_config().items() if k not in ("per_channel", "half_range")}
        x = rng.normal(size=(4, *layer.input.shape[1:])).astype("float32")
        weights = [w.numpy() for w in layer.weights]
        on_grid, in_float = keras_class.from_config(cfg), keras_class.from_config(cfg)
        for base in (on_grid, in_float):
            base.build(x.shape)
        in_float.set_weights(weights)
        on_grid.set_weights([int8_reference(weights[0], OUT_AXES[twin], layer.half_range),
                             *weights[1:]])
        np.testing.assert_allclose(layer(x), on_grid(x), atol=1e-5, err_msg=n)
        assert np.abs(np.asarray(layer(x)) - np.asarray(in_float(x))).max() > 1e-5, n  # the rounding is there


def _einsum_on_grid(dense, x, out_axes):
    """``dense`` (a QuantEinsumDense) as a Keras EinsumDense on its kernel rounded by ``int8_reference``."""
    cfg = {k: v for k, v in dense.get_config().items() if k not in ("per_channel", "half_range")}
    ref = L.EinsumDense.from_config(cfg)
    ref.build(x.shape)
    weights = [w.numpy() for w in dense.weights]
    ref.set_weights([int8_reference(weights[0], out_axes, dense.half_range), *weights[1:]])
    return ref(x)


def test_attention_projections_round_per_output_unit(rng):
    """Each projection of the attention twin computes its EinsumDense on its kernel rounded per output unit:
    per (head, dimension) for the query / key / value kernels (in, heads, dims), per output channel for the
    output projection's (heads, dims, out), the columns of the fully connected layers OpenVINO makes of them.
    An equation whose kernel has its output axis first is rounded along that axis."""
    _, q, _ = trained_qat("attention", rng)
    mha = q.get_layer("mha")
    for dense, out_axes in ((mha.query_dense, [1, 2]), (mha.key_dense, [1, 2]), (mha.value_dense, [1, 2]),
                            (mha.output_dense, [2])):
        rows = tuple(dense.kernel.shape[:-len(out_axes)])
        x = rng.normal(size=(3, 10, *rows)).astype("float32")
        np.testing.assert_allclose(dense(x), _einsum_on_grid(dense, x, out_axes), atol=1e-5)
    transposed = tfcompress.quantization.QuantEinsumDense("abc,dc->abd", (None, 5), bias_axes="d")
    x = rng.normal(size=(2, 4, 7)).astype("float32")
    transposed.build(x.shape)
    np.testing.assert_allclose(transposed(x), _einsum_on_grid(transposed, x, [0]), atol=1e-5)


@pytest.mark.parametrize("reader", ["attention", "recurrent"])
def test_quantizers_keep_the_padding_mask(reader, rng):
    """A padding mask reaches MultiHeadAttention through the quantizers put on the way (Keras reads it off the
    query tensor) and the LSTM (its call is given the mask) as in the float model, so the QAT model, its weights
    the float model's, follows the masked float model within quantization error, far closer than the same model
    without the mask."""
    def model(mask_zero):
        keras.utils.set_random_seed(1)
        inp = keras.Input((12,), dtype="int32")
        x = L.Dense(16, name="embed")(L.Embedding(40, 8, mask_zero=mask_zero)(inp))
        if reader == "attention":
            x = L.GlobalAveragePooling1D()(x + L.MultiHeadAttention(2, 8, name="mha")(x, x))
        else:
            x = L.LSTM(8, name="lstm")(x)
        return keras.Model(inp, L.Dense(3)(x))

    masked, unmasked = model(True), model(False)
    tokens = np.where(np.arange(12) < rng.integers(2, 8, (32, 1)), rng.integers(1, 40, (32, 12)), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LSTM stays float
        q = quantize_model(masked)
    q.compile(keras.optimizers.SGD(0.0), "mse")  # ranges from data, weights as the float model's
    q.fit(tokens, np.zeros((32, 3)), epochs=1, batch_size=32, callbacks=[RangeInit(1)], verbose=0)
    if reader == "attention":
        assert isinstance(q.get_layer("mha"), tfcompress.quantization.QuantMultiHeadAttention)
    error = rel_error(q(tokens), masked(tokens))
    assert error < 0.1 and error < rel_error(unmasked(tokens), masked(tokens)) / 3


@pytest.mark.parametrize("name", sorted(NETS))
def test_twins_export_and_run_int8_in_openvino(name, rng, tmp_path):
    """model.export, then export_saved_model without calibration data: every weighted layer of the compiled
    IR runs INT8 (reads 8-bit data; on a CPU without AVX-512, the dynamic-batch transposed convolution runs in
    float whatever the IR, and int8_layers must count it so), and the IR's outputs follow the Keras QAT model's.
    The causal Conv1D reads the signed input through an explicit Pad: INT8 on every CPU only with the
    quantizer after that Pad (``quantize_after_signed_pads``)."""
    _, _, _, weighted = NETS[name]
    _, q, x = trained_qat(name, rng)
    q.export(str(tmp_path / "sm"), verbose=False)
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), verbose=False)
    assert report["quantized"]
    compiled = ov.Core().compile_model(str(tmp_path / "out" / "model_fp32.xml"), "CPU")
    assert_int8_where_the_cpu_can(compiled, total=weighted)
    out = compiled({0: x[:32]})[compiled.outputs[0]]
    assert rel_error(out, q.predict(x[:32], verbose=0)) <= 0.15  # the export's tolerance for quantized graphs


def upsampling_net():
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(inp)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same", activation="relu", name="up")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(x)))


def weighted_ops(ov_model) -> int:
    """The ops of an OpenVINO model that have weights and an INT8 kernel (constant-weight matrix products)."""
    kinds = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")
    return sum(op.get_type_name() in kinds or op.get_type_name() == "MatMul"
               and op.input(1).get_source_output().get_node().get_type_name() != "Parameter"
               for op in ov_model.get_ordered_ops())


def test_int8_layers_counts_transposed_convolutions(rng, tmp_path):
    """calibration.int8_layers counts a transposed convolution (runtime type Deconvolution) among the
    quantizable layers, and among the INT8 ones once it runs INT8: after post-training calibration and after QAT."""
    model = upsampling_net()
    x = rng.uniform(0, 1, (32, 8, 8, 3)).astype("float32")
    model.export(str(tmp_path / "float"), verbose=False)
    core = ov.Core()
    float_ir = ov.convert_model(str(tmp_path / "float"))
    assert weighted_ops(float_ir) == 3
    assert calibration.int8_layers(core.compile_model(float_ir, "CPU")) == {"int8": 0, "total": 3}
    calibrated = calibration.calibrate(float_ir, x, verbose=False)
    assert_int8_where_the_cpu_can(core.compile_model(calibrated, "CPU"), total=3)
    q = quantize_model(model)
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(32, 4)), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    q.export(str(tmp_path / "qat"), verbose=False)
    for ir in (calibrated, ov.convert_model(str(tmp_path / "qat"))):
        assert_int8_where_the_cpu_can(core.compile_model(ir, "CPU"), total=3)
        ir.reshape([1, 8, 8, 3])  # static shapes: the transposed convolution runs INT8 on every CPU
        assert calibration.int8_layers(core.compile_model(ir, "CPU")) == {"int8": 3, "total": 3}


@keras.saving.register_keras_serializable(package="tests")
class LayerScale(L.Layer):
    """ConvNeXt's learned per-channel scale of a block's output."""

    def __init__(self, init=0.1, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init))

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "init": self.init}


def convnext_like():
    """A ConvNeXt block (depthwise 7x7, LayerNormalization, an MLP with GELU, a layer scale, a residual add)
    followed by self-attention over the positions and a LayerNormalization head."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.LayerNormalization(epsilon=1e-6, name="stem_ln")(L.Conv2D(16, 4, strides=4, name="stem")(inp))
    y = L.LayerNormalization(epsilon=1e-6, name="ln")(L.DepthwiseConv2D(7, padding="same", name="dw")(x))
    y = L.Activation("gelu", name="gelu")(L.Dense(64, name="pw1")(y))
    x = L.Add(name="res")([x, LayerScale(name="scale")(L.Dense(16, name="pw2")(y))])
    t = L.Reshape((16, 16), name="tokens")(x)
    t = t + L.MultiHeadAttention(2, 8, name="mha")(t, t)
    t = L.LayerNormalization(name="head_ln")(L.GlobalAveragePooling1D(name="pool")(t))
    return keras.Model(inp, L.Dense(5, name="logits")(t))


def test_layers_qat_cannot_place_stay_float_with_one_warning(rng, tmp_path):
    model = convnext_like()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize_model(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    float_layers = {"stem_ln": "LayerNormalization", "ln": "LayerNormalization", "scale": "LayerScale",
                    "head_ln": "LayerNormalization"}
    for name, kind in float_layers.items():
        assert f"{name} ({kind})" in messages[0], messages[0]
    assert not any(n in messages[0] for n in ("stem ", "dw ", "pw1", "pw2", "logits", "gelu", "mha"))
    assert type(q.get_layer("mha")).__name__ == "QuantMultiHeadAttention"
    # the graph is the float model's: the same layers in the same order, each float one with its own weights,
    # the quantized ones as twins, quantizers only added between them
    same = [layer for layer in q.layers if not isinstance(layer, ActivationQuantizer)]
    assert [layer.name for layer in same] == [layer.name for layer in model.layers]
    for name, kind in float_layers.items():
        assert type(q.get_layer(name)).__name__ == kind
        for a, b in zip(q.get_layer(name).weights, model.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert type(q.get_layer("gelu")) is L.Activation and q.get_layer("gelu").activation is keras.activations.gelu
    # both operands of each residual (the block's layers.Add, and the ``t + attention`` around the attention)
    # are quantized: OpenVINO's INT8 add. The tokens' quantizer, wanted by the add and the attention, sits above
    # the reshape that makes them (a reshape keeps the grid)
    def quantized(t):
        layer = t._keras_history[0]
        return isinstance(layer, ActivationQuantizer) or (isinstance(layer, L.Reshape) and quantized(layer.input))

    joins = [op for op in q.operations if type(op).__name__ == "Add"]
    assert len(joins) == 2
    for join in joins:
        assert all(quantized(t) for t in join._inbound_nodes[0].input_tensors)
    assert all(quantized(t) for t in q.get_layer("mha")._inbound_nodes[0].input_tensors)
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")  # ranges from data, weights as the float model's
    q.fit(x, rng.normal(size=(32, 5)), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    assert rel_error(q(x), model(x)) < 0.1  # quantization error only
    q.save(tmp_path / "q.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "q.keras")(x), q(x))
