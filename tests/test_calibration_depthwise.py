"""INT8 calibration of depthwise networks and what fast bias correction may shift, against OpenVINO FP32."""

import keras
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from keras import layers as L

from tfcompress import calibration
from conftest import SHARED_DATA


def _f32(model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _run(compiled, x):
    return np.asarray(compiled({0: x})[compiled.outputs[0]])


def _on_grid(rng, shape, axes):
    """Weights exactly on the symmetric int8 grid of their per-output-channel abs-max (quantizing them is
    the identity)."""
    k = rng.integers(-127, 128, size=shape).astype(np.float32)
    reduce = tuple(a for a in range(len(shape)) if a not in axes)
    k = np.where(np.abs(k).max(axis=reduce, keepdims=True) == 127, k, np.clip(k, -126, 126))
    idx = [0] * len(shape)
    for a in axes:
        idx[a] = slice(None)
    k[tuple(idx)] = 127  # every output channel reaches 127 somewhere
    step = rng.uniform(0.001, 0.01, size=[shape[a] if a in axes else 1 for a in range(len(shape))])
    return (k * step).astype(np.float32)


def _grid_model(rng):
    """1x1 convolution -> ReLU -> 1x1 convolution -> ReLU -> fully connected, all with biases and with
    weights on the int8 grid."""
    p = ops.parameter([-1, 3, 16, 16], ov.Type.f32)
    y = ops.convolution(p, ops.constant(_on_grid(rng, (8, 3, 1, 1), (0,))), [1, 1], [0, 0], [0, 0], [1, 1])
    y = ops.relu(ops.add(y, ops.constant(rng.uniform(0.5, 1, (1, 8, 1, 1)).astype(np.float32))))
    y = ops.convolution(y, ops.constant(_on_grid(rng, (6, 8, 1, 1), (0,))), [1, 1], [0, 0], [0, 0], [1, 1])
    y = ops.relu(ops.add(y, ops.constant(rng.uniform(0.5, 1, (1, 6, 1, 1)).astype(np.float32))))
    y = ops.reduce_mean(y, np.array([2, 3], np.int64), False)
    y = ops.matmul(y, ops.constant(_on_grid(rng, (6, 5), (1,))), False, False)
    y = ops.add(y, ops.constant(rng.uniform(0.5, 1, (1, 5)).astype(np.float32)))
    return ov.Model([y.output(0)], [p])


def test_weights_on_the_int8_grid_get_no_bias_shift(rng):
    # For pointwise and fully-connected layers the shift is exactly the mean output that weight rounding
    # takes away: with weights already on the grid there is none, whatever the input's spatial pattern
    model = _grid_model(rng)
    yy, xx = np.mgrid[:16, :16]
    centre = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 20.0)
    x = (centre * rng.uniform(2, 5, size=(200, 3, 1, 1)) + rng.uniform(0, 0.3, size=(200, 3, 16, 16)))
    x = x.astype(np.float32)
    kw = dict(overflow_fix="disable", range_estimator="max", verbose=False)
    plain = calibration.calibrate(model, x, bias_correction=False, **kw)
    corrected = calibration.calibrate(model, x, **kw)
    np.testing.assert_allclose(_run(_f32(corrected), x), _run(_f32(plain), x), rtol=0, atol=1e-5)


def _spatial_model(w1, b1, w2, b2):
    """conv 3x3 stride 2 (TF's 'same' padding: one row and column at the end) + bias -> ReLU -> conv 3x3
    stride 1 'same' + bias, the layers fast bias correction shifts from a mean input map."""
    p = ops.parameter([-1, 4, 16, 16], ov.Type.f32)
    y = ops.convolution(p, ops.constant(w1), [2, 2], [0, 0], [1, 1], [1, 1])
    y = ops.relu(ops.add(y, ops.constant(b1.reshape(1, -1, 1, 1))))
    y = ops.convolution(y, ops.constant(w2), [1, 1], [1, 1], [1, 1], [1, 1])
    return ov.Model([ops.add(y, ops.constant(b2.reshape(1, -1, 1, 1))).output(0)], [p])


def _patterned_images(rng, n):
    """Images with a strong spatial pattern (a bright centre, a dim border, a checkerboard): their mean map is
    far from its per-channel means."""
    yy, xx = np.mgrid[:16, :16]
    pattern = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / 12.0) + 0.5 * ((yy + xx) % 2)
    noise = rng.uniform(0, 0.2, size=(n, 4, 16, 16))
    return (pattern * rng.uniform(1, 4, size=(n, 4, 1, 1)) + noise).astype(np.float32)


def _conv_weights_and_biases(model) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each Convolution's weights (int8 constants times their scales, or float) and the bias added after it."""
    def value(output):
        node = output.get_node()
        if node.get_type_name() == "Constant":
            return node.get_data().astype(np.float64)
        if node.get_type_name() == "Convert":
            return value(node.input_value(0))
        assert node.get_type_name() == "Multiply", node.get_type_name()
        return value(node.input_value(0)) * value(node.input_value(1))

    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            add = next(iter(op.output(0).get_target_inputs())).get_node()
            found.append((value(op.input_value(1)), value(add.input_value(1)).ravel()))
    return found


def test_spatial_layers_with_weights_on_the_int8_grid_get_no_bias_shift(rng):
    # A 3x3 convolution's shift is the mean output that weight rounding takes away, as a pointwise layer's:
    # with weights on the grid there is none, however the input's spatial pattern meets padding and strides
    # (NNCF's fast bias correction shifts these biases by conv(mean map) - conv(channel means))
    b1, b2 = rng.uniform(2, 4, 8).astype(np.float32), rng.uniform(4, 8, 6).astype(np.float32)
    model = _spatial_model(_on_grid(rng, (8, 4, 3, 3), (0,)), b1, _on_grid(rng, (6, 8, 3, 3), (0,)), b2)
    x = _patterned_images(rng, 200)
    kw = dict(overflow_fix="disable", range_estimator="max", verbose=False)
    plain = calibration.calibrate(model, x, bias_correction=False, **kw)
    corrected = calibration.calibrate(model, x, **kw)
    pairs = zip(_conv_weights_and_biases(plain), _conv_weights_and_biases(corrected), strict=True)
    for (_, before), (_, after) in pairs:
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_spatial_bias_shift_is_the_mean_error_of_the_quantized_weights(rng):
    """Each 3x3 convolution's bias moves by the mean over samples and positions of conv(x, W - Wq), with Wq
    the IR's int8 weights and x the layer's FP32 input on the calibration images."""
    w1, w2 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32), rng.normal(size=(6, 8, 3, 3)).astype(np.float32)
    b1, b2 = rng.uniform(2, 4, 8).astype(np.float32), rng.uniform(20, 40, 6).astype(np.float32)
    model = _spatial_model(w1, b1, w2, b2)
    x = _patterned_images(rng, 200)
    q = calibration.calibrate(model, x, overflow_fix="disable", range_estimator="max", verbose=False)
    (wq1, got1), (wq2, got2) = _conv_weights_and_biases(q)
    p = ops.parameter([-1, 4, 16, 16], ov.Type.f32)
    conv1 = ops.convolution(p, ops.constant(w1), [2, 2], [0, 0], [1, 1], [1, 1])
    relu = ops.relu(ops.add(conv1, ops.constant(b1.reshape(1, -1, 1, 1))))
    errors = [ops.convolution(p, ops.constant((w1 - wq1).astype(np.float32)), [2, 2], [0, 0], [1, 1], [1, 1]),
              ops.convolution(relu, ops.constant((w2 - wq2).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])]
    probe = _f32(ov.Model([e.output(0) for e in errors], [p]))
    out = probe({0: x})
    for k, (got, b) in enumerate(((got1, b1), (got2, b2))):
        expected = b + np.asarray(out[probe.outputs[k]], np.float64).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def _mean_output_errors(fp, x, **kw) -> dict:
    """Per output channel, the mean over samples and positions of the INT8 model's output minus the FP32
    model's, both run by OpenVINO (f32 hint), without and with bias correction."""
    ref = _run(_f32(fp), x)
    kw = dict(overflow_fix="disable", range_estimator="max", verbose=False) | kw
    return {bc: (_run(_f32(calibration.calibrate(fp, x, bias_correction=bc, **kw)), x) - ref).mean(axis=(0, 2, 3))
            for bc in (False, True)}


def _biased_layer(op, bias):
    p = ops.parameter([-1, 4, 16, 16], ov.Type.f32)
    return ov.Model([ops.add(op(p), ops.constant(bias.reshape(1, -1, 1, 1))).output(0)], [p])


def test_a_zero_bias_does_not_stop_the_other_channels_correction(rng):
    # one channel's bias is 0 (a channel always off before its ReLU, say): the shift is the exact mean error of
    # the rounded weights on every channel, so every channel gets it, whatever its bias
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    bias = rng.uniform(0.01, 0.02, 8).astype(np.float32)
    bias[0] = 0.0
    model = _biased_layer(lambda p: ops.convolution(p, ops.constant(w), [1, 1], [1, 1], [1, 1], [1, 1]), bias)
    errors = _mean_output_errors(model, _patterned_images(rng, 200))
    assert np.abs(errors[False]).max() > 0.02  # rounding the weights moves the mean output
    # what is left is the rounding of the inputs: at most 4e-4 here (seeds 0-2), against 0.045-0.08 uncorrected
    np.testing.assert_allclose(errors[True], 0, atol=2e-3)


@pytest.mark.parametrize("bias_shape", [(1, 1, 2, 2), (4, 1, 1, 1)])
def test_a_bias_that_is_not_one_per_output_channel_is_not_shifted(rng, bias_shape):
    # a constant added after the layer with as many values as it has output channels, but along other axes (one
    # per position of its 2x2 output; one per sample): a shift per channel cannot be folded into it, so the
    # model is the one calibrated without bias correction
    w = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    p = ops.parameter([4, 4, 16, 16], ov.Type.f32)
    conv = ops.convolution(p, ops.constant(w), [8, 8], [1, 1], [1, 1], [1, 1])  # output [4, 4, 2, 2]
    bias = rng.uniform(0.5, 1, bias_shape).astype(np.float32)
    model = ov.Model([ops.add(conv, ops.constant(bias)).output(0)], [p])
    x = _patterned_images(rng, 40)
    kw = dict(overflow_fix="disable", range_estimator="max", verbose=False)
    batches = [x[k:k + 4] for k in range(0, len(x), 4)]
    plain, corrected = (_f32(calibration.calibrate(model, batches, bias_correction=bc, **kw)) for bc in (False, True))
    np.testing.assert_array_equal(_run(corrected, x[:4]), _run(plain, x[:4]))


@pytest.mark.parametrize("shape, strides", [((4, 1, 1, 3, 3), [1, 1]), ((4, 1, 1, 3, 3), [2, 2]),
                                            ((2, 4, 2, 3, 3), [1, 1])])
def test_grouped_convolutions_lose_the_mean_error_of_their_rounded_weights(rng, shape, strides):
    # depthwise (one input channel per group, 'same' padding, stride 1 or 2) and grouped (two groups of two
    # inputs, four outputs each): the shift is the layer run with the weights rounding takes away, on the
    # mean input map, as for any convolution
    w = rng.normal(size=shape).astype(np.float32)
    bias = rng.uniform(0.5, 1, shape[0] * shape[1]).astype(np.float32)
    model = _biased_layer(lambda p: ops.group_convolution(p, ops.constant(w), strides, [1, 1], [1, 1], [1, 1]), bias)
    errors = _mean_output_errors(model, _patterned_images(rng, 200))
    assert np.abs(errors[False]).max() > 0.01  # 0.013-0.063 (seeds 0-2); corrected at most 4e-4
    np.testing.assert_allclose(errors[True], 0, atol=2e-3)


def _depthwise_model(rng):
    """A small MobileNetV1-like Keras model (depthwise 3x3 + pointwise 1x1 blocks, 'same' padding, strides)
    whose channels span very different ranges (per-channel input scales from 0.03 to 3), without softmax."""
    keras.utils.set_random_seed(int(rng.integers(1 << 30)))
    inp = keras.Input((32, 32, 3))
    x = L.ReLU(name="stem_relu")(L.Conv2D(8, 3, strides=2, padding="same", name="stem")(inp))
    for k, (filters, stride) in enumerate(((16, 1), (24, 2), (32, 1))):
        x = L.ReLU()(L.DepthwiseConv2D(3, strides=stride, padding="same", name=f"dw_{k}")(x))
        x = L.ReLU()(L.Conv2D(filters, 1, name=f"pw_{k}")(x))
    out = L.Dense(6, name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D)):
            kernel, bias = layer.get_weights()
            scale = 10.0 ** rng.uniform(-1.5, 0.5, size=kernel.shape[-1])
            layer.set_weights([kernel * scale, rng.uniform(-0.1, 0.3, size=bias.shape) * scale])
    return model


@pytest.fixture(scope="module")
def depthwise_ir(tmp_path_factory):
    rng = np.random.default_rng(7)
    model = _depthwise_model(rng)
    d = tmp_path_factory.mktemp("dw")
    model.export(str(d / "sm"), verbose=False)
    fp = ov.convert_model(str(d / "sm"))
    x = rng.uniform(0, 1, size=(500, 32, 32, 3)).astype(np.float32)
    x[:, 8:24, 8:24] *= 3.0  # a spatial pattern: brighter centre
    return fp, x[:300], x[300:]


def test_depthwise_inputs_are_quantized_per_channel_and_run_int8(depthwise_ir):
    fp, calib, _ = depthwise_ir
    q = calibration.calibrate(fp, calib, verbose=False)
    widths = {}
    for op in q.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        readers = {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()}
        size = op.input(2).get_source_output().get_node().get_data().size
        widths.setdefault(frozenset(readers), []).append(size)
    assert sorted(widths[frozenset({"GroupConvolution"})]) == [8, 16, 24]  # one range per channel
    assert all(s == 1 for r, sizes in widths.items() if "GroupConvolution" not in r for s in sizes)
    assert calibration.int8_layers(ov.Core().compile_model(q, "CPU")) == {"int8": 8, "total": 8}


class _LegacyDepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """The VWW model's DepthwiseConv2D config carries a ``groups`` argument Keras 3 refuses."""

    def __init__(self, *args, groups=None, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="module")
def vww_ir(tmp_path_factory):
    """The pretrained MLPerf Tiny VWW MobileNetV1-0.25 (96x96, 13 depthwise layers) as an FP32 IR, and
    CIFAR-10 JPEG test images resized to 96x96 in [0, 1]: 300 for calibration, 500 others."""
    import tensorflow as tf

    model = keras.models.load_model(SHARED_DATA / "models" / "mlperf_tiny" / "vww_96.h5", compile=False,
                                    custom_objects={"DepthwiseConv2D": _LegacyDepthwiseConv2D})
    d = tmp_path_factory.mktemp("vww")
    model.export(str(d / "sm"), verbose=False)
    x = np.load(SHARED_DATA / "cifar10" / "cifar10_jpeg_q75_test.npz")["x_test"][:800]
    x = (tf.image.resize(x.astype(np.float32), (96, 96)).numpy() / 255.0).astype(np.float32)
    return ov.convert_model(str(d / "sm")), x[:300], x[300:]


def test_bias_correction_never_moves_a_depthwise_model_away_from_fp32(vww_ir):
    fp, calib, held_out = vww_ir
    reference = _run(_f32(fp), held_out)
    errors = {}
    for bc in (False, True):
        q = calibration.calibrate(fp, calib, bias_correction=bc, verbose=False)
        errors[bc] = float(np.abs(_run(ov.Core().compile_model(q, "CPU"), held_out) - reference).mean())
    # mean absolute error of the output probabilities; 2 % of it is the scale of BF16 / kernel noise
    assert errors[True] <= errors[False] * 1.02, errors


def test_a_dead_channel_gets_a_range_of_a_hundredth_of_the_widest(tmp_path):
    """A per-channel range is floored at MIN_CHANNEL_WIDTH of its tensor's widest channel (NNCF's floor), so
    a channel that is always zero does not get a scale 1e8 times smaller than its neighbours'."""
    from tfcompress.calibration.quantize import MIN_CHANNEL_WIDTH

    rng = np.random.default_rng(3)
    model = _depthwise_model(rng)
    stem = model.get_layer("stem")
    kernel, bias = stem.get_weights()
    kernel[..., 0], bias[0] = 0.0, -1.0  # stem channel 0: always negative, zero after its ReLU
    stem.set_weights([kernel, bias])
    model.export(str(tmp_path / "sm"), verbose=False)
    fp = ov.convert_model(str(tmp_path / "sm"))
    x = rng.uniform(0, 1, size=(64, 32, 32, 3)).astype(np.float32)
    q = calibration.calibrate(fp, x, verbose=False)
    fq = next(op for op in q.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
              and "GroupConvolution" in {t.get_node().get_type_name() for t in op.output(0).get_target_inputs()})
    lo, hi = (fq.input(i).get_source_output().get_node().get_data().reshape(-1) for i in (1, 2))
    assert lo.size == 8 and np.all(lo == 0)
    assert hi[0] == pytest.approx(MIN_CHANNEL_WIDTH * hi.max(), rel=1e-5)
    live = hi[1:] >= MIN_CHANNEL_WIDTH * hi.max()
    assert live.any() and np.all(hi[1:] >= MIN_CHANNEL_WIDTH * hi.max() * (1 - 1e-6))
    out, ref = _run(ov.Core().compile_model(q, "CPU"), x), _run(_f32(fp), x)
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


def _int8_weight_maxima(model) -> list[int]:
    """Largest |integer| of each int8 weight constant, in graph order."""
    return [int(np.abs(op.get_data()).max()) for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]


def _biased_relu(rng, y, channels: int):
    return ops.relu(ops.add(y, ops.constant(rng.uniform(0.1, 0.5, (1, channels, 1, 1)).astype(np.float32))))


def _depthwise_first_model(rng):
    """Raw-pixel-like input -> depthwise 3x3 -> 1x1 convolution -> depthwise 3x3 with a channel multiplier
    of 2 -> depthwise 3x3 -> spatial mean -> fully connected (biases and ReLUs between)."""
    p = ops.parameter([-1, 4, 12, 12], ov.Type.f32)
    w = lambda *shape: ops.constant(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    y = _biased_relu(rng, ops.group_convolution(p, w(4, 1, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1]), 4)
    y = _biased_relu(rng, ops.convolution(y, w(8, 4, 1, 1), [1, 1], [0, 0], [0, 0], [1, 1]), 8)
    y = _biased_relu(rng, ops.group_convolution(y, w(8, 2, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1]), 16)
    y = _biased_relu(rng, ops.group_convolution(y, w(16, 1, 1, 3, 3), [1, 1], [1, 1], [1, 1], [1, 1]), 16)
    y = ops.matmul(ops.reduce_mean(y, np.array([2, 3], np.int64), False), w(16, 5), False, False)
    return ov.Model([y.output(0)], [p])


@pytest.mark.parametrize("fix, expected", [
    ("first_layer", [127, 63, 127, 127, 127]), ("enable", [127, 63, 63, 127, 63]), ("disable", [127] * 5)])
def test_overflow_fix_leaves_depthwise_layers_on_the_whole_grid(rng, fix, expected):
    # a depthwise convolution (one output channel per input channel) cannot saturate, so it keeps 8 bits and
    # the first layers are the ones after it; one with a channel multiplier can, and is fixed like any other
    model = _depthwise_first_model(rng)
    x = rng.uniform(0, 255, (64, 4, 12, 12)).astype(np.float32)
    q = calibration.calibrate(model, x, overflow_fix=fix, range_estimator="max", verbose=False)
    assert _int8_weight_maxima(q) == expected
    assert calibration.int8_layers(_f32(q)) == {"int8": 5, "total": 5}


@pytest.mark.parametrize("multiplier", [1, 2])
def test_only_depthwise_kernels_with_a_channel_multiplier_saturate(multiplier):
    # what the overflow fix's choice of layers rests on: u8 inputs at 255 times weights at 127, a product pair
    # (64770) that overflows int16 where the CPU's INT8 kernel adds pairs (x86 without VNNI)
    p = ops.parameter([1, 8, 6, 6], ov.Type.f32)
    x = ops.fake_quantize(p, np.float32(0), np.float32(255), np.float32(0), np.float32(255), 256)
    w = ops.fake_quantize(ops.constant(np.ones((8, multiplier, 1, 3, 3), np.float32)), np.float32(-1),
                          np.float32(1), np.float32(-1), np.float32(1), 255)
    model = ov.Model([ops.group_convolution(x, w, [1, 1], [0, 0], [0, 0], [1, 1]).output(0)], [p])
    calibration.compress_weights(model)
    compiled = _f32(model)
    assert calibration.int8_layers(compiled) == {"int8": 1, "total": 1}
    err = np.abs(_run(compiled, np.full((1, 8, 6, 6), 255, np.float32)) / (255 * 9) - 1).max()
    if multiplier > 1 and calibration.cpu_saturates_int8():
        assert err > 0.3, err  # pairs saturated at 32767: about half of each sum is lost
    else:
        assert err < 1e-6, err  # exact: 255 * 9
