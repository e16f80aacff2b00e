"""calibration.exact_arithmetic: an INT8 IR run as float arithmetic, against its definition and this CPU's
INT8 kernels (which saturate on x86 without VNNI)."""

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from tfcompress import calibration


def _f32(model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _run(model, x):
    compiled = _f32(model)
    return np.asarray(compiled({0: x})[compiled.outputs[0]])


def _int8_conv(weight_level: int, channels: int = 8) -> ov.Model:
    """u8 input (0..255) -> 3x3 convolution of ``channels`` input channels, every weight at ``weight_level``
    of the int8 grid, stored as int8 constants (as calibration writes them)."""
    p = ops.parameter([1, channels, 6, 6], ov.Type.f32)
    x = ops.fake_quantize(p, np.float32(0), np.float32(255), np.float32(0), np.float32(255), 256)
    w = ops.fake_quantize(ops.constant(np.full((4, channels, 3, 3), weight_level / 127, np.float32)),
                          np.float32(-1), np.float32(1), np.float32(-1), np.float32(1), 255)
    model = ov.Model([ops.convolution(x, w, [1, 1], [0, 0], [0, 0], [1, 1]).output(0)], [p])
    calibration.compress_weights(model)
    return model


@pytest.mark.parametrize("weight_level", [63, 127])
def test_exact_arithmetic_runs_no_int8_kernel_and_never_saturates(weight_level):
    # u8 inputs at 255 times weights at 127: a product pair of 64,770, beyond int16, where the CPU's kernel
    # adds pairs (x86 without VNNI); at 63 a pair (32,130) fits
    model = _int8_conv(weight_level)
    assert calibration.is_quantized(model)
    assert calibration.int8_layers(_f32(model)) == {"int8": 1, "total": 1}
    exact = calibration.exact_arithmetic(model)
    assert not calibration.is_quantized(exact)
    assert calibration.int8_layers(_f32(exact)) == {"int8": 0, "total": 1}
    x = np.full((1, 8, 6, 6), 255, np.float32)
    expected = 255 * weight_level / 127 * 9 * 8
    np.testing.assert_allclose(_run(exact, x), expected, rtol=1e-6)
    err = np.abs(_run(model, x) / expected - 1).max()
    if weight_level == 127 and calibration.cpu_saturates_int8():
        assert err > 0.3, err  # pairs saturated at 32767: about half of each sum is lost
    else:
        assert err < 1e-6, err
    assert calibration.int8_layers(_f32(model)) == {"int8": 1, "total": 1}  # the model given is not changed


def test_exact_arithmetic_computes_fake_quantize_by_its_definition(rng):
    # clamp to [low, high], round (half to even) to levels - 1 steps, map onto [out_low, out_high]
    p = ops.parameter([-1, 64], ov.Type.f32)
    low, high, out_low, out_high = (np.float32(v) for v in (-1.0, 3.0, -2.0, 5.0))
    model = ov.Model([ops.fake_quantize(p, low, high, out_low, out_high, 16).output(0)], [p])
    x = rng.uniform(-2, 4, (32, 64)).astype(np.float32)
    steps = (np.clip(x.astype(np.float64), low, high) - low) / (high - low) * 15
    expected = np.round(steps) / 15 * (out_high - out_low) + out_low
    tie = np.abs(steps - np.floor(steps) - 0.5) < 1e-4  # where float32 and float64 may round apart
    got = _run(calibration.exact_arithmetic(model), x)
    assert tie.sum() < 5 and np.abs(got - expected)[~tie].max() < 1e-5
    assert len(np.unique(got)) == 16  # every level met: clamped below and above, and between


def test_activation_scale_moves_activation_quantizers_only():
    # a weight FakeQuantize (constant input) keeps its input; an activation quantizer reads it scaled
    p = ops.parameter([1, 4], ov.Type.f32)
    act = ops.fake_quantize(p, np.float32(0), np.float32(255), np.float32(0), np.float32(255), 256)
    w = ops.fake_quantize(ops.constant(np.eye(4, dtype=np.float32)), np.float32(-1), np.float32(1),
                          np.float32(-1), np.float32(1), 255)
    model = ov.Model([ops.matmul(act, w, False, False).output(0)], [p])
    x = np.array([[10, 20, 30, 40]], np.float32)
    np.testing.assert_allclose(_run(calibration.exact_arithmetic(model, activation_scale=2.0), x), 2 * x)
    np.testing.assert_allclose(_run(calibration.exact_arithmetic(model), x), x)


def test_a_float_model_is_not_quantized():
    p = ops.parameter([1, 4], ov.Type.f32)
    assert not calibration.is_quantized(ov.Model([ops.relu(p).output(0)], [p]))
