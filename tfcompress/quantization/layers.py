"""Keras layers and constraints for quantization-aware training.

They emit ``tf.quantization.fake_quant_with_min_max_vars`` (activations, per tensor, 8 bits) and
``fake_quant_with_min_max_vars_per_channel`` (weights, per output channel, symmetric, narrow range), so an
exported SavedModel carries the quantization: OpenVINO's TF frontend keeps it as FakeQuantize, and
``tfcompress.export.to_onnx`` restores the int8 weights that tf2onnx folds away.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfcompress.graph.custom_layers import register_layer
from tfcompress.graph.kernels import channel_mask
from tfcompress.int8_policy import weight_grid

__all__ = [
    "ActivationQuantizer", "ChannelMask", "QuantConv1D", "QuantConv2D", "QuantConv3D", "QuantConv1DTranspose",
    "QuantConv2DTranspose", "QuantConv3DTranspose", "QuantDense", "QuantDepthwiseConv1D", "QuantDepthwiseConv2D",
    "QuantEinsumDense", "QuantMultiHeadAttention", "QuantSeparableConv1D", "QuantSeparableConv2D",
    "fake_quant_weights",
]

_PACKAGE = "tfcompress"


def fake_quant_weights(kernel, per_channel: bool = True, half_range: bool = False):
    """Symmetric int8 fake-quantization of a ``(..., out)`` kernel on the [-m, m] grid, 255 levels.

    The range is the kernel's own abs-max m (per output channel): always exact, and gradients pass straight
    through. ``half_range`` (the overflow fix) puts the weights on the 7-bit grid of post-training calibration
    (:func:`tfcompress.int8_policy.weight_grid`: a step of m / 63.5, the abs-max clipped to level 63, with the
    gradient passing the clip unchanged): they then take the integers -63..63 only, and INT8 kernels of CPUs
    without VNNI cannot saturate their int16 pair sums (see ``tfcompress.calibration.cpu_saturates_int8``).
    """
    k = tf.convert_to_tensor(kernel)  # one read of a variable
    dtype = k.dtype
    k = tf.cast(k, tf.float32)  # TF's FakeQuant ops take float32 only (a mixed_float16 layer's is float16)
    m = tf.reduce_max(tf.abs(k), axis=list(range(len(k.shape) - 1)) if per_channel else None)
    limit, clip = weight_grid(tf.stop_gradient(tf.maximum(m, 1e-12)), half_range)
    if half_range:
        k = k + tf.stop_gradient(tf.clip_by_value(k, -clip, clip) - k)
    if not per_channel:
        return tf.cast(tf.quantization.fake_quant_with_min_max_vars(k, -limit, limit, num_bits=8, narrow_range=True),
                       dtype)
    # TF's per-channel FakeQuant (and its gradient) takes ranks 1..4: a Conv3D kernel goes through as a matrix
    v = tf.reshape(k, (-1, k.shape[-1])) if len(k.shape) > 4 else k
    q = tf.quantization.fake_quant_with_min_max_vars_per_channel(v, -limit, limit, num_bits=8, narrow_range=True)
    return tf.cast(tf.reshape(q, k.shape) if len(k.shape) > 4 else q, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ActivationQuantizer(keras.layers.Layer):
    """Fake-quantizes a tensor to 8 bits per tensor, with a range initialised from data.

    The range starts at the first training batch's min/max (or the running min/max over the first batches
    given to :class:`~tfcompress.quantization.RangeInit`), then is tracked with an exponential moving average
    (``range_mode="ema"``) or learned by gradient descent (``"learned"``; TF's FakeQuant has gradients for its
    min and max). It always contains 0.

    Args:
        symmetric: ``True`` (preset "performance"): a signed tensor gets [-a * 128/127, a] (int8, zero point
            0); ``False``: [min, max].
        range_mode: ``"ema"`` or ``"learned"``.
        momentum: EMA momentum.
    """

    def __init__(self, symmetric: bool = True, range_mode: str = "ema", momentum: float = 0.99, **kwargs):
        # TF's FakeQuant op takes float32 only: in a mixed-precision model the quantizer still computes in float32
        # (Keras casts its input up, and the next layer casts the output back to its own compute dtype)
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if range_mode not in ("ema", "learned"):
            raise ValueError(f"range_mode must be 'ema' or 'learned', got {range_mode!r}")
        self.symmetric = bool(symmetric)
        self.range_mode = range_mode
        self.momentum = float(momentum)

    def build(self, input_shape):
        learned = self.range_mode == "learned"
        self.range_min = self.add_weight(name="range_min", shape=(), initializer="zeros", trainable=learned,
                                         aggregation="mean")
        self.range_max = self.add_weight(name="range_max", shape=(), initializer="ones", trainable=learned,
                                         aggregation="mean")
        # > 0: still initialising (running min/max); counts down one per training batch
        self.init_steps = self.add_weight(name="init_steps", shape=(), initializer="ones", trainable=False,
                                          aggregation="mean")
        self.initialized = self.add_weight(name="initialized", shape=(), initializer="zeros", trainable=False,
                                           aggregation="mean")

    def quant_range(self):
        """The range ``(lo, hi)`` FakeQuant is given: the tracked range widened to contain 0 (and at least
        1e-6 wide), made symmetric for the "performance" preset."""
        rmin, rmax = tf.convert_to_tensor(self.range_min), tf.convert_to_tensor(self.range_max)
        if not self.symmetric:
            return tf.minimum(rmin, 0.0), tf.maximum(rmax, 1e-6)
        # a signed tensor gets [-a * 128/127, a]: zero point exactly 128, i.e. int8 with zero point 0.
        # [-a, a] puts the zero point at 127.5, which FakeQuant rounds to 127 or 128 depending on float
        # rounding of a: at 127 OpenVINO sees an asymmetric u8 tensor, which e.g. its INT8 transposed
        # convolution does not take (it falls back to float). a = max(-min(rmin, 0), max(rmax, 1e-6)), in
        # the fewest ops: tracing a QAT model is bound by its op count.
        a = tf.maximum(tf.maximum(-rmin, rmax), 1e-6)
        return tf.where(rmin < 0.0, a * (-128.0 / 127.0), 0.0), a

    def call(self, x, training=False):
        if training:
            self._observe(x)
        lo, hi = self.quant_range()  # read back after the update (under MirroredStrategy: the replicas' mean)
        return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8, narrow_range=False)

    def _observe(self, x):
        """Updates the range from the batch ``x``. The batch min/max reach only the variables' assignments, so
        no gradient flows through them."""
        bmin, bmax = tf.reduce_min(x), tf.reduce_max(x)
        steps = tf.convert_to_tensor(self.init_steps)
        first = tf.equal(tf.convert_to_tensor(self.initialized), 0.0)
        initing = tf.greater(steps, 0.0)
        cur_min = tf.convert_to_tensor(self.range_min)
        cur_max = tf.convert_to_tensor(self.range_max)
        m = self.momentum
        if self.range_mode == "ema":
            tracked_min = m * cur_min + (1 - m) * bmin
            tracked_max = m * cur_max + (1 - m) * bmax
        else:
            tracked_min, tracked_max = cur_min, cur_max  # learned by the optimizer
        new_min = tf.where(first, bmin, tf.where(initing, tf.minimum(cur_min, bmin), tracked_min))
        new_max = tf.where(first, bmax, tf.where(initing, tf.maximum(cur_max, bmax), tracked_max))
        self.range_min.assign(new_min)
        self.range_max.assign(new_max)
        self.initialized.assign(1.0)
        self.init_steps.assign(tf.maximum(steps - 1.0, 0.0))

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask  # value by value: the positions a mask leaves out stay left out

    def get_config(self):
        return {**super().get_config(), "symmetric": self.symmetric, "range_mode": self.range_mode,
                "momentum": self.momentum}


# for the channel engine: a per-tensor function applied channel by channel (0 stays 0, a constant a constant)
register_layer(ActivationQuantizer, "elementwise")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelMask(keras.constraints.Constraint):
    """Keeps pruned channels exactly zero through training (applied after every optimizer step).

    Args:
        keep: one flag per channel along ``axis`` (of the weight viewed with shape ``view``, if given).
        view: the shape to view the weight with.
        extra: more ``{"keep", "axis", "view", "blocks"}`` masks, all applied (e.g. pruned outputs and pruned
            inputs).
        inner: the weight's own constraint (a Keras constraint or its config), applied before the masks.
        blocks: the channels' blocks (a grouped convolution's kernel rows; see
            :func:`tfcompress.graph.kernels.channel_mask`).
    """

    def __init__(self, keep, axis: int = -1, view=None, extra=(), inner=None, blocks: int = 1):
        self.masks = [_mask_spec(keep, axis, view, blocks)]
        self.masks += [_mask_spec(m["keep"], m["axis"], m.get("view"), m.get("blocks", 1)) for m in extra]
        self.inner = keras.constraints.get(inner)

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        shape = tuple(w.shape)
        mask = np.ones(shape, np.float32)
        for m in self.masks:
            mask = mask * channel_mask(shape, m["keep"], m["axis"], m["view"], m["blocks"])
        return w * ops.cast(mask, w.dtype)

    def get_config(self):
        first, *extra = self.masks
        inner = None if self.inner is None else keras.constraints.serialize(self.inner)
        return {**first, "extra": extra, "inner": inner}


def _mask_spec(keep, axis, view, blocks) -> dict:
    return {"keep": [bool(k) for k in keep], "axis": int(axis), "view": list(view) if view else None,
            "blocks": int(blocks)}


class _QuantizedKernel:
    """Mixin of the layers whose kernel is fake-quantized: the ``per_channel`` and ``half_range`` options
    (see :func:`fake_quant_weights`; ``half_range`` is of the kernel, or of a separable convolution's pointwise
    kernel) and their config.

    ``keeps_channel_structure`` tells the channel engine that the layer still maps channels exactly like its
    Keras base class (only the kernel's values are rounded), so pruning and stripping work through it.
    """

    keeps_channel_structure = True

    def __init__(self, *args, per_channel: bool = True, half_range: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_channel = per_channel
        self.half_range = half_range

    def quantized_kernel(self, kernel, half_range: bool | None = None):
        return fake_quant_weights(kernel, self.per_channel, self.half_range if half_range is None else half_range)

    def get_config(self):
        return {**super().get_config(), "per_channel": self.per_channel, "half_range": self.half_range}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDense(_QuantizedKernel, keras.layers.Dense):
    """Dense whose kernel is fake-quantized (int8, symmetric, per output unit by default)."""

    def call(self, inputs, training=None):
        x = ops.matmul(inputs, self.quantized_kernel(self.kernel))
        if self.use_bias:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x


def _bias_and_activation(layer, x):
    """The bias (on the channel axis of ``layer.data_format``) and the activation of a convolution."""
    if layer.use_bias:
        rank = len(x.shape) - 2
        shape = (1, -1) + (1,) * rank if layer.data_format == "channels_first" else (1,) * (rank + 1) + (-1,)
        x = ops.add(x, ops.reshape(layer.bias, shape))
    return layer.activation(x) if layer.activation is not None else x


def _quantized_depthwise(layer, kernel, half_range: bool):
    """A (*window, c, m) depthwise kernel fake-quantized per output channel c * m + j."""
    k = tf.convert_to_tensor(kernel)
    *window, c, m = k.shape
    # per-channel quantization works on the last axis: view (*window, c, m) as (*window, 1, c * m)
    return tf.reshape(layer.quantized_kernel(tf.reshape(k, (*window, 1, c * m)), half_range), k.shape)


class _QuantConv(_QuantizedKernel):
    """Convolutions with a (*window, in / groups, out) kernel (Conv1D/2D/3D, grouped too), fake-quantized per
    output channel. Conv1D's causal padding is a zero pad before a valid convolution, as in Keras."""

    def call(self, inputs):
        padding = self.padding
        if padding == "causal":
            inputs = ops.pad(inputs, self._compute_causal_padding())
            padding = "valid"
        x = ops.conv(inputs, self.quantized_kernel(self.kernel), strides=list(self.strides), padding=padding,
                     dilation_rate=self.dilation_rate, data_format=self.data_format)
        return _bias_and_activation(self, x)


class _QuantDepthwiseConv(_QuantizedKernel):
    """Depthwise convolutions (a (*window, c, m) kernel), fake-quantized per output channel c * m + j."""

    def call(self, inputs):
        kernel = _quantized_depthwise(self, self.kernel, self.half_range)
        x = ops.depthwise_conv(inputs, kernel, strides=self.strides, padding=self.padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
        return _bias_and_activation(self, x)


class _QuantSeparableConv(_QuantizedKernel):
    """Separable convolutions as the depthwise and the pointwise convolution OpenVINO runs, each in INT8.

    Both kernels are fake-quantized per output channel, and the depthwise output, which is the pointwise
    convolution's input, gets its own :class:`ActivationQuantizer` (``intermediate_quantizer``): without it
    OpenVINO would run the pointwise convolution in float.

    Args:
        symmetric, range_mode: of the intermediate quantizer, as for :class:`ActivationQuantizer`.
        depthwise_half_range: the depthwise kernel on the overflow fix's 7-bit grid (``half_range`` is the
            pointwise kernel's): the two run as two OpenVINO layers, which the fix treats apart.
    """

    def __init__(self, *args, symmetric: bool = True, range_mode: str = "ema", depthwise_half_range: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.depthwise_half_range = depthwise_half_range
        self.intermediate_quantizer = ActivationQuantizer(symmetric=symmetric, range_mode=range_mode,
                                                          name="intermediate_quantizer")

    def build(self, input_shape):
        super().build(input_shape)
        self.intermediate_quantizer.build(None)

    def call(self, inputs, training=False):
        kernel = _quantized_depthwise(self, self.depthwise_kernel, self.depthwise_half_range)
        x = ops.depthwise_conv(inputs, kernel, strides=self.strides, padding=self.padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
        x = ops.cast(self.intermediate_quantizer(x, training=training), self.compute_dtype)
        x = ops.conv(x, self.quantized_kernel(self.pointwise_kernel), strides=1, padding="valid",
                     data_format=self.data_format)
        return _bias_and_activation(self, x)

    def get_config(self):
        q = self.intermediate_quantizer
        return {**super().get_config(), "symmetric": q.symmetric, "range_mode": q.range_mode,
                "depthwise_half_range": self.depthwise_half_range}


def einsum_kernel_axes(equation: str) -> tuple[list[int], list[int]]:
    """The axes of an ``EinsumDense`` kernel its equation sums over (shared with the input) and the ones it
    writes into the output (``"abc,cde->abde"``: ``[0]`` and ``[1, 2]``)."""
    operands, output = equation.split("->")
    kernel = operands.split(",")[1]
    return [i for i, a in enumerate(kernel) if a not in output], [i for i, a in enumerate(kernel) if a in output]


class _QuantEinsum(_QuantizedKernel):
    """EinsumDense with its kernel fake-quantized per output unit: per entry of the kernel axes that reach the
    output (a MultiHeadAttention projection's (in, heads, dims) kernel: per head and dimension, the columns
    OpenVINO's fully connected layer gets once the einsum is a matrix product)."""

    def call(self, inputs, training=None):
        x = ops.einsum(self.equation, inputs, self._quantized_einsum_kernel())
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x

    def _quantized_einsum_kernel(self):
        k = tf.convert_to_tensor(self.kernel)
        summed, written = einsum_kernel_axes(self.equation)
        order = summed + written
        t = k if order == sorted(order) else tf.transpose(k, order)
        rows = int(np.prod([t.shape[i] for i in range(len(summed))]))
        q = tf.reshape(self.quantized_kernel(tf.reshape(t, (rows, -1))), t.shape)
        return q if order == sorted(order) else tf.transpose(q, np.argsort(order).tolist())


class _QuantConvTranspose(_QuantizedKernel):
    """Transposed convolutions (a (*window, out, in) kernel), fake-quantized per output channel."""

    def call(self, inputs):
        k = tf.convert_to_tensor(self.kernel)
        swap = list(range(len(k.shape) - 2)) + [len(k.shape) - 1, len(k.shape) - 2]  # out last, and back
        q = tf.transpose(self.quantized_kernel(tf.transpose(k, swap)), swap)
        x = ops.conv_transpose(inputs, q, strides=list(self.strides), padding=self.padding,
                               output_padding=self.output_padding, dilation_rate=self.dilation_rate,
                               data_format=self.data_format)
        return _bias_and_activation(self, x)


# One twin per Keras class (so that ``from_config`` and the channel engine see the Keras class they extend);
# the behaviour lives in the mixin of its kernel layout above.

@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv1D(_QuantConv, keras.layers.Conv1D):
    """Conv1D whose kernel is fake-quantized (int8, symmetric, per output channel by default)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv2D(_QuantConv, keras.layers.Conv2D):
    """Conv2D whose kernel is fake-quantized (int8, symmetric, per output channel by default)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv3D(_QuantConv, keras.layers.Conv3D):
    """Conv3D whose kernel is fake-quantized (int8, symmetric, per output channel by default)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDepthwiseConv1D(_QuantDepthwiseConv, keras.layers.DepthwiseConv1D):
    """DepthwiseConv1D whose kernel is fake-quantized per output channel (input channel x multiplier)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantDepthwiseConv2D(_QuantDepthwiseConv, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D whose kernel is fake-quantized per output channel (input channel x multiplier)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantSeparableConv1D(_QuantSeparableConv, keras.layers.SeparableConv1D):
    """SeparableConv1D with both kernels fake-quantized and its intermediate tensor quantized."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantSeparableConv2D(_QuantSeparableConv, keras.layers.SeparableConv2D):
    """SeparableConv2D with both kernels fake-quantized and its intermediate tensor quantized."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv1DTranspose(_QuantConvTranspose, keras.layers.Conv1DTranspose):
    """Conv1DTranspose whose (w, out, in) kernel is fake-quantized per output channel."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv2DTranspose(_QuantConvTranspose, keras.layers.Conv2DTranspose):
    """Conv2DTranspose whose (h, w, out, in) kernel is fake-quantized per output channel."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantConv3DTranspose(_QuantConvTranspose, keras.layers.Conv3DTranspose):
    """Conv3DTranspose whose (d, h, w, out, in) kernel is fake-quantized per output channel."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantEinsumDense(_QuantEinsum, keras.layers.EinsumDense):
    """EinsumDense whose kernel is fake-quantized (int8, symmetric, per output unit by default)."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantMultiHeadAttention(_QuantizedKernel, keras.layers.MultiHeadAttention):
    """MultiHeadAttention whose query, key, value and output projections are :class:`QuantEinsumDense` layers
    and whose attention output (the output projection's input) gets its own :class:`ActivationQuantizer`
    (``intermediate_quantizer``): with the quantizers ``quantize_model`` puts on the query, value and key, OpenVINO
    runs the four projections in INT8, as post-training calibration quantizes them. The score and weighted-sum
    products of two activations stay float, as in calibration.

    Keras builds the projections inside ``build``; they are made quantized there by taking the twin's class,
    so their variables, names and checkpoint layout stay Keras's own. ``per_channel`` and ``half_range`` (the
    overflow fix) apply to all four. ``weight_masks`` keeps pruned heads and channels zero while it trains: a
    serialized :class:`ChannelMask` per projection weight (``"query/kernel"``, ``"attention_output/bias"``), set
    as that weight's constraint (Keras's one ``kernel_constraint`` would apply to all four).
    """

    def __init__(self, *args, symmetric: bool = True, range_mode: str = "ema", weight_masks: dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.symmetric, self.range_mode = bool(symmetric), range_mode
        self.weight_masks = dict(weight_masks or {})

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        for dense in (self.query_dense, self.key_dense, self.value_dense, self.output_dense):
            dense.__class__ = QuantEinsumDense
            dense.per_channel, dense.half_range = self.per_channel, self.half_range
            for w in dense.weights:
                spec = self.weight_masks.get(f"{dense.name}/{w.name}")
                if spec is not None:
                    w.constraint = keras.saving.deserialize_keras_object(spec)
        # made after the projections: the float layer's weights come first, in its order
        self.intermediate_quantizer = ActivationQuantizer(symmetric=self.symmetric, range_mode=self.range_mode,
                                                          name="intermediate_quantizer")
        self.intermediate_quantizer.build(None)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None, *args, **kwargs):
        output, scores = super()._compute_attention(query, key, value, attention_mask, training, *args, **kwargs)
        return ops.cast(self.intermediate_quantizer(output, training=training), self.compute_dtype), scores

    def get_config(self):
        return {**super().get_config(), "symmetric": self.symmetric, "range_mode": self.range_mode,
                "weight_masks": self.weight_masks}
