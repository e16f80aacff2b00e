"""Translate a Keras 3 Functional or Sequential model into the channel engine's graph.

The adapter only translates: each layer call becomes a :class:`LayerKind`, a canonical op of
:data:`tfcompress.graph.ops.OPS` (whose table gives the channel rule, constant propagation, bias folding and
MACs) with a reader of the layer's parameters. Subclasses add only what is Keras's own: which weights are
indexed by output channels (for zeroing) and how to rebuild the layer with fewer channels. Three tables choose
the op of a call: :data:`KERAS_LAYERS` (Keras layer classes), :data:`KERAS_OPS` (the raw ``keras.ops`` nodes
Keras records for ``x + y``, ``keras.ops.mean`` ...) and the user registry of :func:`register_layer` (custom
layers); anything else blocks. Nested models are
inlined: layer names inside them are prefixed with the sub-model's name (``"block/conv"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import keras
import numpy as np

from tfcompress.graph.engine import ChannelGraph, ChannelGroup, Op, Rule
from tfcompress.graph.keras_layers import PartialLayerNormalization
from tfcompress.graph import ops

__all__ = [
    "ChannelParam", "KerasGraph", "LayerKind", "LayerRule", "UnsupportedModelError", "build_graph",
    "register_layer",
]


class UnsupportedModelError(ValueError):
    """The model's structure cannot be analysed (e.g. a subclassed model)."""


# --------------------------------------------------------------------------- helpers

def _np(x: Any) -> np.ndarray:
    if hasattr(x, "numpy"):  # variables and eager tensors
        return np.asarray(x.numpy())
    return np.asarray(keras.ops.convert_to_numpy(x))


def _overrides_call(layer: keras.layers.Layer, base: type) -> bool:
    """A user subclass that changes ``call`` is not what its base class says it is.

    A class that declares ``keeps_channel_structure = True`` (tfcompress's quantization-aware layers, which
    change ``call`` only to fake-quantize the kernel) counts as its base class.
    """
    if getattr(type(layer), "keeps_channel_structure", False):
        return False
    return type(layer).call is not base.call


def activation_op(activation: Any) -> tuple[str, dict]:
    """A Keras activation as a canonical op of :data:`tfcompress.graph.ops.OPS` and its parameters; a function
    of the user's own is applied as it is, through Keras."""
    fn = keras.activations.get(activation)
    name = getattr(fn, "__name__", "")
    if name in ops.UNARY and keras.activations.get(name) is fn:
        return name, {}
    return "function", {"fn": lambda v: _np(fn(keras.ops.convert_to_tensor(np.asarray(v, np.float32))))}


def _activated(activation: Any, c: np.ndarray) -> np.ndarray:
    op, params = activation_op(activation)
    return ops.const_out(op, [c], **params)


def _channels_last(layer: keras.layers.Layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


@dataclasses.dataclass
class ChannelParam:
    """A weight whose ``axis`` (of its ``view`` shape, if given) is indexed by a layer's output channels."""

    variable: Any
    axis: int
    view: tuple | None = None

    def mask(self, keep: np.ndarray) -> np.ndarray:
        """A 0/1 array of the variable's shape that zeroes the channels where ``keep`` is False."""
        shape = tuple(self.variable.shape)
        view = self.view or shape
        bshape = [1] * len(view)
        bshape[self.axis] = view[self.axis]
        m = np.broadcast_to(keep.astype(np.float32).reshape(bshape), view)
        return np.ascontiguousarray(m).reshape(shape)


# --------------------------------------------------------------------------- per-layer semantics

@dataclasses.dataclass
class LayerCall:
    """One call of a layer with the numpy weights the engine needs."""

    layer: keras.layers.Layer
    in_widths: list[int]
    out_width: int
    in_shapes: list[tuple]
    out_shape: tuple = ()
    node: Any = None  # the keras Node of this call (keras.ops nodes are evaluated through it)


class LayerKind(ops.TableOp):
    """A layer call as the engine sees it: its canonical op in :data:`tfcompress.graph.ops.OPS` with a reader
    of the op's parameters. Subclasses add which weights are indexed by channels and how to rebuild the layer
    with fewer channels."""

    op = "identity"
    has_channel_params = False
    reads_all_channels = False

    def __init__(self, call: LayerCall, op: str | None = None,
                 params: Callable[["LayerCall"], dict] | None = None) -> None:
        self.call = call
        self.layer = call.layer
        self.op = op or type(self).op
        self._read = params

    @property
    def rule(self) -> Rule:
        return ops.rule(self.op, len(self.call.in_widths))

    def params(self) -> dict:
        """The parameters of its canonical op, read from the layer now (pruning changes the weights)."""
        return self._read(self.call) if self._read is not None else {}

    def geometry(self) -> dict:
        """The call's shape as the table's MAC and folding rules read it (:class:`ops.OpSemantics`)."""
        L, c = self.layer, self.call
        return dict(positions=ops.positions(c.out_shape), window=math.prod(getattr(L, "kernel_size", ())),
                    in_positions=ops.positions(c.in_shapes[0]) if c.in_shapes else 1, groups=self.blocks(),
                    multiplier=int(getattr(L, "depth_multiplier", 1)),
                    valid_padding=getattr(L, "padding", "valid") == "valid")

    # --- structure
    def channels(self) -> int:
        return self.call.out_width

    def blocks(self) -> int:
        return 1

    # --- weights
    def output_params(self) -> list["ChannelParam"]:
        """The weights indexed by this layer's output channels (zeroing them zeroes those channels)."""
        return []

    def zero_outputs(self, pos: np.ndarray) -> None:
        """Zero every weight that produces the output channels ``pos``."""
        keep = np.ones(self.call.out_width, dtype=bool)
        keep[pos] = False
        for p in self.output_params():
            p.variable.assign(_np(p.variable) * p.mask(keep))

    def config(self, in_keeps: list[np.ndarray], out_keep: np.ndarray, folds: list[np.ndarray]) -> dict:
        return self.layer.get_config()

    def rebuilt_class(self) -> type:
        """The class of the layer with fewer channels (its own class unless that cannot express it)."""
        return type(self.layer)

    def weights(
        self, in_keeps: list[np.ndarray], out_keep: np.ndarray, folds: list[np.ndarray]
    ) -> list[np.ndarray]:
        return self.current_weights()

    def current_weights(self) -> list[np.ndarray]:
        """The layer's weights as they are (none for a ``keras.ops`` node)."""
        return [_np(w) for w in getattr(self.layer, "weights", [])]

    def needs_bias(self, folds: list[np.ndarray]) -> bool:
        return False


KindFactory = Callable[[LayerCall], LayerKind]


def table_kind(op: str, params: Callable[[LayerCall], dict] | None = None) -> KindFactory:
    """The kind of a call that is canonical op ``op`` and has nothing to edit but its channel count."""
    return lambda call: LayerKind(call, op, params)


def _width(call: LayerCall) -> dict:
    return {"width": call.out_width}


_BLOCKER = table_kind("blocker", _width)
_PASS = table_kind("identity")


class _Reshape(LayerKind):
    """A reshape that keeps the channel axis ((C,) -> (1, 1, C), (H, W, C) -> (H*W, C)) passes channels."""

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        cfg["target_shape"] = tuple(cfg["target_shape"][:-1]) + (int(out_keep.sum()),)
        return cfg


class _PReLU(LayerKind):
    op = "prelu"
    has_channel_params = True

    def params(self):
        return {"alpha": _np(self.layer.alpha)}

    def weights(self, in_keeps, out_keep, folds):
        alpha = _np(self.layer.alpha)
        return [ops.take_channels(alpha, out_keep, -1) if alpha.shape[-1] == out_keep.size else alpha]


class _Normalization(LayerKind):
    """A normalization over the channel axis: its weights are vectors over the channels, gamma and beta (ones
    and zeros where it does not learn them) produce them."""

    has_channel_params = True

    def params(self):
        L, n = self.layer, self.call.out_width
        return dict(gamma=_np(L.gamma) if L.scale else np.ones(n), beta=_np(L.beta) if L.center else np.zeros(n))

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.gamma, 0)] * bool(L.scale) + [ChannelParam(L.beta, 0)] * bool(L.center)

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(_np(w), out_keep, 0) for w in self.layer.weights]


class _BatchNorm(_Normalization):
    op = "batchnorm"

    def params(self):
        L = self.layer
        return dict(**super().params(), mean=_np(L.moving_mean), var=_np(L.moving_variance), epsilon=L.epsilon)


class _Producer(LayerKind):
    """Conv1D/2D/3D (grouped too), Dense: a kernel (..., in, out), a bias (out) and an activation."""

    op = "conv"
    has_channel_params = True
    out_axis = -1  # axis of the kernel indexed by output channels
    in_axis = -2

    def channels(self):
        return int(self.layer.filters if hasattr(self.layer, "filters") else self.layer.units)

    def blocks(self):
        return int(getattr(self.layer, "groups", 1) or 1)

    def _kernel(self) -> np.ndarray:
        return _np(self.layer.kernel)

    def _bias(self) -> np.ndarray:
        return _np(self.layer.bias) if self.layer.use_bias else np.zeros(self.channels())

    def params(self):
        return dict(kernel=np.moveaxis(self._kernel(), self.out_axis, -1), bias=self._bias())

    def const_out(self, in_consts):
        return [_activated(self.layer.activation, super().const_out(in_consts)[0])]

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.kernel, self.out_axis)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def strides(self) -> int:
        return max(tuple(getattr(self.layer, "strides", (1,))))

    def filters(self, kernel: np.ndarray | None = None) -> np.ndarray:
        """The kernel (or ``kernel``, an array of its shape) as one row per output channel."""
        kernel = self._kernel() if kernel is None else kernel
        return np.moveaxis(kernel, self.out_axis, 0).reshape(self.channels(), -1)

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        cfg["filters" if "filters" in cfg else "units"] = int(out_keep.sum())
        return cfg

    def needs_bias(self, folds):
        return not self.layer.use_bias and any(np.any(f != 0) for f in folds)

    def weights(self, in_keeps, out_keep, folds):
        axes = (self.in_axis, self.out_axis)
        kernel, bias = ops.shrink_producer(np.moveaxis(self._kernel(), axes, (-2, -1)), self._bias(), in_keeps[0],
                                           out_keep, folds[0], self.blocks())
        return [np.moveaxis(kernel, (-2, -1), axes)] + [bias] * (self.layer.use_bias or self.needs_bias(folds))


class _ConvTranspose(_Producer):
    op = "conv_transpose"
    out_axis = -2
    in_axis = -1


class _SeparableConv(_Producer):
    """Depthwise on the input channels, then a pointwise producer."""

    op = "separable_conv"

    def _kernel(self):
        return _np(self.layer.pointwise_kernel)

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.pointwise_kernel, -1)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def weights(self, in_keeps, out_keep, folds):
        L = self.layer
        m = int(L.depth_multiplier)
        new = {
            id(L.depthwise_kernel): ops.take_channels(_np(L.depthwise_kernel), in_keeps[0], -2),
            id(L.pointwise_kernel): ops.take_channels(
                ops.take_channels(self._kernel(), np.repeat(in_keeps[0], m), -2), out_keep, -1),
        }
        if L.use_bias:
            new[id(L.bias)] = self._bias()[out_keep]
        return [new.get(id(w), _np(w)) for w in L.weights]  # a QAT twin's quantizer ranges stay


class _Depthwise(LayerKind):
    """DepthwiseConv: output channel c*m+k reads only input channel c."""

    op = "depthwise"
    has_channel_params = True

    def channels(self):
        return int(self.layer.depth_multiplier)

    def _bias(self):
        return _np(self.layer.bias) if self.layer.use_bias else np.zeros(self.call.out_width)

    def _kernel(self) -> np.ndarray:
        """The kernel as (..., in, multiplier)."""
        return _np(self.layer.kernel)

    def params(self):
        return dict(kernel=self._kernel(), bias=self._bias(), valid_padding=self.layer.padding == "valid")

    def const_out(self, in_consts):
        return [_activated(self.layer.activation, super().const_out(in_consts)[0])]

    def output_params(self):
        L = self.layer
        k = tuple(L.kernel.shape)
        view = k[:-2] + (k[-2] * k[-1],)  # output channel c*m+j is kernel[..., c, j]
        return [ChannelParam(L.kernel, -1, view)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def weights(self, in_keeps, out_keep, folds):
        new = [ops.take_channels(_np(self.layer.kernel), in_keeps[0], -2)]
        if self.layer.use_bias:
            new.append(self._bias()[out_keep])
        return new


class _GroupedDepthwise(_Depthwise):
    """Conv(groups == input channels): a depthwise convolution with a (..., 1, in * multiplier) kernel."""

    def channels(self):
        return int(self.layer.filters) // int(self.layer.groups)

    def _kernel(self):
        k = _np(self.layer.kernel)
        return k.reshape(k.shape[:-2] + (int(self.layer.groups), self.channels()))

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.kernel, -1)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def config(self, in_keeps, out_keep, folds):
        return {**self.layer.get_config(), "filters": int(out_keep.sum()), "groups": int(in_keeps[0].sum())}

    def weights(self, in_keeps, out_keep, folds):
        new = [ops.take_channels(_np(self.layer.kernel), out_keep, -1)]
        if self.layer.use_bias:
            new.append(self._bias()[out_keep])
        return new


class _LayerNorm(_Normalization):
    """LayerNormalization over the channel axis: statistics over all channels, then a per-channel affine.

    Its inputs are read as a whole (a removed channel must be a known constant, which the stripped layer
    keeps in its statistics: :class:`PartialLayerNormalization`); an output channel whose gamma is zero is
    the constant beta.
    """

    op = "layernorm"
    reads_all_channels = True

    def rebuilt_class(self):
        return PartialLayerNormalization

    def config(self, in_keeps, out_keep, folds):
        removed = list(getattr(self.layer, "removed_values", [])) + [float(v) for v in folds[0][~in_keeps[0]]]
        return {**self.layer.get_config(), "removed_values": removed}


class _Flatten(LayerKind):
    op = "flatten"

    def channels(self):
        return int(math.prod(self.call.in_shapes[0][1:-1]))

    def params(self):
        return {"tile": self.channels()}


# --------------------------------------------------------------------------- user-declared layers

@dataclasses.dataclass(frozen=True)
class LayerRule:
    """The channel rule of a custom layer, as declared with :func:`register_layer`."""

    rule: str
    channel_weights: tuple[str, ...] = ()
    resize_config: Callable[[dict, int], dict] | None = None
    op: str | None = None
    params: Callable[[Any], dict] | None = None


LAYER_RULES = ("elementwise", "blocker")
# class (or "module.QualName", to name a class without importing it) -> its rule
_REGISTRY: dict[Any, LayerRule] = {
    "keras.src.applications.convnext.LayerScale": LayerRule(
        "elementwise", ("gamma",), lambda cfg, n: {**cfg, "projection_dim": n}),
    "keras.src.applications.inception_resnet_v2.CustomScaleLayer": LayerRule("elementwise"),  # x + r * scale
}


def register_layer(
    cls: type,
    rule: str = "elementwise",
    channel_weights: Sequence[str] = (),
    resize_config: Callable[[dict, int], dict] | None = None,
    op: str | None = None,
    params: Callable[[Any], dict] | None = None,
) -> None:
    """Declare how a custom Keras layer maps channels, so that pruning, stripping and QAT go through it.

    Args:
        cls: the layer class (its subclasses inherit the rule unless registered themselves).
        rule: ``"elementwise"``: output channel c depends only on channel c of each input, the same function
            at every position (activations, per-channel scales; with several inputs of the same channels, a
            join like ``Add``); the layer's own ``call`` on per-channel constants tells stripping what a
            constant channel becomes, unless ``op`` names it. ``"blocker"``: channels reaching the layer are
            never removed.
        op: the canonical op the layer computes, from :data:`tfcompress.graph.ops.OPS` (a position-wise one:
            ``"relu6"``, ``"hard_silu"``, ``"gelu"``, ``"leaky_relu"``, ``"clip"``, ``"add"``, ``"mul"``,
            ``"max"``, ``"identity"``, ``"zero_pad"`` ...; ``sorted(tfcompress.graph.ops.UNARY)`` lists the
            activations). Stripping then follows constants through the op's own numpy semantics, as for
            Keras's built-in layers, instead of running the layer.
        params: ``f(layer) -> dict``: the op's parameters read from a layer (``lambda l: {"x_min": 0.0,
            "x_max": l.cap}`` for ``"clip"``); none by default.
        channel_weights: the weights whose last axis is indexed by channels (attribute names, such as
            ``"gamma"`` for ``self.gamma``, or weight names); stripping slices them.
        resize_config: ``f(config, channels) -> config`` for a layer whose config names its channel count
            (e.g. ``lambda c, n: {**c, "units": n}``); stripping calls it with the kept count.

    Example:
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.s = self.add_weight(shape=(shape[-1],), name="s")
        ...     def call(self, x):
        ...         return x * self.s
        >>> tfcompress.register_layer(Scale, "elementwise", channel_weights=["s"])
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(f"register_layer needs a keras.layers.Layer subclass, got {cls!r}")
    if rule not in LAYER_RULES:
        raise ValueError(f"unknown rule {rule!r} for {cls.__name__}; choose one of {list(LAYER_RULES)}")
    names = tuple(channel_weights)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"channel_weights must be weight names (strings), got {list(channel_weights)!r}")
    if op is not None and (op not in ops.OPS or ops.OPS[op].rule is not Rule.ELEMENTWISE or rule != "elementwise"):
        position_wise = sorted(k for k, v in ops.OPS.items() if v.rule is Rule.ELEMENTWISE)
        raise ValueError(f"op {op!r} for {cls.__name__} is not a position-wise canonical op (with rule "
                         f"'elementwise'); choose one of {position_wise}")
    if params is not None and not callable(params):
        raise ValueError(f"params must be a function of the layer returning the op's parameters, got {params!r}")
    _REGISTRY[cls] = LayerRule(rule, names, resize_config, op, params)


def registered_rule(layer: Any) -> LayerRule | None:
    """The rule declared for ``layer``'s class or its nearest registered base class, if any."""
    for klass in type(layer).__mro__:
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            if key in _REGISTRY:
                return _REGISTRY[key]
    return None


class _Registered(LayerKind):
    """A layer declared ``"elementwise"`` with :func:`register_layer`."""

    def __init__(self, call: LayerCall) -> None:
        self.declared = registered_rule(call.layer)
        read = self.declared.params
        super().__init__(call, self.declared.op, (lambda c: read(c.layer)) if read is not None else None)
        self.has_channel_params = bool(self.declared.channel_weights)

    def const_out(self, in_consts):
        if self.declared.op is not None:
            return super().const_out(in_consts)
        return [_run_on_consts(self.call, in_consts)]

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        resize = self.declared.resize_config
        return resize(cfg, int(out_keep.sum())) if resize is not None else cfg

    def weights(self, in_keeps, out_keep, folds):
        names = self.declared.channel_weights
        attrs = {id(getattr(self.layer, n, None)) for n in names}
        new = []
        for w in self.layer.weights:
            value = _np(w)
            if id(w) in attrs or w.path.split("/")[-1] in names:
                if value.shape[-1] != out_keep.size:
                    raise ValueError(
                        f"weight {w.path!r} of {type(self.layer).__name__} is registered as indexed by channels "
                        f"but its last axis has {value.shape[-1]} entries, not {out_keep.size}")
                value = ops.take_channels(value, out_keep, -1)
            new.append(value)
        return new


# --------------------------------------------------------------------------- keras.ops nodes

def _per_channel(c: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel constant vector as a tensor of ``rank`` that broadcasts over every other axis."""
    return np.nan_to_num(c).astype(np.float32).reshape((1,) * (rank - 1) + (-1,))


def _run_on_consts(call: LayerCall, in_consts: list[np.ndarray]) -> np.ndarray:
    """The output constants of a position-wise call, found by running the call itself on its inputs' constants
    (a custom layer's semantics are its own). An output channel is unknown where an input channel is."""
    node = call.node
    values = {id(t): _per_channel(c, len(t.shape)) for t, c in zip(node.input_tensors, in_consts)}
    args, kwargs = node.arguments.fill_in(values)
    out = _np(call.layer(*args, **kwargs)).astype(np.float64).reshape(-1)
    if out.size != call.out_width:
        return np.full(call.out_width, np.nan)
    return np.where(np.any([np.isnan(c) for c in in_consts], axis=0), np.nan, out)


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
}


class _OpPointwise(LayerKind):
    """A ``keras.ops`` function applied position by position (``x + y``, ``3.0 - x``, ``relu6``, ``gelu``...):
    its operands are the inputs' per-channel constants and its scalar arguments, in call order; its
    parameters are its config."""

    def params(self):
        return {k: v for k, v in self.layer.get_config().items() if k not in ("name", "dtype")}

    def const_out(self, in_consts):
        node, width = self.call.node, self.call.out_width
        consts = {id(t): c for t, c in zip(node.input_tensors, in_consts)}
        operands = [consts[id(v)] if isinstance(v, keras.KerasTensor) else np.full(width, float(np.ravel(v)[0]))
                    for v in keras.tree.flatten(node.arguments.args) if _is_operand(v)]
        return [ops.const_out(self.op, operands, **self.params())]


def _is_operand(v: Any) -> bool:
    return v is not None and not isinstance(v, str | bool)


class _OpReshape(LayerKind):
    """``keras.ops.reshape`` keeping the channel axis: its target shape follows the kept channel count."""

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        shape = list(cfg["newshape"])
        if shape[-1] != -1:
            shape[-1] = int(out_keep.sum())
        cfg["newshape"] = tuple(shape)
        return cfg


def _is_scalar(v: Any) -> bool:
    return np.ndim(v) == 0 or np.size(v) == 1


def _op_pointwise(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """Elementwise with one tensor (the rest scalars), a join of several tensors of the output's channels."""
    operands = [v for v in keras.tree.flatten(node.arguments.args)
                if _is_operand(v) and not isinstance(v, keras.KerasTensor)]
    if not all(_is_scalar(v) for v in operands):
        return _BLOCKER  # a constant array may vary over channels
    rank = len(out_shape)
    if any(len(s) != rank or s[-1] != out_shape[-1] for s in in_shapes):
        return _BLOCKER  # broadcasting over the channel axis
    return lambda call: _OpPointwise(call, _POINTWISE_OPS[type(op).__name__])


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
    axes = _axes(op.get_config().get("axis"), len(in_shapes[0]))
    ok = axes is not None and len(in_shapes[0]) - 1 not in axes and out_shape[-1] == in_shapes[0][-1]
    return _PASS if ok else _BLOCKER


def _op_pool(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    fmt = op.get_config().get("data_format") or keras.config.image_data_format()
    return _PASS if fmt == "channels_last" else _BLOCKER


def _op_reshape(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    if not _keeps_channel_axis(in_shapes[0], out_shape):
        return _BLOCKER
    return _OpReshape if "newshape" in op.get_config() else _PASS


def _op_concat(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    rank = len(out_shape)
    if any(len(s) != rank for s in in_shapes):
        return _BLOCKER
    return _concat_kind(int(op.get_config().get("axis", 0)), rank)


def _concat_kind(axis: int, rank: int) -> KindFactory:
    """Along channels: a concat; along a spatial axis: a join that keeps channels aligned."""
    return table_kind("concat" if axis % rank == rank - 1 else "stack_spatial")


# keras.ops operation class name -> function(op, node, input shapes, output shape) giving its kind;
# every other keras.ops node blocks the channels it reads.
KERAS_OPS: dict[str, Callable[..., KindFactory]] = {
    **{name: _op_pointwise for name in _POINTWISE_OPS},
    **{name: _op_reduce for name in ("Mean", "Max", "Min", "Amax", "Amin")},
    **{name: _op_pool for name in ("AveragePool", "MaxPool")},
    **{name: _op_reshape for name in ("Reshape", "ExpandDims", "Squeeze")},
    "Concatenate": _op_concat,
}


def op_kind(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """The kind of a ``keras.ops`` node (an Operation that is not a Layer)."""
    rule = KERAS_OPS.get(type(op).__name__) if type(op).__module__.startswith("keras.src.ops.") else None
    if rule is None or not in_shapes:
        return _BLOCKER
    return rule(op, node, in_shapes, out_shape)


# --------------------------------------------------------------------------- layer -> kind

_L = keras.layers
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
_CHANNEL_MIXING_ACTIVATIONS = {"softmax", "log_softmax"}
# A rule: f(layer, matched base class, input shapes, output shape) -> the kind of that call.
LayerRuleFn = Callable[[Any, type, list, tuple], KindFactory]


def _channel_axis(layer: Any, rank: int) -> bool:
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    return axis is not None and axis % rank == rank - 1


def _plain(kind: KindFactory) -> LayerRuleFn:
    """``kind`` for a channels-last layer whose ``call`` is its base class's, else a blocker."""
    def rule(layer, base, ins, out):
        return kind if _channels_last(layer) and not _overrides_call(layer, base) else _BLOCKER
    return rule


def _op(op: str, read: Callable[[Any], dict] = lambda layer: {}) -> LayerRuleFn:
    """Canonical op ``op`` with the parameters ``read(layer)``."""
    return lambda layer, base, ins, out: table_kind(op, lambda call: read(call.layer))


def _conv(layer, base, ins, out):
    if not _channels_last(layer) or _overrides_call(layer, base) or layer.padding == "causal":
        return _BLOCKER
    return _GroupedDepthwise if layer.groups > 1 and layer.groups == ins[0][-1] else _Producer


def _dense(layer, base, ins, out):
    plain = not _overrides_call(layer, base) and getattr(layer, "quantization_mode", None) is None
    if not plain or getattr(layer, "lora_enabled", False):
        return _BLOCKER
    return lambda call: _Producer(call, "dense")


def _batchnorm(layer, base, ins, out):
    return _BatchNorm if _channel_axis(layer, len(out)) and not _overrides_call(layer, base) else _BLOCKER


def _layernorm(layer, base, ins, out):
    plain = not getattr(layer, "rms_scaling", False) and (
        isinstance(layer, PartialLayerNormalization) or not _overrides_call(layer, base))
    return _LayerNorm if plain and _channel_axis(layer, len(out)) else _BLOCKER


def _activation(layer, base, ins, out):
    name = getattr(layer.activation, "__name__", str(layer.activation))
    if name in _CHANNEL_MIXING_ACTIVATIONS:
        return _BLOCKER
    op, params = activation_op(layer.activation)
    return table_kind(op, lambda call: params)


def _rescaling(layer, base, ins, out):
    if np.size(layer.scale) != 1 or np.size(layer.offset) != 1:
        return _BLOCKER
    return _op("rescale", lambda L: dict(scale=float(np.ravel(L.scale)[0]), offset=float(np.ravel(L.offset)[0])))(
        layer, base, ins, out)


def _merge(layer, base, ins, out):
    if any(len(s) != len(out) or s[-1] != out[-1] for s in ins):
        return _BLOCKER  # broadcasting over the channel axis
    return table_kind(_JOINS[base])


def _concatenate(layer, base, ins, out):
    return _concat_kind(layer.axis, len(out))


def _flatten(layer, base, ins, out):
    if len(ins[0]) == 2:
        return _PASS
    return _Flatten if _channels_last(layer) and all(d is not None for d in ins[0][1:]) else _BLOCKER


def _reshape(layer, base, ins, out):
    return _Reshape if _keeps_channel_axis(ins[0], out) else _BLOCKER


# Keras layer classes -> their rule, first match wins (subclasses match their base's entry).
KERAS_LAYERS: list[tuple[tuple[type, ...], LayerRuleFn]] = [
    ((_L.SeparableConv1D, _L.SeparableConv2D), _plain(_SeparableConv)),
    ((_L.DepthwiseConv1D, _L.DepthwiseConv2D), _plain(_Depthwise)),
    ((_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), _plain(_ConvTranspose)),
    ((_L.Conv1D, _L.Conv2D, _L.Conv3D), _conv),
    ((_L.Dense,), _dense),
    ((_L.BatchNormalization,), _batchnorm),
    ((_L.LayerNormalization,), _layernorm),
    ((_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D), _plain(table_kind("zero_pad"))),
    (_ELEMENTWISE, _plain(_PASS)),
    ((_L.Activation,), _activation),
    ((_L.ReLU,), _op("relu", lambda L: dict(negative_slope=float(L.negative_slope), max_value=L.max_value,
                                            threshold=float(L.threshold)))),
    ((_L.LeakyReLU,), _op("leaky_relu", lambda L: dict(negative_slope=float(L.negative_slope)))),
    ((_L.ELU,), _op("elu", lambda L: dict(alpha=float(L.alpha)))),
    ((_L.PReLU,), lambda layer, base, ins, out: _PReLU),
    ((_L.Rescaling,), _rescaling),
    (tuple(_JOINS), _merge),
    ((_L.Concatenate,), _concatenate),
    ((_L.Flatten,), _flatten),
    ((_L.Reshape,), _reshape),
]


def layer_kind(layer: keras.layers.Layer, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    """The kind describing ``layer`` as called with these shapes."""
    declared = registered_rule(layer)
    if declared is not None:
        same = all(len(s) == len(out_shape) and s[-1] == out_shape[-1] for s in in_shapes)
        return _Registered if declared.rule == "elementwise" and same else _BLOCKER
    for bases, rule in KERAS_LAYERS:
        for base in bases:
            if isinstance(layer, base):
                return rule(layer, base, in_shapes, out_shape)
    return _BLOCKER


def _kind_of(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> KindFactory:
    if len(node.outputs) != 1:
        return _BLOCKER
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
            kind = LayerKind(LayerCall(None, [], self._widths[tid], []), "input", _width)
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
                in_ids = [scope[id(t)] for t in node.input_tensors]
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
                in_shapes = [_shape(t) for t in node.input_tensors]
                out_shape = _shape(node.outputs[0])
                kind_cls = _kind_of(layer, node, in_shapes, out_shape)
                call = LayerCall(
                    layer, [self._widths[i] for i in in_ids], self._widths[out_ids[0]], in_shapes, out_shape, node
                )
                kind = kind_cls(call)
                op = Op(
                    name=path if n == 0 else f"{path}#{n}",
                    rule=kind.rule,
                    inputs=in_ids,
                    outputs=out_ids,
                    layer=path,
                    channels=kind.channels(),
                    blocks=kind.blocks(),
                    has_channel_params=kind.has_channel_params,
                    semantics=kind,
                    reads_all_channels=kind.reads_all_channels,
                )
                self.records.append(_Record(op, kind, node, {id(t): scope[id(t)] for t in node.input_tensors}))
        return [scope[id(t)] for t in fmodel.outputs]

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

    def find_group(self, group: ChannelGroup) -> ChannelGroup:
        """The group of this graph with the same producing layers (groups are matched by layers)."""
        for g in self.groups():
            if g.layers == tuple(group.layers):
                return g
        raise ValueError(
            f"{group!r} is not a prunable channel group of model {self.model.name!r}; "
            "get groups from tfcompress.channel_groups(model)."
        )


def build_graph(model: keras.Model) -> KerasGraph:
    """Analyse ``model`` (Functional or Sequential, nested models allowed) into a :class:`KerasGraph`."""
    return KerasGraph(model)
