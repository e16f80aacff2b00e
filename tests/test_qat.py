"""Quantization-aware training on real MNIST data, exported to OpenVINO INT8 by both routes."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import openvino as ov
import pytest
from keras import layers as L

import tfcompress
from tfcompress import calibration
from tfcompress.export import export_saved_model, strip_saved_model, to_onnx, to_openvino
from tfcompress.quantization import ActivationQuantizer, RangeInit, quantize_model
from conftest import SHARED_DATA, assert_int8_where_the_cpu_can, rel_error, run_mirrored
from data import mnist

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def small_cnn():
    inp = keras.Input((28, 28, 1), name="image")
    a = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    b = L.ReLU()(L.BatchNormalization(momentum=0.9, name="bn")(L.Conv2D(16, 3, padding="same", name="c2")(a)))
    s = L.MaxPooling2D()(L.Add()([a, b]))
    s = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(s)
    s = L.Conv2D(32, 3, strides=2, activation="relu", name="c3")(s)
    s = L.GlobalAveragePooling2D()(s)
    return keras.Model(inp, L.Dense(10, name="logits")(s))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(0)
    x, y, xt, yt = mnist(8192, 2000)
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    float_acc = model.evaluate(xt, yt, verbose=0)[1]
    q = quantize_model(model)
    q.compile(keras.optimizers.Adam(5e-4), LOSS, metrics=["accuracy"])
    hist = q.fit(x, y, epochs=1, batch_size=64, callbacks=[RangeInit(16, log_ranges=True)], verbose=0)
    d = tmp_path_factory.mktemp("qat")
    q.export(str(d / "sm"), verbose=False)
    return model, q, float_acc, hist, (xt, yt), d


def test_qat_keeps_accuracy_and_places_quantizers(trained):
    model, q, float_acc, hist, (xt, yt), _ = trained
    assert float_acc > 0.8
    assert q.evaluate(xt, yt, verbose=0)[1] >= float_acc - 0.005
    quantizers = [layer.name for layer in q.layers if isinstance(layer, ActivationQuantizer)]
    # inputs of c1, c2 (shared with the Add's first input), the Add's second input, the max pool (it only
    # selects values, so its input quantizer also serves dw, which reads the pool), c3, the global pool and the
    # dense layer
    assert len(quantizers) == 7
    assert "max_pooling2d_input_quant" in quantizers
    assert any(k.endswith("_max") for k in hist.history)  # ranges reported into logs / TensorBoard
    assert all(type(q.get_layer(n)).__name__.startswith("Quant") for n in ("c1", "c2", "c3", "dw", "logits"))
    assert type(q.get_layer("bn")) is L.BatchNormalization
    assert model.get_layer("c1").__class__ is L.Conv2D  # the float model is untouched


def test_qat_model_runs_int8_in_openvino_by_both_routes(trained):
    _, q, _, _, (xt, yt), d = trained
    core = ov.Core()
    keras_out = q.predict(xt[:256], verbose=0)
    direct = core.compile_model(ov.convert_model(str(d / "sm")), "CPU")  # OpenVINO's TF frontend
    x = {"image": xt[:8]}
    # the ONNX check runs the model in OpenVINO (INT8 kernels) against TensorFlow's float fake-quant: within
    # about one output quantization step (1/255 of the range; measured 4.1e-3 of the largest output), not 1e-3:
    # exact rounding ties. On the first layer's coarse 7-bit grid (overflow_fix="first_layer") some c1 outputs
    # fall exactly on a half step of c2's input quantizer (2000 MNIST test images: 127 of 25 M elements within
    # 1e-6 of a tie; 14 with full-range weights). A float convolution lands within an ulp of the tie, OpenVINO's
    # integer arithmetic rounds it the other way (131 activations one step apart, 129 of them up) and the step
    # propagates.
    to_onnx(str(d / "sm"), str(d / "q.onnx"), check_inputs=x, tolerance=8e-3)
    # the IR against the same ONNX model in OpenVINO: the same integer arithmetic
    to_openvino(str(d / "q.onnx"), str(d / "q.xml"), check_inputs=x, tolerance=1e-4)
    via_onnx = core.compile_model(str(d / "q.xml"), "CPU")
    for compiled in (direct, via_onnx):
        assert calibration.int8_layers(compiled) == {"int8": 5, "total": 5}
        out = compiled({0: xt[:256]})[compiled.outputs[0]]
        assert np.mean(out.argmax(1) == keras_out.argmax(1)) >= 0.99
        assert rel_error(out, keras_out) < 0.05  # INT8 kernels vs TF's float fake-quant arithmetic
    # the first layer trained on the overflow fix's 7-bit grid: its int8 weights stay within [-63, 63]
    maxima = {op.get_friendly_name(): int(np.abs(op.get_data()).max())
              for op in core.read_model(str(d / "q.xml")).get_ordered_ops()
              if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8}
    assert sorted(maxima.values()) == [63, 127, 127, 127, 127], maxima


def test_overflow_fix_chooses_the_weights_on_seven_bits(rng):
    model = small_cnn()
    weighted = ("c1", "c2", "dw", "c3", "logits")
    # "enable": every layer but the depthwise one, whose INT8 kernel cannot saturate (as calibration chooses)
    for fix, half in (("first_layer", {"c1"}), ("enable", set(weighted) - {"dw"}), ("disable", set())):
        q = quantize_model(model, overflow_fix=fix)
        assert {n for n in weighted if q.get_layer(n).half_range} == half, fix
    # an ignored first layer stays float and the walk goes on through it: c2 and, past the Add, the pooling and
    # the depthwise layer (which cannot saturate), c3 are the first quantized layers then
    q = quantize_model(model, ignored_layers=["c1"])
    assert {n for n in weighted[1:] if q.get_layer(n).half_range} == {"c2", "c3"}
    with pytest.raises(ValueError, match="overflow_fix"):
        quantize_model(model, overflow_fix="first")
    # the 7-bit grid: per output channel a step of m / 63.5, the largest weight clipped to integer 63
    k = rng.normal(size=(3, 3, 4, 8)).astype("float32")
    fq = np.asarray(tfcompress.quantization.fake_quant_weights(k, half_range=True))
    step = np.abs(k).max(axis=(0, 1, 2)) / 63.5
    assert np.allclose(fq / step, np.round(fq / step), atol=1e-3)
    assert np.allclose(np.abs(fq / step).max(axis=(0, 1, 2)), 63, atol=1e-3)
    assert np.abs(fq - k).max(axis=(0, 1, 2)) == pytest.approx(step / 2, rel=1e-4)  # within half a step


def depthwise_net():
    """Raw-pixel-like input -> depthwise stem -> 1x1 convolution -> separable convolution -> depthwise with a
    channel multiplier -> depthwise -> Dense: the kernels that can saturate and those that cannot."""
    inp = keras.Input((12, 12, 4), name="pixels")
    y = L.DepthwiseConv2D(3, padding="same", activation="relu", name="stem")(inp)
    y = L.Conv2D(8, 1, activation="relu", name="c1")(y)
    y = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(y)
    y = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="relu", name="dw2")(y)
    y = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(y)
    return keras.Model(inp, L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(y)))


def _weights_per_layer(model: ov.Model) -> list[tuple[int, np.ndarray]]:
    """Per weighted op (graph order): the largest |integer| of its int8 weights and its dequantized weights."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        src = op.input(1).get_source_output()
        stack, top = [src.get_node()], 0
        while stack:
            node = stack.pop()
            if node.get_type_name() == "Constant" and node.get_output_element_type(0) == ov.Type.i8:
                top = max(top, int(np.abs(node.get_data()).max()))
            stack += [i.get_source_output().get_node() for i in node.inputs()]
        weights = ov.Core().compile_model(ov.Model([src], []), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})
        found.append((top, next(iter(weights.values()))))
    return found


@pytest.mark.parametrize("fix, tops", [("enable", [127, 63, 127, 63, 63, 127, 63]),
                                       ("first_layer", [127, 63, 127, 127, 127, 127, 127])])
def test_qat_puts_the_weights_on_the_grid_calibration_chooses(rng, tmp_path, fix, tops):
    """quantize_model and calibrate choose the same layers for the 7-bit grid (depthwise kernels with one output
    per input channel never: their INT8 kernel cannot saturate; "first_layer" walks through a depthwise stem
    and a separable convolution's depthwise half) and put the same weights on the same grid: the QAT model's
    exported IR has, layer by layer, the int8 weights and scales that calibrating the float model's IR gives."""
    model = depthwise_net()
    model.export(str(tmp_path / "float"), verbose=False)
    quantize_model(model, overflow_fix=fix).export(str(tmp_path / "qat"), verbose=False)
    qat = ov.convert_model(str(tmp_path / "qat"))  # FakeQuantize on the weights, stored as int8 as calibrate does
    calibration.compress_weights(qat)
    x = rng.uniform(0, 255, (32, 12, 12, 4)).astype("float32")
    calibrated = calibration.calibrate(ov.convert_model(str(tmp_path / "float")), x, overflow_fix=fix,
                                       range_estimator="max", verbose=False)
    ours, theirs = _weights_per_layer(qat), _weights_per_layer(calibrated)
    assert [t for t, _ in ours] == [t for t, _ in theirs] == tops
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_save_and_load_round_trip(trained, tmp_path):
    _, q, _, _, (xt, _), _ = trained
    q.save(tmp_path / "q.keras")
    again = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(again.predict(xt[:64], verbose=0), q.predict(xt[:64], verbose=0))


def test_prune_then_qat_keeps_pruned_channels_zero_and_strips(rng, tmp_path):
    x, y, xt, _ = mnist(1024, 64)
    model = small_cnn()
    groups = {g.layers: g for g in tfcompress.channel_groups(model)}
    tfcompress.zero_channels(model, groups[("c3",)], [0, 1, 2, 3])
    tfcompress.zero_channels(model, groups[("c1", "c2")], [5])
    q = quantize_model(model)
    q.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    q.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert not q.get_layer("c3").kernel.numpy()[..., :4].any()
    assert not q.get_layer("c3").bias.numpy()[:4].any()
    assert not q.get_layer("c2").kernel.numpy()[..., 5].any()
    assert not q.get_layer("bn").gamma.numpy()[5] and not q.get_layer("bn").beta.numpy()[5]
    small = tfcompress.strip(q)
    assert small.get_layer("c3").kernel.shape[-1] == 28 and small.get_layer("c2").kernel.shape[-1] == 15
    assert rel_error(small(xt), q(xt)) < 1e-4
    q.export(str(tmp_path / "sm"), verbose=False)
    r = strip_saved_model(str(tmp_path / "sm"), str(tmp_path / "stripped"))
    # the SavedModel strip removes what the Keras strip removes, also the group behind the QAT depthwise
    # kernel (Const -> FakeQuant per channel -> Reshape)
    widths = {name: [layer["channels_after"] for layer in r.layers if f"/{name}_1/" in layer["name"]]
              for name in ("c1", "c2", "c3")}
    assert widths == {"c1": [15], "c2": [15], "c3": [28]}, r.layers
    assert r.params_after < r.params_before and r.flops_after < r.flops_before
    assert r.max_rel_error < 1e-4


def _random_weights(model, rng):
    for w in model.weights:  # no all-zero biases: every removed channel must be zeroed, not found zero
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return model


def _quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return quantize_model(model)


def _prune_qat_model(q, x, rng, how, groups=None):
    """Half the filters pruned in the QAT model ``q``: by FilterPruning in its fit on ``x`` (first convolutions
    too), or by zero_channels on half of each of ``groups`` (every group)."""
    if how == "fit":
        q.compile("adam", "mse")
        pruner = tfcompress.pruning.FilterPruning(target=0.5, pruning_epochs=2, prune_first_conv=True)
        q.fit(x, rng.normal(size=(len(x), 4)), epochs=3, batch_size=len(x) // 2, callbacks=[pruner], verbose=0)
    else:
        for g in tfcompress.channel_groups(q) if groups is None else groups:
            tfcompress.zero_channels(q, g, rng.choice(g.size, g.size // 2, replace=False))


def _qat_prunable(rng):
    """A QAT model whose pruned groups are read by a Conv2D, a SeparableConv2D (depth multiplier 2) and a Dense."""
    inp = keras.Input((10, 10, 3))
    a = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(inp)
    b = L.Conv2D(16, 3, padding="same", activation="relu", name="c2")(a)
    c = L.SeparableConv2D(12, 3, padding="same", depth_multiplier=2, activation="relu", name="sep")(b)
    return _quantized(_random_weights(keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(c))), rng))


@pytest.mark.parametrize("how", ["fit", "zero_channels"])
def test_channels_pruned_in_a_qat_model_strip_exactly(how, rng):
    """Pruning a QAT model (FilterPruning in its fit, or zero_channels) zeroes the kernel rows that read the
    removed channels too: a QAT layer takes its per-channel weight ranges from all its rows, so rows left
    behind set the rounding of the others and the stripped model (without them) computed something else."""
    q = _qat_prunable(rng)
    x = rng.normal(size=(32, 10, 10, 3)).astype("float32")
    _prune_qat_model(q, x, rng, how)
    removed = {name: np.abs(q.get_layer(name).kernel.numpy()).sum(axis=(0, 1, 2)) == 0 for name in ("c1", "c2")}
    removed["sep"] = np.abs(q.get_layer("sep").pointwise_kernel.numpy()).sum(axis=(0, 1, 2)) == 0
    assert all(r.sum() == r.size // 2 for r in removed.values()), removed
    assert not q.get_layer("c2").kernel.numpy()[:, :, removed["c1"]].any()
    assert not q.get_layer("sep").pointwise_kernel.numpy()[0, 0, np.repeat(removed["c2"], 2)].any()
    assert not q.get_layer("head").kernel.numpy()[removed["sep"]].any()
    small = tfcompress.strip(q)
    assert small.get_layer("head").kernel.shape[0] == 6
    assert rel_error(small(x), q(x)) < 1e-5


@pytest.mark.parametrize("how", ["fit", "zero_channels"])
def test_channels_pruned_before_a_shared_qat_layer_strip_exactly(how, rng):
    """A QAT layer called on two tensors reads the same channels in both calls (the engine joins them): the rows
    of the removed ones are zeroed too, else they set the others' rounding and the strip is off."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="c1b")(inp)
    shared = L.Conv2D(6, 1, name="shared")
    model = keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(L.Add()([shared(a), shared(b)]))))
    q = _quantized(_random_weights(model, rng))
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    (g,) = [g for g in tfcompress.channel_groups(q) if set(g.layers) == {"c1", "c1b"}]
    _prune_qat_model(q, x, rng, how, [g])
    removed = ~q.get_layer("c1").kernel.numpy().any(axis=(0, 1, 2))
    assert removed.any()
    assert not q.get_layer("shared").kernel.numpy()[:, :, removed].any()
    small = tfcompress.strip(q)
    assert small.get_layer("shared").kernel.shape[-2] == 8 - removed.sum()
    assert rel_error(small(x), q(x)) < 1e-5


def test_channels_pruned_before_a_grouped_qat_convolution_strip_exactly(rng, tmp_path):
    """A grouped convolution's kernel (..., in / groups, out): input channel ``g * in / groups + r`` is row ``r``
    of the output block ``g`` only; those rows are zeroed with the channel, in ``quantize_model``'s masks and when
    the QAT model is pruned."""
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    b = L.Conv2D(8, 3, padding="same", groups=2, activation="relu", name="gc")(a)
    model = _random_weights(keras.Model(inp, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(b))), rng)
    x = rng.normal(size=(8, 6, 6, 3)).astype("float32")
    c1 = next(g for g in tfcompress.channel_groups(model) if g.layers == ("c1",))
    assert c1.blocks == 2  # one channel from each half
    tfcompress.zero_channels(model, c1, [1, 5], compensate=False)  # prune -> QAT: quantize_model's masks
    q = _quantized(model)
    c1 = next(g for g in tfcompress.channel_groups(q) if g.layers == ("c1",))
    tfcompress.zero_channels(q, c1, [2, 6], compensate=False)  # pruning the QAT model
    kernel = q.get_layer("gc").kernel.numpy()  # (3, 3, 4, 8): row r of block g reads channel 4 g + r
    assert not kernel[:, :, 1:3].any() and kernel[:, :, 0].all() and kernel[:, :, 3].all()
    small = tfcompress.strip(q)
    assert small.get_layer("gc").kernel.shape[-2] == 2
    q.save(tmp_path / "q.keras")  # the grouped row masks are part of the saved constraint
    again = keras.models.load_model(tmp_path / "q.keras")
    assert again.get_layer("gc").kernel.constraint.get_config() == q.get_layer("gc").kernel.constraint.get_config()
    np.testing.assert_array_equal(again(x), q(x))
    assert rel_error(small(x), q(x)) < 1e-5


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_qat_savedmodel_strips_transposed_and_half_precision_kernels(policy, rng, tmp_path):
    """A QAT kernel reaches its op through layout ops after its FakeQuant: a Transpose (a transposed
    convolution's kernel, quantized per output channel) and, under mixed_float16, a Cast to float16. The
    SavedModel strip removes the pruned channels behind them as the Keras strip does (it kept them all)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((8, 8, 3))
        h = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
        h = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(h)
        h = L.Conv2D(6, 3, name="c2")(h)
        model = keras.Model(inp, L.Dense(2, dtype="float32")(L.GlobalAveragePooling2D()(h)))
        groups = {g.layers: g for g in tfcompress.channel_groups(model)}
        tfcompress.zero_channels(model, groups[("c1",)], [3], compensate=False)
        tfcompress.zero_channels(model, groups[("up",)], [0, 1, 2], compensate=False)
        q = quantize_model(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(16, 2)), epochs=1, batch_size=16, callbacks=[RangeInit(1)], verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    r = strip_saved_model(str(tmp_path / "sm"), str(tmp_path / "stripped"))
    widths = {name: [layer["channels_after"] for layer in r.layers if f"/{name}_1/" in layer["name"]]
              for name in ("c1", "up")}
    assert widths == {"c1": [7], "up": [5]}, r.layers
    assert r.max_rel_error < (1e-2 if policy == "mixed_float16" else 1e-4)

def test_qat_3d_kernels_strip_with_their_input_channels(rng, tmp_path):
    """TF's per-channel FakeQuant takes ranks up to 4, so a QAT Conv3D / Conv3DTranspose kernel is quantized as
    a (window x inputs, outputs) matrix reshaped back: when its input channels go too, that matrix loses rows
    (the SavedModel strip failed with 'cannot reshape array'), and the FakeQuant's per-output ranges behind that
    reshape must be sliced by the output channels kept (they were sliced by the input channels)."""
    inp = keras.Input((4, 6, 6, 2))
    h = L.Conv3D(8, 3, padding="same", activation="relu", name="c1")(inp)
    h = L.Conv3DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(h)
    model = keras.Model(inp, L.Conv3D(2, 1, name="out")(h))
    groups = {g.layers: g for g in tfcompress.channel_groups(model)}
    tfcompress.zero_channels(model, groups[("c1",)], [1, 6], compensate=False)
    tfcompress.zero_channels(model, groups[("up",)], [0, 5], compensate=False)
    q = quantize_model(model)
    x = rng.normal(size=(8, 4, 6, 6, 2)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(8, 8, 12, 12, 2)), epochs=1, batch_size=8, callbacks=[RangeInit(1)], verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    r = strip_saved_model(str(tmp_path / "sm"), str(tmp_path / "stripped"))
    widths = {name: [layer["channels_after"] for layer in r.layers if f"/{name}_1/" in layer["name"]]
              for name in ("c1", "up")}
    assert widths == {"c1": [6], "up": [6]}, r.layers
    assert r.max_rel_error < 1e-4


@pytest.mark.parametrize("padding", ["same", "causal"])
def test_qat_conv1d_savedmodel_is_counted_and_stripped(padding, rng, tmp_path):
    """TensorFlow runs Conv1D as a Conv2D of an expanded kernel: a QAT Conv1D's weight input is then
    ExpandDims(FakeQuant(kernel)), which the SavedModel stripper reads like the kernel itself."""
    inp = keras.Input((24, 5), name="signal")
    x = L.Conv1D(12, 3, padding=padding, activation="relu", name="c1")(inp)
    x = L.Conv1D(8, 3, padding=padding, activation="relu", name="c2")(x)
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    groups = {g.layers: g for g in tfcompress.channel_groups(model)}
    tfcompress.zero_channels(model, groups[("c1",)], [0, 4, 7])
    q = quantize_model(model)
    xs = rng.normal(size=(32, 24, 5)).astype("float32")
    q.compile("sgd", "mse")
    q.fit(xs, rng.normal(size=(32, 3)), epochs=1, verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    r = strip_saved_model(str(tmp_path / "sm"), str(tmp_path / "stripped"))
    widths = {name: [layer["channels_after"] for layer in r.layers if f"/{name}_1/" in layer["name"]]
              for name in ("c1", "c2")}
    assert widths == {"c1": [9], "c2": [8]}, r.layers
    # per example: c1 24 x 3 x 5 x 12 -> x 9; c2 24 x 3 x 12 x 8 -> 9 x 8; head 8 x 3
    assert r.flops_before == 2 * (24 * 3 * 5 * 12 + 24 * 3 * 12 * 8 + 8 * 3)
    assert r.flops_after == 2 * (24 * 3 * 5 * 9 + 24 * 3 * 9 * 8 + 8 * 3)
    assert r.max_rel_error < 1e-4


def test_pruned_layers_keep_their_own_weight_constraints(rng, tmp_path):
    """The ChannelMask that keeps pruned channels zero replaced the layer's own constraint: a NonNeg kernel of a
    pruned layer went negative in QAT."""
    inp = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, name="c1", kernel_constraint=keras.constraints.NonNeg())(L.Conv2D(4, 3, name="c0")(inp))
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(a)))
    tfcompress.zero_channels(model, next(g for g in tfcompress.channel_groups(model) if g.layers == ("c1",)), [0, 1])
    q = quantize_model(model)
    q.compile(keras.optimizers.SGD(0.5), "mse")
    q.fit(rng.normal(size=(16, 8, 8, 3)), rng.normal(size=(16, 2)) * 10, epochs=2, verbose=0)
    kernel = q.get_layer("c1").kernel.numpy()
    assert kernel.min() >= 0 and kernel[..., 2:].any() and not kernel[..., :2].any()
    q.save(tmp_path / "q.keras")
    again = keras.models.load_model(tmp_path / "q.keras").get_layer("c1").kernel_constraint
    assert isinstance(again.inner, keras.constraints.NonNeg)
    assert isinstance(tfcompress.strip(q).get_layer("c1").kernel_constraint, keras.constraints.NonNeg)


def test_unsupported_layers_warn_and_subclassed_models_fail():
    inp = keras.Input((8, 3))
    x = L.LayerNormalization(name="norm")(L.Dense(4)(inp))
    x = L.GroupNormalization(2, name="norm_2")(x)
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "norm (LayerNormalization), norm_2 (GroupNormalization)" in messages[0]
    with pytest.raises(ValueError, match="unknown preset"):
        quantize_model(model, preset="fast")
    with pytest.raises(ValueError, match="'nope'"):
        quantize_model(model, ignored_layers=["nope"])

    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(tfcompress.UnsupportedModelError, match="subclassed"):
        quantize_model(Net())


class LegacyDepthwiseConv2D(L.DepthwiseConv2D):
    """The custom_objects shim loading a model saved by Keras 2 needs (its config has ``groups``)."""

    def __init__(self, *args, groups=None, **kwargs):
        super().__init__(*args, **kwargs)


class LegacyConv2D(L.Conv2D):
    def __init__(self, *args, legacy_option=None, **kwargs):
        super().__init__(*args, **kwargs)


class LegacyAdd(L.Add):
    def __init__(self, *args, legacy_option=None, **kwargs):
        super().__init__(*args, **kwargs)


class DoubledDense(L.Dense):
    def call(self, x):
        return 2.0 * super().call(x)



def _shim_net(conv, dw, add, head, head_name: str) -> keras.Model:
    """conv -> depthwise -> residual add -> pool -> dense -> ``head``, from the given layer classes (plain Keras
    ones or loading shims of them)."""
    inp = keras.Input((12, 12, 3), name="image")
    a = conv(8, 3, padding="same", activation="relu", name="c1")(inp)
    b = dw(3, padding="same", name="dw")(a)
    s = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(add(name="add")([a, b])))
    return keras.Model(inp, head(4, name=head_name)(L.Dense(6, name="d")(s)))

def test_subclasses_that_only_change_construction_are_quantized_as_their_base():
    """Subclasses of quantizable layers defining only __init__ (shims to load an older model, like the MLPerf Tiny
    VWW MobileNet's DepthwiseConv2D) were left float by quantize_model, so its QAT IR ran 15 of 28 layers INT8;
    they compute as their base, so they get its twin and placement. A subclass with its own call stays float."""
    keras.utils.set_random_seed(0)
    plain = _shim_net(L.Conv2D, L.DepthwiseConv2D, L.Add, DoubledDense, "doubled")
    legacy = _shim_net(LegacyConv2D, LegacyDepthwiseConv2D, LegacyAdd, DoubledDense, "doubled")
    legacy.set_weights(plain.get_weights())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qp, ql = quantize_model(plain), quantize_model(legacy)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == [m for m in messages if "doubled (DoubledDense)" in m and "dw (" not in m and "c1 (" not in m]
    assert len(messages) == 2  # one per model, for the subclass with its own call
    kinds = lambda q: [(l.name, type(l).__name__) if type(l).__module__.startswith("tfcompress") else ()
                       for l in q.layers]
    assert kinds(ql) == kinds(qp)  # the same twins, the same quantizers (both inputs of the Add among them)
    assert ("dw", "QuantDepthwiseConv2D") in kinds(ql) and ("add_input_1_quant", "ActivationQuantizer") in kinds(ql)
    x = np.random.default_rng(0).uniform(0, 1, (16, 12, 12, 3)).astype("float32")
    qp(x, training=True), ql(x, training=True)  # the same ranges from the same batch
    np.testing.assert_allclose(ql(x, training=False), qp(x, training=False), rtol=0, atol=1e-6)


class FromConfigConv2D(L.Conv2D):
    """A shim that drops an older Keras's config argument when loading, overriding ``from_config`` only."""

    @classmethod
    def from_config(cls, config):
        config.pop("legacy_option", None)
        return super().from_config(config)


class ConfiguredDepthwiseConv2D(L.DepthwiseConv2D):
    """A shim with its own option, written into its config (which DepthwiseConv2D does not take)."""

    def __init__(self, *args, legacy_option=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.legacy_option = legacy_option

    def get_config(self):
        return {**super().get_config(), "legacy_option": self.legacy_option}


class FromConfigAdd(L.Add):
    @classmethod
    def from_config(cls, config):
        return super().from_config(config)


class OwnBuildDense(L.Dense):
    """Overrides build (it could change the kernel it computes with): not construction only."""

    def build(self, input_shape):
        super().build(input_shape)


def test_subclasses_that_only_change_construction_or_config_are_quantized_as_their_base(rng, tmp_path):
    """A shim overriding only ``from_config`` (or ``get_config`` too) stayed float in quantize_model (only
    ``__init__`` was taken as construction), and a shim's own ``get_config`` may add an argument its base's
    twin does not take. They get their base's twin and placement, computing as the plain model's QAT copy; a
    subclass overriding ``build`` stays float (the warning names it); the QAT model saves and loads."""
    keras.utils.set_random_seed(0)
    plain = _shim_net(L.Conv2D, L.DepthwiseConv2D, L.Add, L.Dense, "head")
    shims = _shim_net(FromConfigConv2D, ConfiguredDepthwiseConv2D, FromConfigAdd, L.Dense, "head")
    built = _shim_net(L.Conv2D, L.DepthwiseConv2D, L.Add, OwnBuildDense, "head")
    shims.set_weights(plain.get_weights())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qp, qs = quantize_model(plain), quantize_model(shims)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
    kinds = lambda q: [(l.name, type(l).__name__) if type(l).__module__.startswith("tfcompress") else ()
                       for l in q.layers]
    assert kinds(qs) == kinds(qp)
    assert {("c1", "QuantConv2D"), ("dw", "QuantDepthwiseConv2D"), ("add_input_1_quant", "ActivationQuantizer")
            } <= set(kinds(qs))
    x = rng.uniform(0, 1, (16, 12, 12, 3)).astype("float32")
    qp(x, training=True), qs(x, training=True)  # the same ranges from the same batch
    np.testing.assert_allclose(qs(x, training=False), qp(x, training=False), rtol=0, atol=1e-6)
    qs.save(tmp_path / "q.keras")
    again = keras.models.load_model(tmp_path / "q.keras", custom_objects={"FromConfigAdd": FromConfigAdd})
    np.testing.assert_array_equal(again(x), qs(x))
    with pytest.warns(UserWarning, match=r"head \(OwnBuildDense\)"):
        qb = quantize_model(built)
    assert type(qb.get_layer("head")) is OwnBuildDense and type(qb.get_layer("c1")).__name__ == "QuantConv2D"


def test_keras_layers_are_quantized_whatever_their_classes_define_beyond_init(monkeypatch):
    """Conv2D, DepthwiseConv2D, Conv2DTranspose ... define only __init__ over their base class; they were told
    from construction-only subclasses by the two attributes namex's export decorator sets on them, and a Keras
    without namex (its decorator then sets nothing) left them float. Their shims still get their twins."""
    for cls in (L.Conv2D, L.DepthwiseConv2D):
        for name in ("_api_export_path", "_api_export_symbol_id"):
            if name in vars(cls):
                monkeypatch.delattr(cls, name)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = LegacyDepthwiseConv2D(3, name="shim")(L.DepthwiseConv2D(3, name="dw")(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantize_model(keras.Model(inp, x))
    kinds = {l.name: type(l).__name__ for l in q.layers}
    assert (kinds["conv"], kinds["dw"], kinds["shim"]) == ("QuantConv2D", "QuantDepthwiseConv2D",
                                                           "QuantDepthwiseConv2D")


def test_a_quantization_aware_model_is_not_quantized_twice():
    """quantize_model on its own result failed inside Keras ('The name "..._input_quant" is used 2 times')."""
    q = quantize_model(small_cnn())
    with pytest.raises(ValueError, match=r"already quantization-aware \(it has c1_input_quant, c1, "):
        quantize_model(q)


def test_one_ignored_layer_may_be_given_as_a_string():
    """ignored_layers="c1" was read as the letters 'c' and '1' ("names ['1', 'c'] that are not layers")."""
    q = quantize_model(small_cnn(), ignored_layers="c1")
    assert type(q.get_layer("c1")) is L.Conv2D and type(q.get_layer("c2")) is not L.Conv2D


def test_a_mixed_precision_model_trains_quantization_aware(rng, tmp_path):
    """TF's FakeQuant ops take float32 only: under mixed_float16 the first training step failed with "Input
    'inputs' of 'FakeQuantWithMinMaxVars' Op has type float16"."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((8, 8, 3))
        a = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
        a = L.DepthwiseConv2D(3)(L.SeparableConv2D(8, 3)(L.Add()([a, L.Conv2D(8, 1)(a)])))
        a = L.Conv2D(8, 3, padding="same")(a)
        model = keras.Model(inp, L.Dense(2, dtype="float32")(L.GlobalAveragePooling2D()(a)))
        for layer in model.layers:  # trained biases (zero ones vanish from the IR, and bias correction with them)
            if getattr(layer, "bias", None) is not None:
                layer.bias.assign(rng.uniform(0.05, 0.1, layer.bias.shape))
        q = quantize_model(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")  # ranges only: the quantized model then computes the float one
    q.fit(x, np.zeros((32, 2), "float32"), epochs=1, batch_size=8, callbacks=[RangeInit(4)], verbose=0)
    ref = model.predict(x, verbose=0)
    assert np.abs(q.predict(x, verbose=0) - ref).max() < 0.05 * np.abs(ref).max()
    q.save(tmp_path / "q.keras")
    again = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(again.predict(x, verbose=0), q.predict(x, verbose=0))
    q.export(str(tmp_path / "sm"), verbose=False)
    # its float16 IR: bias correction measures the quantized weights on a float32 side model, which failed
    # with "Element types for data batch and filters do not match (... f32, filters element type: f16)"
    report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=x, verbose=False)
    assert report["steps"]["int8"]["int8_layers"] == {"int8": 7, "total": 7}


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_the_export_counts_the_qat_irs_int8_layers_and_runs_mixed_float16_ones_in_int8(policy, rng, tmp_path, capfd):
    """report.json / report.md count the layers of a quantization-aware IR that run INT8 on this CPU (as
    ``calibration.int8_layers`` counts them in the compiled IR). A mixed_float16 model's IR used to compute in
    float16 and run its float16 layers in float (2 of 3 here): their weights' fake quantization folds into float16
    values, which the int8 restore refused, and casts stood between the float32 quantizers and the layers. Its IR
    computes in float32 now, all 3 layers INT8, within float16's precision of the Keras model."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input((8, 8, 3))
        a = L.Conv2D(8, 3, padding="same", activation="relu")(L.Conv2D(8, 3, activation="relu")(inp))
        model = keras.Model(inp, L.Dense(3, dtype="float32")(L.GlobalAveragePooling2D()(a)))
        q = quantize_model(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = rng.uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, np.zeros((16, 3), "float32"), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    capfd.readouterr()
    for data, out in (({"validation_data": x[:8]}, "out"), ({"calibration_data": x}, "calibrated")):
        report = export_saved_model(str(tmp_path / "sm"), str(tmp_path / out), verbose=False, **data)
        xml = str(tmp_path / out / "model_fp32.xml")
        counts = calibration.int8_layers(ov.Core().compile_model(xml, "CPU"))
        assert report["steps"]["openvino"]["int8_layers"] == counts == {"int8": 3, "total": 3}
        assert "3 of 3 convolution" in (tmp_path / out / "report.md").read_text()
        assert "warning" not in capfd.readouterr().err
        ir = ov.Core().read_model(xml)
        assert not [op.get_friendly_name() for op in ir.get_ordered_ops()
                    if any(op.get_output_element_type(k) in (ov.Type.f16, ov.Type.bf16)
                           for k in range(op.get_output_size()))]
        got = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: x})[0]
        ref = q.predict(x, verbose=0)
        # the IR computes in float32 what Keras computes in float16 (and rounds the same quantizers): within
        # a few of the quantizers' steps at worst, not the float IR's 2-of-3-layers-float error of a whole grid
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
        if "calibration_data" in data:
            assert report["steps"]["int8"]["int8_layers"] == {"int8": 3, "total": 3}


MIRRORED = """
    from test_qat import small_cnn, LOSS
    from tfcompress.quantization import quantize_model, RangeInit
    x, y, xt, yt = mnist(2048, 512)
    with strategy.scope():
        q = quantize_model(small_cnn())
        q.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    hist = q.fit(x, y, epochs=4, batch_size=128, callbacks=[RangeInit(4)], verbose=0)
    from tfcompress.quantization import ActivationQuantizer
    for layer in q.layers:
        if isinstance(layer, ActivationQuantizer):
            for v in (layer.range_min, layer.range_max):
                vals = [t.numpy() for t in v.value.values] if hasattr(v.value, "values") else [v.numpy()]
                assert len(set(np.round(vals, 6).tolist())) == 1, (layer.name, vals)  # replicas agree
            assert float(layer.range_max.numpy()) > 0
    print("LOSS", hist.history["loss"][0], hist.history["loss"][-1])
"""


def test_qat_under_mirrored_strategy(tmp_path):
    first, last = map(float, run_mirrored(tmp_path, MIRRORED).split("LOSS")[-1].split())
    assert last < first  # it trains (the point here: replicas agree on the quantizer ranges)


def test_quantizer_goes_before_zero_padding():
    # MobileNet's strided depthwise convolutions read a ZeroPadding2D: one quantizer before the padding lets
    # OpenVINO run the Pad in INT8 (a quantizer after it cost MobileNetV2's QAT IR ~40 % of its throughput)
    inp = keras.Input((16, 16, 8))
    x = L.ReLU()(L.Conv2D(8, 1, name="pw")(inp))
    x = L.DepthwiseConv2D(3, strides=2, name="dw")(L.ZeroPadding2D(1, name="pad")(x))
    q = quantize_model(keras.Model(inp, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x))))
    pad, dw = q.get_layer("pad"), q.get_layer("dw")
    assert isinstance(pad.input._keras_history[0], ActivationQuantizer)
    assert dw.input._keras_history[0] is pad  # no second quantizer between Pad and the depthwise conv


def test_a_shared_layer_gets_one_quantizer_per_input(rng, tmp_path):
    """A layer called on two tensors (a siamese branch, a block applied twice) reads each through its own
    activation quantizer, with unique names; the model trains its ranges, saves and loads exactly."""
    a, b = keras.Input((8, 8, 3), name="a"), keras.Input((8, 8, 3), name="b")
    shared = L.Conv2D(8, 3, padding="same", activation="relu", name="shared")
    twice = L.Conv2D(8, 3, padding="same", activation="relu", name="twice")
    x = L.Concatenate()([twice(twice(shared(a))), shared(b)])
    model = keras.Model([a, b], L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    q = quantize_model(model)
    quantizers = [layer for layer in q.layers if isinstance(layer, ActivationQuantizer)]
    for name in ("shared", "twice"):
        calls = q.get_layer(name)._inbound_nodes
        assert len(calls) == 2
        sources = [node.input_tensors[0]._keras_history[0] for node in calls]
        assert all(isinstance(s, ActivationQuantizer) for s in sources) and sources[0] is not sources[1]
    assert len({qz.name for qz in quantizers}) == len(quantizers)
    x = [rng.uniform(0, 1, (8, 8, 8, 3)).astype("float32") for _ in range(2)]
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(8, 2)), epochs=1, batch_size=8, callbacks=[RangeInit(1)], verbose=0)
    assert rel_error(q(x), model(x)) < 0.1
    q.save(tmp_path / "q.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "q.keras")(x), q(x))


def test_layers_with_a_python_function_as_activation_get_their_twins(rng):
    """A lambda as activation (no config Keras loads in safe mode): the quantized twin uses the function."""
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", activation=lambda t: keras.ops.maximum(t, 0.3 * t), name="a")(inp)
    x = L.Activation(lambda t: t * keras.ops.sigmoid(t), name="act")(x)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(6, 3, name="b")(x))))
    q = quantize_model(model)
    assert type(q.get_layer("a")).__name__ == "QuantConv2D"
    assert q.get_layer("a").activation is model.get_layer("a").activation
    x = rng.uniform(0, 1, (8, 12, 12, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(8, 2)), epochs=1, batch_size=8, callbacks=[RangeInit(1)], verbose=0)
    assert rel_error(q(x), model(x)) < 0.1



def test_rebuilt_models_keep_adapted_normalization_and_lambda_functions(rng):
    """strip and quantize_model re-create every layer: an adapted Normalization keeps its statistics (Keras
    computes with tensors it derives from the variables) and a Lambda keeps the user's function, which
    reads this module's globals (byte code reloaded from its config would not see them)."""
    x = rng.uniform(0, 255, (16, 12, 12, 3)).astype("float32")
    norm = L.Normalization(name="norm")
    norm.adapt(x)
    inp = keras.Input((12, 12, 3))
    h = L.Lambda(lambda t: keras.ops.relu(t - np.float32(0.1)), name="lam")(norm(inp))
    h = L.Conv2D(8, 3, activation="relu", name="a")(h)
    model = keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(6, 3, name="b")(h))))
    group = next(g for g in tfcompress.channel_groups(model) if "a" in g.layers)
    tfcompress.zero_channels(model, group, [1, 4], compensate=False)
    small = tfcompress.strip(model)
    assert small.get_layer("a").filters == 6
    assert rel_error(small(x), model(x)) < 1e-5
    q = quantize_model(model)
    assert rel_error(q.get_layer("norm")(x), norm(x)) < 1e-6
    assert q.get_layer("lam").function is model.get_layer("lam").function
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(16, 2)), epochs=1, batch_size=16, callbacks=[RangeInit(1)], verbose=0)
    assert rel_error(q(x), model(x)) < 0.1

def separable_net():
    """Xception's pieces: separable convolutions, a residual written ``x + y``, and a transposed convolution."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="stem")(inp)
    s = L.ReLU()(L.BatchNormalization(name="bn")(L.SeparableConv2D(16, 3, padding="same", name="sep1")(x)))
    s = L.SeparableConv2D(16, 3, padding="same", name="sep2")(s)
    r = s + L.Conv2D(16, 1, name="short")(x)
    u = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(r)
    return keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(u)))


def test_separable_transposed_and_ops_add_get_quantized(rng, tmp_path):
    model = separable_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every weighted layer has a twin: nothing left in float
        q = quantize_model(model)
    assert type(q.get_layer("sep1")).__name__ == "QuantSeparableConv2D"
    assert type(q.get_layer("up")).__name__ == "QuantConv2DTranspose"
    add = next(op for op in q.operations if type(op).__name__ == "Add")
    assert all(isinstance(t._keras_history[0], ActivationQuantizer) for t in add._inbound_nodes[0].input_tensors)
    x = rng.uniform(0, 1, (16, 16, 16, 3)).astype("float32")
    q.compile(keras.optimizers.SGD(0.0), "mse")  # ranges from data, weights as the float model's
    q.fit(x, rng.normal(size=(16, 10)), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    inner = q.get_layer("sep1").intermediate_quantizer
    assert float(inner.initialized.numpy()) == 1.0 and float(inner.range_max.numpy()) > 0  # ranges from data
    assert rel_error(q(x), model(x)) < 0.1
    q.save(tmp_path / "q.keras")
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "q.keras")(x), q(x))


def test_separable_and_transposed_qat_model_exports_all_int8(rng, tmp_path):
    """``python -m tfcompress.export`` on the QAT SavedModel: every convolution, the transposed one (where the CPU
    runs it INT8 with a dynamic batch: AVX-512) and the dense layer run INT8 in OpenVINO, and the IR's logits
    follow the Keras QAT model."""
    x, y, _, _ = cifar_like(rng)
    q = quantize_model(separable_net())
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, epochs=1, batch_size=16, callbacks=[RangeInit(4)], verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    np.savez(tmp_path / "val.npz", x=x[:32], y=y[:32])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "tfcompress.export", f"--saved_model_dir={tmp_path / 'sm'}",
                           f"--output_dir={tmp_path / 'out'}", f"--validation_data={tmp_path / 'val.npz'}"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["quantized"]
    compiled = ov.Core().compile_model(str(tmp_path / "out" / "model_fp32.xml"), "CPU")
    assert_int8_where_the_cpu_can(compiled, total=8)  # 2 per separable conv
    out = compiled({0: x[:32]})[compiled.outputs[0]]
    assert rel_error(out, q.predict(x[:32], verbose=0)) <= 0.15  # the export's tolerance for quantized graphs


def cifar_like(rng):
    """CIFAR-10 test images (real image statistics for the quantizer ranges) downsized to 16 x 16, in [0, 1]."""
    data = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")
    idx = rng.choice(len(data["y_test"]), 256, replace=False)
    x = keras.ops.convert_to_numpy(keras.ops.image.resize(data["x_test"][idx].astype("float32") / 255.0, (16, 16)))
    return x, data["y_test"][idx].reshape(-1), None, None


def ops_net():
    """A Functional model written with keras.ops: a residual ``x + y``, a scaling ``x * 0.5``, MobileNetV3's
    hard-swish ``x * relu6(x + 3) / 6`` and a concatenation."""
    inp = keras.Input((12, 12, 3), name="image")
    a = L.Conv2D(8, 3, padding="same", name="a")(inp)
    a = a * keras.ops.relu6(a + 3.0) / 6.0  # hard-swish
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="b")(a)
    r = (a + b) * 0.5
    c = keras.ops.concatenate([r, L.Conv2D(4, 1, name="side")(a)], axis=-1)
    x = L.Conv2D(8, 3, strides=2, name="c")(c)
    return keras.Model(inp, L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x)))


def test_keras_ops_model_saves_loads_exactly_and_trains_on(rng, tmp_path):
    model = ops_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left in float
        q = quantize_model(model)
    kinds = [type(op).__name__ for op in q.operations]
    assert {"Add", "Multiply", "Relu6", "TrueDivide", "Concatenate"} <= set(kinds), kinds  # the keras.ops nodes kept
    joins = [op for op in q.operations if type(op).__name__ == "Add" and len(op._inbound_nodes[0].input_tensors) == 2]
    # a + b gets both inputs quantized (OpenVINO's INT8 residual add); the hard-swish's a + 3.0 is a shift
    assert len(joins) == 1
    assert all(isinstance(t._keras_history[0], ActivationQuantizer) for t in joins[0]._inbound_nodes[0].input_tensors)
    x, y = rng.uniform(0, 1, (64, 12, 12, 3)).astype("float32"), rng.normal(size=(64, 5)).astype("float32")
    q.compile(keras.optimizers.Adam(1e-3), "mse")
    q.fit(x, y, epochs=1, batch_size=16, callbacks=[RangeInit(2)], verbose=0)
    q.save(tmp_path / "q.keras")
    again = keras.saving.load_model(tmp_path / "q.keras")
    assert [type(op).__name__ for op in again.operations] == kinds
    np.testing.assert_array_equal(again.predict(x, verbose=0), q.predict(x, verbose=0))
    # training goes on from the saved state (weights, quantizer ranges, optimizer): both copies take the same steps
    for m in (q, again):
        m.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    np.testing.assert_array_equal(again.predict(x, verbose=0), q.predict(x, verbose=0))
    assert np.abs(q.get_layer("c").kernel.numpy() - model.get_layer("c").kernel.numpy()).max() > 0  # it trained


def gated_net():
    """EfficientNet's pieces: swish written ``x * sigmoid(x)`` and a squeeze-and-excitation gate, once as a
    ``layers.Multiply`` and once as a ``keras.ops`` product."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", name="stem")(inp)
    x = x * keras.ops.sigmoid(x)  # an activation: OpenVINO fuses it into one Swish op
    g = L.Conv2D(16, 1, activation="sigmoid", name="se1")(L.GlobalAveragePooling2D(keepdims=True)(x))
    x = L.Conv2D(16, 1, name="c1")(L.Multiply(name="gate1")([x, g]))
    g = L.Conv2D(16, 1, activation="sigmoid", name="se2")(L.GlobalAveragePooling2D(keepdims=True)(x))
    x = L.Conv2D(16, 1, name="c2")(x * g)
    return keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(x)))


def _quantized_multiply_inputs(ir) -> list[int]:
    """Per Multiply of two activations in an IR, how many of its inputs come from a FakeQuantize."""
    counts = []
    for op in ir.get_ordered_ops():
        if op.get_type_name() == "Multiply" and not any(
                i.get_source_output().get_node().get_type_name() == "Constant" for i in op.inputs()):
            counts.append(sum(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                              for i in op.inputs()))
    return counts


def test_gates_are_quantized_and_activation_products_are_not(rng, tmp_path):
    """A gate broadcast over a feature map runs INT8 with both operands quantized (as NNCF places it; left float,
    it cost EfficientNetB0's INT8 half its throughput); ``x * sigmoid(x)`` stays float for OpenVINO to fuse. QAT
    and post-training calibration place the same quantizers."""
    model = gated_net()
    q = quantize_model(model)
    products = [op for op in q.operations if type(op).__name__ == "Multiply"]
    quantized = [sum(isinstance(t._keras_history[0], ActivationQuantizer) for t in op._inbound_nodes[0].input_tensors)
                 for op in products]
    assert sorted(quantized) == [0, 2, 2]  # the swish product, then both gates

    x = rng.uniform(0, 1, (32, 16, 16, 3)).astype("float32")
    model.export(str(tmp_path / "float"), verbose=False)
    ptq = calibration.calibrate(ov.convert_model(str(tmp_path / "float")), [x[i:i + 1] for i in range(32)],
                                subset_size=32, verbose=False)
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(32, 10)), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    q.export(str(tmp_path / "qat"), verbose=False)
    qat = ov.convert_model(str(tmp_path / "qat"))
    for ir in (ptq, qat):
        counts = _quantized_multiply_inputs(ir)  # OpenVINO's reader may already have fused x * sigmoid(x)
        assert sorted(c for c in counts if c) == [2, 2] and 1 not in counts, counts
        compiled = ov.Core().compile_model(ir, "CPU")
        gates = [op for op in compiled.get_runtime_model().get_ops()
                 if op.get_rt_info()["layerType"].astype(str) == "Eltwise"
                 and op.get_rt_info()["runtimePrecision"].astype(str) in ("u8", "i8")]
        assert len(gates) >= 2  # both gate products execute in INT8


def squeeze_excite_net():
    """Keras applications' squeeze-and-excitation (EfficientNet, MobileNetV3): a global pooling without
    keepdims, a Reshape to (1, 1, C), 1x1 convolutions and the gate; a pooled Dense head."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="stem")(inp)
    for k in range(2):
        g = L.Reshape((1, 1, 16), name=f"se_reshape{k}")(L.GlobalAveragePooling2D(name=f"se_squeeze{k}")(x))
        g = L.Conv2D(16, 1, activation="sigmoid", name=f"se_expand{k}")(L.Conv2D(4, 1, activation="relu",
                                                                                name=f"se_reduce{k}")(g))
        x = L.Conv2D(16, 1, activation="relu", name=f"project{k}")(L.Multiply(name=f"gate{k}")([x, g]))
    return keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(x)))


def _standalone_fake_quantize(xml: str) -> int:
    """FakeQuantize ops the CPU plugin executes on their own (not fused into the op before or after them)."""
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return sum(op.get_rt_info()["layerType"].astype(str) == "FakeQuantize"
               for op in compiled.get_runtime_model().get_ops())


def test_qat_export_of_squeeze_excitation_runs_like_post_training_int8(rng, tmp_path):
    """tf2onnx writes a global pooling as ReduceMean + Squeeze, so a QAT quantizer of the pooled values lands
    after the Squeeze, where OpenVINO cannot fuse it into the reduction and runs it as a separate op (with layout
    reorders) in every squeeze-and-excitation block. The export moves it above the reshapes: the QAT IR then
    executes no more standalone FakeQuantize ops than the post-training INT8 IR of the same float model, and
    its outputs still follow the Keras QAT model."""
    model = squeeze_excite_net()
    x = rng.uniform(0, 1, (32, 16, 16, 3)).astype("float32")
    model.export(str(tmp_path / "float"), verbose=False)
    to_onnx(str(tmp_path / "float"), str(tmp_path / "float.onnx"))
    to_openvino(str(tmp_path / "float.onnx"), str(tmp_path / "float.xml"))
    ptq = calibration.calibrate(ov.Core().read_model(str(tmp_path / "float.xml")), [x[i:i + 1] for i in range(32)],
                                subset_size=32, verbose=False)
    ov.save_model(ptq, str(tmp_path / "ptq.xml"))
    q = quantize_model(model)
    q.compile(keras.optimizers.SGD(0.0), "mse")
    q.fit(x, rng.normal(size=(32, 10)), epochs=1, batch_size=8, callbacks=[RangeInit(2)], verbose=0)
    q.export(str(tmp_path / "qat"), verbose=False)
    check = {"image": x[:8]}
    to_onnx(str(tmp_path / "qat"), str(tmp_path / "qat.onnx"), check_inputs=check, tolerance=0.05)
    to_openvino(str(tmp_path / "qat.onnx"), str(tmp_path / "qat.xml"), check_inputs=check)
    assert _standalone_fake_quantize(str(tmp_path / "qat.xml")) <= _standalone_fake_quantize(str(tmp_path / "ptq.xml"))
    compiled = ov.Core().compile_model(str(tmp_path / "qat.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert calibration.int8_layers(compiled) == {"int8": 8, "total": 8}
    assert rel_error(compiled({0: x})[compiled.outputs[0]], q.predict(x, verbose=0)) < 0.05


def test_calibrating_a_qat_model_leaves_float_what_qat_left_float(rng, tmp_path):
    """A quantization-aware model says where it runs INT8: calibration completes the layers whose weights it
    quantized and adds nothing where it kept float (attention's score products, an ignored layer, the
    normalization). Quantizing those too put the INT8 IR 7 % away from the trained model."""
    inp = keras.Input((6, 8), name="x")
    a = L.MultiHeadAttention(2, 4, name="mha")(inp, inp)
    x = L.LayerNormalization()(L.Add()([a, inp]))
    x = L.Dense(8, activation="gelu", name="kept_float")(L.Dense(8, activation="relu", name="fc")(x))
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers QAT leaves float
        q = quantize_model(model, ignored_layers=["kept_float"])
    xs = rng.normal(size=(64, 6, 8)).astype("float32")
    q.compile("adam", "mse")
    q.fit(xs, rng.normal(size=(64, 2)), epochs=1, verbose=0)
    q.export(str(tmp_path / "sm"), verbose=False)
    np.save(tmp_path / "calib.npy", xs)
    export_saved_model(str(tmp_path / "sm"), str(tmp_path / "out"), calibration_data=str(tmp_path / "calib.npy"),
                       verbose=False)
    core = ov.Core()
    fp32, int8 = (core.read_model(str(tmp_path / "out" / f"model_{p}.xml")) for p in ("fp32", "int8"))

    def fake_quantizes(m):
        return sum(op.get_type_name() == "FakeQuantize" for op in m.get_ordered_ops())

    assert fake_quantizes(int8) == fake_quantizes(fp32) > 0
    # the IR's function (its quantizers in exact arithmetic: this CPU's INT8 kernels may saturate) is the
    # trained model's; calibration added no quantizer that would move it
    exact = core.compile_model(calibration.exact_arithmetic(int8), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert rel_error(exact(xs[:16])[exact.outputs[0]], q(xs[:16])) < 1e-5
    compiled = core.compile_model(int8, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    # fc, head and the attention's 4 projections (QuantMultiHeadAttention); not kept_float
    assert calibration.int8_layers(compiled) == {"int8": 6, "total": 7}
