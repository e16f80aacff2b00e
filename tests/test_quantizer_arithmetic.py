"""The quantizers' arithmetic against a reference written out op by op: the fake-quantized outputs, their gradients
(w.r.t. the input, the kernel and, in "learned" mode, the range) and the range-tracking updates must match it
bit for bit, eagerly and inside a ``tf.function``, in every phase (first batch, running min/max, EMA), for
symmetric and asymmetric ranges, full- and half-range weights, float32 and float16 (mixed precision) inputs.

The reference is the plain formula (min/max with 0 and 1e-6, the symmetric [-a * 128/127, a], the EMA
``m * old + (1 - m) * batch``; the kernel's abs-max per output channel and the 7-bit grid of
:func:`tfcompress.int8_policy.weight_grid`): the layers may compute it with fewer ops, never differently.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcompress.int8_policy import weight_grid
from tfcompress.quantization import ActivationQuantizer, QuantConv2D, fake_quant_weights


def reference_range(rmin, rmax, symmetric: bool):
    lo = tf.minimum(rmin, 0.0)
    hi = tf.maximum(rmax, 1e-6)
    if symmetric:
        a = tf.maximum(-lo, hi)
        lo = tf.where(lo < 0, -a * (128.0 / 127.0), 0.0)
        hi = a
    return lo, hi


def reference_observe(state: dict, x, range_mode: str, momentum: float) -> None:
    """One training batch's update of ``state`` (tf.Variables range_min, range_max, init_steps, initialized)."""
    bmin, bmax = tf.reduce_min(x), tf.reduce_max(x)
    first = tf.equal(state["initialized"], 0.0)
    initing = tf.greater(state["init_steps"], 0.0)
    cur_min, cur_max = tf.identity(state["range_min"]), tf.identity(state["range_max"])
    if range_mode == "ema":
        tracked_min = momentum * cur_min + (1 - momentum) * bmin
        tracked_max = momentum * cur_max + (1 - momentum) * bmax
    else:
        tracked_min, tracked_max = cur_min, cur_max
    state["range_min"].assign(tf.where(first, bmin, tf.where(initing, tf.minimum(cur_min, bmin), tracked_min)))
    state["range_max"].assign(tf.where(first, bmax, tf.where(initing, tf.maximum(cur_max, bmax), tracked_max)))
    state["initialized"].assign(1.0)
    state["init_steps"].assign(tf.maximum(state["init_steps"] - 1.0, 0.0))


def reference_quantizer(state: dict, x, training: bool, symmetric: bool, range_mode: str, momentum: float):
    if training:
        reference_observe(state, tf.stop_gradient(x), range_mode, momentum)
    lo, hi = reference_range(tf.identity(state["range_min"]), tf.identity(state["range_max"]), symmetric)
    return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8, narrow_range=False)


def reference_weights(kernel, per_channel: bool, half_range: bool):
    dtype = kernel.dtype
    k = tf.cast(kernel, tf.float32)
    m = tf.reduce_max(tf.abs(tf.reshape(k, (-1, k.shape[-1]))), axis=0) if per_channel else tf.reduce_max(tf.abs(k))
    limit, clip = weight_grid(tf.stop_gradient(tf.maximum(m, 1e-12)), half_range)
    if half_range:
        k = k + tf.stop_gradient(tf.clip_by_value(k, -clip, clip) - k)
    if not per_channel:
        q = tf.quantization.fake_quant_with_min_max_vars(k, -limit, limit, num_bits=8, narrow_range=True)
        return tf.cast(q, dtype)
    v = tf.reshape(k, (-1, k.shape[-1]))
    q = tf.quantization.fake_quant_with_min_max_vars_per_channel(v, -limit, limit, num_bits=8, narrow_range=True)
    return tf.cast(tf.reshape(q, k.shape), dtype)


# (initialized, init_steps): first batch, first batch with RangeInit(3), running min/max, EMA, and a state no
# callback sets (not initialised, no init steps left)
PHASES = {"first": (0.0, 1.0), "first_rangeinit": (0.0, 3.0), "running": (1.0, 2.0), "ema": (1.0, 0.0),
          "odd": (0.0, 0.0)}
PHASES_VARIABLES = ("range_min", "range_max", "init_steps", "initialized")


def _state(rng, phase: str) -> dict:
    initialized, steps = PHASES[phase]
    lo, hi = sorted(rng.normal(0.0, 1.5, 2))
    lo = lo if rng.random() < 0.7 else abs(lo) * 0.1  # sometimes a positive minimum (a ReLU output's range)
    hi = hi if rng.random() < 0.8 else -abs(hi) * 1e-7  # sometimes a maximum below 1e-6
    return dict(zip(PHASES_VARIABLES, (float(lo), float(hi), steps, initialized)))


def _input(rng, dtype: str):
    x = rng.normal(0.3, 2.0, (3, 5, 5, 4))
    if rng.random() < 0.3:
        x = np.abs(x)  # all positive: the symmetric range's lower end is 0
    return x.astype(dtype)


def _quantizer_step(q, training: bool):
    """Output and gradients w.r.t. x and the two range variables of the layer ``q``."""

    def step(x, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x, training=training)
        return y, tape.gradient(y, [x, q.range_min.value, q.range_max.value], output_gradients=tf.cast(g, y.dtype),
                                unconnected_gradients="zero")

    return step


def _reference_step(variables: dict, training: bool, symmetric: bool, range_mode: str, momentum: float):
    def step(x, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            x32 = tf.cast(x, tf.float32)  # the quantizer's dtype: Keras casts a float16 input up
            y = reference_quantizer(variables, x32, training, symmetric, range_mode, momentum)
        return y, tape.gradient(y, [x, variables["range_min"], variables["range_max"]],
                                output_gradients=tf.cast(g, y.dtype), unconnected_gradients="zero")

    return step


def _run(step, variables: dict, state: dict, x, g) -> list:
    """``step`` from ``state``: output, gradients, then the variables after the call."""
    for name, value in state.items():
        variables[name].assign(value)
    y, grads = step(tf.constant(x), tf.constant(g))
    return [y.numpy()] + [t.numpy() for t in grads] + [variables[n].numpy() for n in state]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("range_mode", ["ema", "learned"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_activation_quantizer_computes_the_reference_bit_for_bit(symmetric, range_mode, graph, rng):
    momentum = 0.9
    q = ActivationQuantizer(symmetric=symmetric, range_mode=range_mode, momentum=momentum)
    q.build(None)
    layer_vars = {n: getattr(q, n) for n in PHASES_VARIABLES}
    learned = range_mode == "learned"
    ref_vars = {n: tf.Variable(0.0, trainable=learned and n.startswith("range")) for n in PHASES_VARIABLES}
    wrap = tf.function if graph else (lambda f: f)
    steps = {training: (wrap(_quantizer_step(q, training)),
                        wrap(_reference_step(ref_vars, training, symmetric, range_mode, momentum)))
             for training in (True, False)}
    what = ["output", "d/dx", "d/drange_min", "d/drange_max", *PHASES_VARIABLES]
    range_grads = []
    for phase in PHASES:
        for dtype in ("float32", "float16"):
            for training, (step, reference) in steps.items():
                for _ in range(12):
                    state, x = _state(rng, phase), _input(rng, dtype)
                    g = rng.normal(size=x.shape).astype("float32")
                    got = _run(step, layer_vars, state, x, g)
                    want = _run(reference, ref_vars, state, x, g)
                    for name, a, b in zip(what, got, want):
                        np.testing.assert_array_equal(a, b, err_msg=f"{name}, {phase}, {dtype}, training={training}")
                    range_grads += got[2:4]
    # in "learned" mode the range gradients compared are not all zero
    assert any(np.any(d != 0) for d in range_grads) == learned


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_weight_quantizer_computes_the_reference_bit_for_bit(graph, rng):
    for shape in [(7,), (6, 5), (3, 4, 5), (3, 3, 4, 6), (2, 3, 3, 4, 5)]:
        for dtype in ("float32", "float16"):
            for per_channel in (True, False):
                for half_range in (True, False):
                    k = rng.normal(0.0, 0.2, shape).astype(dtype)
                    k[..., 0] = 0.0  # an all-zero channel (a pruned one): the 1e-12 floor
                    g = rng.normal(size=shape).astype(dtype)
                    results = []
                    for fq in (fake_quant_weights, reference_weights):
                        var = tf.Variable(k)

                        def step(fq=fq, var=var):
                            with tf.GradientTape() as tape:
                                q = fq(var, per_channel, half_range)
                            return q, tape.gradient(q, var, output_gradients=tf.constant(g))

                        q, dk = (tf.function(step) if graph else step)()
                        results.append((q.numpy(), dk.numpy()))
                    (q, dk), (q_ref, dk_ref) = results
                    where = f"{shape}, {dtype}, per_channel={per_channel}, half_range={half_range}"
                    np.testing.assert_array_equal(q, q_ref, err_msg=where)
                    np.testing.assert_array_equal(dk, dk_ref, err_msg=where)


def test_mixed_precision_twin_computes_the_reference_bit_for_bit(rng):
    """Under mixed_float16 a QuantConv2D gets its kernel cast to float16 and a quantizer gets a float16 input."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        conv = QuantConv2D(6, 3, padding="same", half_range=True)
        quantizer = ActivationQuantizer()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = tf.constant(rng.normal(size=(2, 6, 6, 4)).astype("float16"))
    conv.build(x.shape)
    quantizer.build(None)
    conv.kernel.assign(rng.normal(0.0, 0.2, conv.kernel.shape))
    state = _state(rng, "first")
    for name, value in state.items():
        getattr(quantizer, name).assign(value)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv(quantizer(x, training=True))
        return y, tape.gradient(y, [x, conv.kernel.value])

    y, (dx, dk) = step(x)
    ranges = {n: tf.Variable(v, dtype=tf.float32) for n, v in state.items()}

    @tf.function
    def reference(x):
        kernel = conv.kernel.value
        with tf.GradientTape() as tape:
            tape.watch(x)
            a = tf.cast(reference_quantizer(ranges, tf.cast(x, tf.float32), True, True, "ema", 0.99), tf.float16)
            k = reference_weights(tf.cast(kernel, tf.float16), True, True)
            y = tf.nn.conv2d(a, k, 1, "SAME") + tf.cast(conv.bias.value, tf.float16)
        return y, tape.gradient(y, [x, kernel])

    y_ref, (dx_ref, dk_ref) = reference(x)
    assert y.dtype == tf.float16
    np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
    np.testing.assert_array_equal(dx.numpy(), dx_ref.numpy())
    np.testing.assert_array_equal(dk.numpy(), dk_ref.numpy())
    np.testing.assert_array_equal(quantizer.range_max.numpy(), ranges["range_max"].numpy())
