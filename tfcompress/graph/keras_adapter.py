"""Translate a Keras 3 Functional or Sequential model into the channel engine's graph.

The adapter only translates: it walks the model's calls and gives each one a kind
(:mod:`tfcompress.graph.keras_kinds`: a canonical op of :data:`tfcompress.graph.ops.OPS` with a reader of the
layer's parameters). Three tables choose it: :data:`KERAS_LAYERS` (Keras layer classes), :data:`KERAS_OPS` (the
raw ``keras.ops`` nodes Keras records for ``x + y``, ``keras.ops.mean`` ...) and the declarations of
:func:`tfcompress.graph.custom_layers.register_layer` (custom layers); anything else blocks. Nested models are
inlined: layer names inside them are prefixed with the sub-model's name (``"block/conv"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
import numpy as np

from tfcompress.graph import keras_kinds as kinds, ops
from tfcompress.graph.custom_layers import LayerRule, register_layer, registered_rule
from tfcompress.graph.engine import ChannelGraph, ChannelGroup, Op, Rule
from tfcompress.graph.keras_kinds import (
    ChannelParam, KindFactory, LayerCall, LayerKind, activation_op, table_kind,
)
from tfcompress.graph.keras_layers import PARTIAL_NORMALIZATIONS

__all__ = [
    "ChannelParam", "KerasGraph", "LayerKind", "LayerRule", "UnsupportedModelError", "build_graph", "call_path",
    "register_layer",
]

PART = ":"  # joins a layer's path and the name of a part of its call (:meth:`LayerKind.parts`): "mha:heads"


def call_path(layer: str) -> str:
    """The path of the Keras layer an op's ``layer`` name belongs to: a part of a call (``"mha:heads"``) belongs to
    the called layer (``"mha"``); any other name is a layer's own."""
    return layer.rpartition(PART)[0] or layer


class UnsupportedModelError(ValueError):
    """The model's structure cannot be analysed (e.g. a subclassed model)."""


# --------------------------------------------------------------------------- helpers

def _overrides_call(layer: keras.layers.Layer, base: type) -> bool:
    """A user subclass that changes ``call`` is not what its base class says it is.

    A class that declares ``keeps_channel_structure = True`` (tfcompress's quantization-aware layers, which
    change ``call`` only to fake-quantize the kernel) counts as its base class.
    """
    if getattr(type(layer), "keeps_channel_structure", False):
        return False
    return type(layer).call is not base.call


def _channels_last(layer: keras.layers.Layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def _blocker(layer: keras.layers.Layer) -> KindFactory:
    """The blocker a layer the rules do not cover is; one with its channels first says so."""
    return kinds.BLOCKER if _channels_last(layer) else kinds.ChannelsFirst


# --------------------------------------------------------------------------- keras.ops nodes

# keras.ops operation class -> its canonical op in tfcompress.graph.ops.OPS, applied position by position
_POINTWISE_OPS = {
    "Add": "add", "Subtract": "sub", "Multiply": "mul", "Divide": "div", "TrueDivide": "div", "Maximum": "max",
    "Minimum": "min", "Negative": "neg", "Absolute": "abs", "Square": "square", "Sqrt": "sqrt", "Rsqrt": "rsqrt",
    "Reciprocal": "reciprocal", "Exp": "exponential", "Expm1": "expm1", "Log": "log", "Log1p": "log1p",
    "Sin": "sin", "Cos": "cos",
    "Tanh": "tanh", "Sigmoid": "sigmoid", "Relu": "relu", "Relu6": "relu6", "Silu": "silu",
    "HardSigmoid": "hard_sigmoid", "HardSilu": "hard_silu", "Gelu": "gelu", "Elu": "elu", "Selu": "selu",
    "Celu": "celu", "Softplus": "softplus", "Softsign": "softsign", "LeakyRelu": "leaky_relu",
    "LogSigmoid": "log_sigmoid", "Clip": "clip", "Cast": "linear", "Erf": "erf", "Sign": "sign",
    "Floor": "floor", "Ceil": "ceil", "Round": "round",
    "Greater": "greater", "GreaterEqual": "greater_equal", "Less": "less", "LessEqual": "less_equal",
    "Equal": "equal", "NotEqual": "not_equal", "Where": "where",
}


def _is_scalar(v: Any) -> bool:
    return np.ndim(v) == 0 or np.size(v) == 1


def _op_pointwise(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """Elementwise with one tensor (the rest scalars or per-channel constants), a join of several tensors of
    the output's channels."""
    operands = [v for v in keras.tree.flatten(node.arguments.args)
                if kinds.is_operand(v) and not isinstance(v, keras.KerasTensor)]
    rank = len(out_shape)
    tensors = [v for v in keras.tree.flatten(node.arguments.args) if isinstance(v, keras.KerasTensor)]
    if type(op).__name__ == "Where" and len(tensors) + len(operands) != 3:
        return kinds.BLOCKER  # where(condition) alone lists the positions where it holds
    if not all(_is_scalar(v) or kinds.per_channel(v, out_shape[-1]) and np.ndim(v) <= rank for v in operands):
        return kinds.BLOCKER  # a constant array that varies over positions
    if not _channels_broadcast(in_shapes, out_shape):
        return kinds.BLOCKER  # broadcasting over the channel axis
    return lambda call: kinds.OpPointwise(call, _POINTWISE_OPS[type(op).__name__])


def _channels_broadcast(in_shapes: list[tuple], out_shape: tuple) -> bool:
    """Inputs of the output's rank whose channels are the output's, or one channel broadcast over them."""
    return all(len(s) == len(out_shape) and s[-1] in (out_shape[-1], 1) for s in in_shapes) and any(
        s[-1] == out_shape[-1] for s in in_shapes)


def _axes(axis: Any, rank: int) -> set[int] | None:
    if axis is None:
        return None
    return {int(a) % rank for a in (axis if isinstance(axis, (list, tuple)) else [axis])}


def _keeps_channel_axis(in_shape: tuple, out_shape: tuple) -> bool:
    """A reshape that leaves the last axis whole and only regroups the others of a static shape."""
    return (
        in_shape[-1] is not None and out_shape[-1] == in_shape[-1]
        and None not in in_shape[1:] and None not in out_shape[1:]
        and math.prod(in_shape[1:-1]) == math.prod(out_shape[1:-1])
    )


def _op_reduce(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """A reduction over positions keeps each channel apart; a sum (unlike a mean, max or min) turns a constant
    channel into a multiple of it."""
    axes = _axes(op.get_config().get("axis"), len(in_shapes[0]))
    ok = axes is not None and len(in_shapes[0]) - 1 not in axes and out_shape[-1] == in_shapes[0][-1]
    if not ok:
        return kinds.BLOCKER
    return table_kind("sum_positions") if type(op).__name__ == "Sum" else kinds.PASS


def _op_pool(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    fmt = op.get_config().get("data_format") or keras.config.image_data_format()
    return kinds.PASS if fmt == "channels_last" else kinds.BLOCKER


def _op_reshape(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    if not _keeps_channel_axis(in_shapes[0], out_shape):
        flat = ops.flatten_tile(in_shapes[0], out_shape) and "newshape" in op.get_config()
        return kinds.FlatReshape if flat else kinds.BLOCKER
    return kinds.OpReshape if "newshape" in op.get_config() else kinds.PASS


def _op_concat(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    rank = len(out_shape)
    if any(len(s) != rank for s in in_shapes):
        return kinds.BLOCKER
    return _concat_kind(int(op.get_config().get("axis", 0)), rank)


def _integer(k: Any) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool)


def _expand_key(key: Any, rank: int) -> tuple | None:
    """``key`` of ``x[key]`` on a rank-``rank`` tensor as one integer or slice per axis (``...`` and missing
    trailing axes as full slices); None for new axes, arrays, tensors or a key longer than the rank."""
    key = list(key) if isinstance(key, tuple) else [key]
    if key.count(Ellipsis) > 1 or not all(k is Ellipsis or isinstance(k, slice) or _integer(k) for k in key):
        return None
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key[i:i + 1] = [slice(None)] * (rank - len(key) + 1)
    if len(key) > rank or any(isinstance(k, slice) and not all(v is None or _integer(v) for v in
                                                               (k.start, k.stop, k.step)) for k in key):
        return None
    return tuple(key) + (slice(None),) * (rank - len(key))


def _op_getitem(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """``x[key]``: positions picked along other axes pass the channels; a step-1 range of the channel axis is a
    channel slice; an index that drops the channel axis, a step or a new axis blocks."""
    width = in_shapes[0][-1]
    key = _expand_key(node.arguments.args[1], len(in_shapes[0])) if len(node.arguments.args) == 2 else None
    if key is None or width is None or not isinstance(key[-1], slice):
        return kinds.BLOCKER
    a, b, step = key[-1].indices(width)
    if step != 1 or b <= a or out_shape[-1] != b - a:
        return kinds.BLOCKER
    return lambda call: kinds.ItemSlice(call, key, [(a, b)])


def _op_split(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """``keras.ops.split``: along the channels, consecutive channel ranges; along another axis, every output
    carries all the channels."""
    cfg, rank, width = op.get_config(), len(in_shapes[0]), in_shapes[0][-1]
    widths = [int(t.shape[-1]) if t.shape[-1] is not None else None for t in node.outputs]
    if width is None or None in widths:
        return kinds.BLOCKER
    along = int(cfg.get("axis", 0)) % rank == rank - 1
    if not along:
        return lambda call: kinds.SplitSlice(call, [(0, width)] * len(widths), False)
    edges = np.cumsum([0] + widths).tolist()
    return lambda call: kinds.SplitSlice(call, list(zip(edges, edges[1:])), True)


def _concat_kind(axis: int, rank: int) -> KindFactory:
    """Along channels: a concat; along a spatial axis: a join that keeps channels aligned."""
    return table_kind("concat" if axis % rank == rank - 1 else "stack_spatial")


# keras.ops operation class name -> function(op, node, input shapes, output shape) giving its kind;
# every other keras.ops node blocks the channels it reads.
KERAS_OPS: dict[str, Callable[..., KindFactory]] = {
    **{name: _op_pointwise for name in _POINTWISE_OPS},
    **{name: _op_reduce for name in ("Mean", "Sum", "Max", "Min", "Amax", "Amin")},
    **{name: _op_pool for name in ("AveragePool", "MaxPool")},
    **{name: _op_reshape for name in ("Reshape", "ExpandDims", "Squeeze")},
    "Concatenate": _op_concat,
    "GetItem": _op_getitem,
    "Split": _op_split,
}
_SEVERAL_OUTPUTS = {"Split"}  # keras.ops nodes whose rule describes several outputs


def op_kind(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """The kind of a ``keras.ops`` node (an Operation that is not a Layer)."""
    rule = KERAS_OPS.get(type(op).__name__) if type(op).__module__.startswith("keras.src.ops.") else None
    if rule is None or not in_shapes:
        return kinds.BLOCKER
    return rule(op, node, in_shapes, out_shape)


# --------------------------------------------------------------------------- layer -> kind

_L = keras.layers
_SEVERAL_OUTPUT_LAYERS = (_L.Attention,)  # layers whose rule describes several outputs (the attention scores)
_ELEMENTWISE = (
    _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D, _L.GaussianNoise,
    _L.GaussianDropout, _L.AlphaDropout, _L.ActivityRegularization, _L.Identity,
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D, _L.AveragePooling1D, _L.AveragePooling2D,
    _L.AveragePooling3D, _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
    _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D, _L.UpSampling1D, _L.UpSampling2D,
    _L.UpSampling3D, _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
)
_JOINS = {_L.Add: "add", _L.Subtract: "sub", _L.Average: "mean", _L.Maximum: "max", _L.Minimum: "min",
          _L.Multiply: "mul"}
# A rule: f(layer, matched base class, input shapes, output shape) -> the kind of that call.
LayerRuleFn = Callable[[Any, type, list, tuple], KindFactory]


def _channel_axis(layer: Any, rank: int) -> bool:
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    return axis is not None and axis % rank == rank - 1


def _plain(kind: KindFactory) -> LayerRuleFn:
    """``kind`` for a channels-last layer whose ``call`` is its base class's, else a blocker."""
    def rule(layer, base, ins, out):
        return kind if _channels_last(layer) and not _overrides_call(layer, base) else _blocker(layer)
    return rule


def _op(op: str, read: Callable[[Any], dict] = lambda layer: {}) -> LayerRuleFn:
    """Canonical op ``op`` with the parameters ``read(layer)``."""
    return lambda layer, base, ins, out: table_kind(op, lambda call: read(call.layer))


def _conv(layer, base, ins, out):
    if not _channels_last(layer) or _overrides_call(layer, base):
        return _blocker(layer)
    return kinds.GroupedDepthwise if layer.groups > 1 and layer.groups == ins[0][-1] else kinds.Producer


def _dense(layer, base, ins, out):
    plain = not _overrides_call(layer, base) and getattr(layer, "quantization_mode", None) is None
    if not plain or getattr(layer, "lora_enabled", False):
        return kinds.BLOCKER
    return lambda call: kinds.Producer(call, "dense")


def _batchnorm(layer, base, ins, out):
    return kinds.BatchNorm if _channel_axis(layer, len(out)) and not _overrides_call(layer, base) else kinds.BLOCKER


def _over_channels(layer, base, out) -> bool:
    """A normalization of Keras's own (or its stripped form) whose statistics are over the channel axis."""
    plain = isinstance(layer, PARTIAL_NORMALIZATIONS) or not _overrides_call(layer, base)
    return plain and _channel_axis(layer, len(out))


def _layernorm(layer, base, ins, out):
    # without gamma a removed input channel still comes out as (0 - mean) / std, which varies: never removable;
    # rms_scaling's statistic is not the same in every Keras 3 release: left alone
    plain = layer.scale and not getattr(layer, "rms_scaling", False)
    return kinds.LayerNorm if plain and _over_channels(layer, base, out) else kinds.BLOCKER


def _groupnorm(layer, base, ins, out):
    return kinds.GroupNorm if layer.scale and _over_channels(layer, base, out) else kinds.BLOCKER


def _rms_scaled(layer, base, ins, out):
    return kinds.RMSScaled if _over_channels(layer, base, out) else kinds.BLOCKER


def _activation(layer, base, ins, out):
    if kinds.mixes_channels(layer.activation):
        return kinds.ChannelMixing
    op, params = activation_op(layer.activation)
    return table_kind(op, lambda call: params)


def _softmax(layer, base, ins, out):
    """Over the channel axis it mixes the channels; over other axes each channel is normalised on its own, and a
    constant channel becomes 1 / (the number of positions normalised over), which its consumers can absorb."""
    axes = _axes(layer.axis, len(out))
    if axes is None or len(out) - 1 in axes:
        return kinds.ChannelMixing
    sizes = [out[a] for a in axes]
    if len(ins) != 1 or 0 in axes or None in sizes:  # a mask, or positions counted only at run time
        return kinds.BLOCKER
    return table_kind("function", lambda call: {"fn": lambda v: np.full_like(v, 1.0 / math.prod(sizes))})


def _rescaling(layer, base, ins, out):
    if np.size(layer.scale) != 1 or np.size(layer.offset) != 1:
        return kinds.BLOCKER
    return _op("rescale", lambda L: dict(scale=float(np.ravel(L.scale)[0]), offset=float(np.ravel(L.offset)[0])))(
        layer, base, ins, out)


def _merge(layer, base, ins, out):
    if not _channels_broadcast(ins, out):
        return kinds.BLOCKER  # broadcasting over the channel axis
    return table_kind(_JOINS[base])


def _concatenate(layer, base, ins, out):
    return _concat_kind(layer.axis, len(out))


def _flatten(layer, base, ins, out):
    if len(ins[0]) == 2:
        return kinds.PASS
    if not _channels_last(layer):
        return kinds.ChannelsFirst
    return kinds.Flatten if all(d is not None for d in ins[0][1:]) else kinds.BLOCKER


def _reshape(layer, base, ins, out):
    if _keeps_channel_axis(ins[0], out):
        return kinds.Reshape
    return kinds.FlatReshape if ops.flatten_tile(ins[0], out) else kinds.BLOCKER


def _permute(layer, base, ins, out):
    # a permutation of the other axes only (Permute's dims count from 1, after the batch axis)
    keeps = tuple(layer.dims)[-1] == len(out) - 1
    return kinds.PASS if keeps and not _overrides_call(layer, base) else kinds.BLOCKER


def _resizing(layer, base, ins, out):
    # interpolation weights sum to 1: a constant channel stays that constant, unless padding adds another value
    if not _channels_last(layer) or _overrides_call(layer, base):
        return _blocker(layer)
    if not layer.pad_to_aspect_ratio:
        return kinds.PASS
    return table_kind("zero_pad") if layer.fill_value == 0 else kinds.BLOCKER


_RECURRENT = {_L.LSTM: _L.LSTMCell, _L.GRU: _L.GRUCell, _L.SimpleRNN: _L.SimpleRNNCell}


def _plain_recurrent(layer) -> bool:
    """A Keras LSTM/GRU/SimpleRNN with its own cell."""
    base = next((b for b in _RECURRENT if isinstance(layer, b)), None)
    return base is not None and not _overrides_call(layer, base) and type(layer.cell) is _RECURRENT[base]


def _recurrent(layer, base, ins, out):
    directions = [layer.forward_layer, layer.backward_layer] if isinstance(layer, _L.Bidirectional) else [layer]
    plain = all(_plain_recurrent(d) for d in directions) and not _overrides_call(layer, base)
    if not plain or len(ins[0]) != 3:
        return kinds.BLOCKER
    return lambda call: kinds.Recurrent(call) if kinds.reads_one_sequence(call) else kinds.BLOCKER(call)


def _attention(layer, base, ins, out):
    plain = not _overrides_call(layer, base) and not layer.get_config().get("use_gate", False)
    if not plain or len(out) != 3 or any(len(s) != 3 for s in ins):
        return kinds.BLOCKER
    return lambda call: kinds.Attention(call) if kinds.attention_roles(call) else kinds.BLOCKER(call)


def _attention_product(layer, base, ins, out):
    if _overrides_call(layer, base):
        return kinds.BLOCKER
    return lambda call: kinds.AttentionProduct(call) if kinds.attention_inputs(call) else kinds.BLOCKER(call)


def _time_distributed(layer, base, ins, out):
    """The wrapped layer's rule for one time step's shapes: (batch, time, ...) without the time axis."""
    if _overrides_call(layer, base) or len(ins) != 1:
        return kinds.BLOCKER
    step_ins, step_out = [(s[0], *s[2:]) for s in ins], (out[0], *out[2:])
    step = layer_kind(layer.layer, step_ins, step_out)

    def kind(call):
        inner = dataclasses.replace(call, layer=layer.layer, in_shapes=step_ins, out_shape=step_out)
        return kinds.TimeDistributed(step(inner), layer, out[1] or 1)
    return kind


# Keras layer classes -> their rule; a subclass without an entry of its own matches its nearest base's.
KERAS_LAYERS: list[tuple[tuple[type, ...], LayerRuleFn]] = [
    ((_L.SeparableConv1D, _L.SeparableConv2D), _plain(kinds.SeparableConv)),
    ((_L.DepthwiseConv1D, _L.DepthwiseConv2D), _plain(kinds.Depthwise)),
    ((_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), _plain(kinds.ConvTranspose)),
    ((_L.Conv1D, _L.Conv2D, _L.Conv3D), _conv),
    ((_L.Dense,), _dense),
    ((_L.BatchNormalization,), _batchnorm),
    ((_L.LayerNormalization,), _layernorm),
    ((_L.GroupNormalization,), _groupnorm),
    ((_L.RMSNormalization, _L.UnitNormalization), _rms_scaled),
    ((_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D), _plain(table_kind("zero_pad"))),
    (_ELEMENTWISE, _plain(kinds.PASS)),
    ((_L.Activation,), _activation),
    ((_L.Softmax,), _softmax),
    ((_L.ReLU,), _op("relu", lambda L: dict(negative_slope=float(L.negative_slope), max_value=L.max_value,
                                            threshold=float(L.threshold)))),
    ((_L.LeakyReLU,), _op("leaky_relu", lambda L: dict(negative_slope=float(L.negative_slope)))),
    ((_L.ELU,), _op("elu", lambda L: dict(alpha=float(L.alpha)))),
    ((_L.PReLU,), lambda layer, base, ins, out: kinds.PReLU),
    ((_L.Rescaling,), _rescaling),
    (tuple(_JOINS), _merge),
    ((_L.Concatenate,), _concatenate),
    ((_L.Flatten,), _flatten),
    ((_L.Reshape,), _reshape),
    ((_L.LSTM, _L.GRU, _L.SimpleRNN, _L.Bidirectional), _recurrent),
    ((_L.MultiHeadAttention,), _attention),
    ((_L.Attention, _L.AdditiveAttention), _attention_product),
    ((_L.Permute,), _permute),
    ((_L.Resizing,), _resizing),
    ((_L.TimeDistributed,), _time_distributed),
]


def layer_kind(layer: keras.layers.Layer, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """The kind describing ``layer`` as called with these shapes."""
    declared = registered_rule(layer)
    if declared is not None:
        same = all(len(s) == len(out_shape) and s[-1] == out_shape[-1] for s in in_shapes)
        return kinds.Registered if declared.rule == "elementwise" and same else kinds.BLOCKER
    for cls in type(layer).__mro__:  # the most specific class with an entry: SpatialDropout2D before Dropout
        for bases, rule in KERAS_LAYERS:
            if cls in bases:
                return rule(layer, cls, in_shapes, out_shape)
    return kinds.BLOCKER


def _kind_of(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    several = type(op).__name__ in _SEVERAL_OUTPUTS or isinstance(op, _SEVERAL_OUTPUT_LAYERS)
    if len(node.outputs) != 1 and not several:
        return kinds.BLOCKER
    if not isinstance(op, keras.layers.Layer):
        return op_kind(op, node, in_shapes, out_shape)
    return layer_kind(op, in_shapes, out_shape)


# --------------------------------------------------------------------------- the walk

@dataclasses.dataclass
class _Record:
    """One layer call in the flattened (nested models inlined) model."""

    op: Op
    kind: LayerKind
    node: Any  # keras Node
    scope: dict[int, int]  # id(KerasTensor) -> tensor id, for the node's input tensors
    part: bool = False  # an op the call is made of before its own (:meth:`LayerKind.parts`): not a call itself
    reads: list[int] | None = None  # the tensors whose keep masks the kind's config and weights take (op.inputs)

    def read_tensors(self) -> list[int]:
        return self.op.inputs if self.reads is None else self.reads


def _functional(model: keras.Model) -> keras.Model:
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise UnsupportedModelError(
                f"Sequential model {model.name!r} has no defined input shape yet; start it with "
                "keras.Input(shape) (or build it) so that its layers can be analysed."
            )
        return fn
    if not (hasattr(model, "_nodes_by_depth") and hasattr(model, "_run_through_graph")):
        raise UnsupportedModelError(
            f"{type(model).__name__} {model.name!r} is a subclassed model: its call() is Python code whose "
            "channel flow cannot be analysed. tfcompress needs a Functional or Sequential model; "
            "rebuild it with keras.Input and the Functional API (sub-models may be nested)."
        )
    return model


def _is_model(layer: Any) -> bool:
    return isinstance(layer, keras.Model) and (
        isinstance(layer, keras.Sequential) or hasattr(layer, "_nodes_by_depth")
    )


def _shape(t: Any) -> tuple:
    return tuple(t.shape)


def _engine_op(name: str, layer: str, kind: LayerKind, inputs: list[int], outputs: list[int]) -> Op:
    """The engine's op for ``kind`` reading tensors ``inputs`` and making ``outputs``."""
    return Op(name=name, rule=kind.rule, inputs=inputs, outputs=outputs, layer=layer, channels=kind.channels(),
              blocks=kind.blocks(), has_channel_params=kind.has_channel_params, semantics=kind,
              reads_all_channels=kind.reads_all_channels, mixes_outputs=kind.mixes_outputs,
              slices=kind.channel_slices(), contracted=kind.contraction()[0], passed=kind.contraction()[1])


def _channel_inputs(layer: Any, node: Any) -> list:
    """The node's input tensors that carry channels: all of them, except the ``mask`` a position-wise layer
    (``GlobalAveragePooling1D`` after ``Embedding(mask_zero=True)``; Keras passes a propagated mask on by itself)
    is called with. The mask only says which positions count: a channel that is 0 (or a constant) everywhere is
    0 (that constant) over any positions, so the layer's channels pass as without it."""
    tensors = list(node.input_tensors)
    mask = node.arguments.kwargs.get("mask")
    if isinstance(layer, _ELEMENTWISE) and isinstance(mask, keras.KerasTensor) and len(tensors) == 2:
        tensors = [t for t in tensors if t is not mask]
    return tensors


class KerasGraph:
    """A Keras model translated into a :class:`ChannelGraph`, with what is needed to edit it.

    Attributes:
        model: the model.
        graph: the channel graph.
        records: one per layer call, in graph order.
        layers: layer path name -> layer (paths of nested layers are ``"submodel/layer"``).
    """

    def __init__(self, model: keras.Model) -> None:
        if not isinstance(model, keras.Model):
            raise UnsupportedModelError(f"expected a keras.Model, got {type(model).__name__}")
        self.model = model
        self.records: list[_Record] = []
        self.layers: dict[str, keras.layers.Layer] = {}
        self._widths: dict[int, int] = {}
        self._count = 0
        fmodel = _functional(model)
        scope: dict[int, int] = {}
        self.input_ids = []
        for t in fmodel.inputs:
            tid = self._tensor(scope, t)
            self.input_ids.append(tid)
            op = Op(f"input:{t.name}", Rule.INPUT, [], [tid], channels=self._widths[tid])
            kind = LayerKind(LayerCall(None, [], self._widths[tid], []), "input", kinds.width_params)
            self.records.append(_Record(op, kind, None, {}))
        self.output_ids = self._walk(fmodel, "", scope)
        self.graph = ChannelGraph([r.op for r in self.records], self.output_ids, self._widths)
        self.kinds: dict[str, LayerKind] = {r.op.name: r.kind for r in self.records}

    def _tensor(self, scope: dict[int, int], t: Any) -> int:
        if id(t) not in scope:
            scope[id(t)] = self._count
            self._widths[self._count] = int(t.shape[-1]) if t.shape and t.shape[-1] is not None else 0
            self._count += 1
        return scope[id(t)]

    def _walk(self, fmodel: keras.Model, prefix: str, scope: dict[int, int]) -> list[int]:
        calls: dict[str, int] = {}
        for depth in sorted(fmodel._nodes_by_depth, reverse=True):
            for node in fmodel._nodes_by_depth[depth]:
                layer = node.operation
                if layer is None or node.is_input:
                    continue
                tensors = _channel_inputs(layer, node)
                in_ids = [scope[id(t)] for t in tensors]
                if _is_model(layer):
                    inner = _functional(layer)
                    inner_scope = {id(t): tid for t, tid in zip(inner.inputs, in_ids)}
                    out_ids = self._walk(inner, f"{prefix}{layer.name}/", inner_scope)
                    for t, tid in zip(node.outputs, out_ids):
                        scope[id(t)] = tid
                    continue
                path = prefix + layer.name
                self.layers[path] = layer
                n = calls.get(path, 0)
                calls[path] = n + 1
                out_ids = [self._tensor(scope, t) for t in node.outputs]
                in_shapes = [_shape(t) for t in tensors]
                out_shape = _shape(node.outputs[0])
                kind_cls = _kind_of(layer, node, in_shapes, out_shape)
                call = LayerCall(
                    layer, [self._widths[i] for i in in_ids], self._widths[out_ids[0]], in_shapes, out_shape, node
                )
                kind = kind_cls(call)
                name = path if n == 0 else f"{path}#{n}"
                node_scope = {id(t): scope[id(t)] for t in node.input_tensors}
                own_inputs, reads = in_ids, list(in_ids)
                for part in kind.parts():  # e.g. a MultiHeadAttention's heads, read by its output projection
                    made = [self._virtual(part.width)] if part.width else []
                    op = _engine_op(f"{name}{PART}{part.name}", f"{path}{PART}{part.name}", part.kind,
                             [in_ids[i] for i in part.inputs], made)
                    self.records.append(_Record(op, part.kind, node, node_scope, part=True))
                    if made:
                        own_inputs, reads = made, reads + made
                op = _engine_op(name, path, kind, own_inputs, out_ids)
                self.records.append(_Record(op, kind, node, node_scope, reads=reads))
        return [scope[id(t)] for t in fmodel.outputs]

    def _virtual(self, width: int) -> int:
        """A new tensor id for a tensor inside a layer call (a part's output)."""
        self._widths[self._count] = width
        self._count += 1
        return self._count - 1

    def groups(self) -> list[ChannelGroup]:
        return self.graph.groups()

    def first_layers(self, stops: Callable[["_Record"], bool]) -> set[str]:
        """Paths of the layers for which ``stops(record)`` holds that a model input reaches without passing
        through another such layer (the "first convolutions": pruning leaves them alone by default, QAT
        gives their weights the overflow fix)."""
        reach = set(self.input_ids)
        first = set()
        for rec in self.records:
            if rec.node is None or not reach.intersection(rec.op.inputs):
                continue
            if stops(rec):
                first.add(rec.op.layer)
            else:
                reach.update(rec.op.outputs)
        return first

    def row_reader(self, rec: "_Record") -> bool:
        """Whether ``rec`` reads its input's channels through kernel rows (:meth:`LayerKind.input_params`). The
        calls of a shared layer read the same channels (the engine joins their inputs or blocks them), so any
        call's input says which rows read a removed channel."""
        return rec.op.rule is Rule.PRODUCER and bool(rec.op.inputs) and bool(rec.kind.input_params())

    def find_group(self, group: ChannelGroup) -> ChannelGroup:
        """The group of this graph with the same producing layers; of several such groups (one producer's channels
        taken apart by channel ranges), the one with ``group``'s id and size."""
        same = [g for g in self.groups() if g.layers == tuple(group.layers)]
        if len(same) > 1:
            same = [g for g in same if (g.id, g.size) == (group.id, group.size)]
        if len(same) == 1:
            return same[0]
        raise ValueError(
            f"{group!r} is not a prunable channel group of model {self.model.name!r}; "
            "get groups from tfcompress.channel_groups(model)."
        )


def build_graph(model: keras.Model) -> KerasGraph:
    """Analyse ``model`` (Functional or Sequential, nested models allowed) into a :class:`KerasGraph`."""
    return KerasGraph(model)