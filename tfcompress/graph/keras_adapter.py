"""Translate a Keras 3 Functional or Sequential model into the channel engine's graph.

Each Keras layer class is described once by a :class:`LayerKind`: its channel rule, which of its weights
are indexed by output channels (for zeroing), how constant channels flow through it (for stripping) and how
to rebuild it with fewer channels. Three tables choose the kind of a call: :data:`KERAS_LAYERS` (Keras layer
classes), :data:`KERAS_OPS` (the raw ``keras.ops`` nodes Keras records for ``x + y``, ``keras.ops.mean`` ...)
and the user registry of :func:`register_layer` (custom layers); anything else blocks. Nested models are
inlined: layer names inside them are prefixed with the sub-model's name (``"block/conv"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import keras
import numpy as np

from tfcompress.graph.engine import ChannelGraph, ChannelGroup, Op, Rule, elementwise_consts
from tfcompress.graph.keras_layers import PartialLayerNormalization
from tfcompress.graph import ops
from tfcompress.graph.kernels import fold_into_bias, slice_kernel

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


def _activation_fn(activation: Any) -> Callable[[np.ndarray], np.ndarray]:
    fn = keras.activations.get(activation)
    return lambda v: _np(fn(keras.ops.convert_to_tensor(np.asarray(v, np.float32))))


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


class LayerKind:
    """Base description of a layer class: no weights indexed by channels, identity on constants."""

    rule = Rule.ELEMENTWISE
    has_channel_params = False
    reads_all_channels = False

    def __init__(self, call: LayerCall) -> None:
        self.call = call
        self.layer = call.layer

    # --- engine protocol
    def const_out(self, in_consts: list[np.ndarray]) -> list[np.ndarray]:
        return [in_consts[0]]

    def can_fold(self, input_index: int) -> bool:
        return False

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

    def macs(self, in_counts: list[int], out_count: int) -> float:
        """Multiply-accumulates of one call for one example, with these channel counts."""
        return 0.0

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


class _Blocker(LayerKind):
    rule = Rule.BLOCKER

    def const_out(self, in_consts):
        return [np.full(self.call.out_width, np.nan)]


class _Input(_Blocker):
    rule = Rule.INPUT


class _Elementwise(LayerKind):
    """Activations, pooling, dropout, upsampling, cropping: constant per channel stays constant."""


class _Activation(LayerKind):
    def __init__(self, call):
        super().__init__(call)
        self.fn = lambda v: _np(self.layer(np.asarray(v, np.float32)[None]))[0]

    def const_out(self, in_consts):
        return [elementwise_consts(self.fn, in_consts[0])]


class _ZeroPadding(LayerKind):
    def const_out(self, in_consts):
        return [ops.const_out("zero_pad", in_consts)]


class _Rescaling(LayerKind):
    def const_out(self, in_consts):
        scale, offset = float(np.asarray(self.layer.scale)), float(np.asarray(self.layer.offset))
        return [in_consts[0] * scale + offset]


class _Reshape(LayerKind):
    """A reshape that keeps the channel axis ((C,) -> (1, 1, C), (H, W, C) -> (H*W, C)) passes channels."""

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        cfg["target_shape"] = tuple(cfg["target_shape"][:-1]) + (int(out_keep.sum()),)
        return cfg


class _PReLU(LayerKind):
    has_channel_params = True

    def const_out(self, in_consts):
        alpha = _np(self.layer.alpha)
        a = alpha.reshape(-1, alpha.shape[-1]) if alpha.ndim else alpha.reshape(1, 1)
        if not np.all(a == a[:1]):
            return [np.full(in_consts[0].shape, np.nan)]  # alpha varies over space
        a = np.broadcast_to(a[0], in_consts[0].shape)
        c = in_consts[0]
        return [np.where(c >= 0, c, a * c)]

    def weights(self, in_keeps, out_keep, folds):
        alpha = _np(self.layer.alpha)
        return [ops.take_channels(alpha, out_keep, -1) if alpha.shape[-1] == out_keep.size else alpha]


class _BatchNorm(LayerKind):
    has_channel_params = True

    def _vectors(self):
        L, n = self.layer, self.call.out_width
        gamma = _np(L.gamma) if L.scale else np.ones(n)
        beta = _np(L.beta) if L.center else np.zeros(n)
        return gamma, beta, _np(L.moving_mean), _np(L.moving_variance)

    def const_out(self, in_consts):
        gamma, beta, mean, var = self._vectors()
        return [ops.const_out("batchnorm", in_consts, gamma=gamma, beta=beta, mean=mean, var=var,
                              epsilon=self.layer.epsilon)]

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.gamma, 0)] * bool(L.scale) + [ChannelParam(L.beta, 0)] * bool(L.center)

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(_np(w), out_keep, 0) for w in self.layer.weights]


class _Producer(LayerKind):
    """Conv1D/2D/3D (grouped too), Dense: a kernel (..., in, out), a bias (out) and an activation."""

    rule = Rule.PRODUCER
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

    def const_out(self, in_consts):
        k = np.moveaxis(self._kernel(), self.out_axis, -1)
        out = ops.const_out("conv", in_consts, kernel=k, bias=self._bias())
        return [elementwise_consts(_activation_fn(self.layer.activation), out)]

    def can_fold(self, input_index):
        L = self.layer
        if isinstance(L, keras.layers.Dense):
            return ops.can_fold("dense")
        return ops.can_fold("conv", valid_padding=L.padding == "valid", window=math.prod(L.kernel_size))

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.kernel, self.out_axis)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def macs(self, in_counts, out_count):
        L = self.layer
        spatial = ops.positions(self.call.out_shape)
        if isinstance(L, keras.layers.Dense):
            return ops.macs("dense", in_counts, out_count, positions=spatial)
        k = math.prod(L.kernel_size)
        if isinstance(L, keras.layers.SeparableConv1D | keras.layers.SeparableConv2D):
            return ops.macs("separable_conv", in_counts, out_count, positions=spatial, window=k,
                            multiplier=int(L.depth_multiplier))
        if self.out_axis == -2:
            return ops.macs("conv_transpose", in_counts, out_count,
                            in_positions=ops.positions(self.call.in_shapes[0]), window=k)
        return ops.macs("conv", in_counts, out_count, positions=spatial, window=k, groups=self.blocks())

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
        kernel = np.moveaxis(self._kernel(), (self.in_axis, self.out_axis), (-2, -1))  # as (..., in, out)
        bias = self._bias() + fold_into_bias(kernel, in_keeps[0], folds[0], self.blocks())
        new = [np.moveaxis(slice_kernel(kernel, in_keeps[0], out_keep, self.blocks()), (-2, -1),
                           (self.in_axis, self.out_axis))]
        if self.layer.use_bias or self.needs_bias(folds):
            new.append(bias[out_keep])
        return new


class _ConvTranspose(_Producer):
    out_axis = -2
    in_axis = -1

    def can_fold(self, input_index):
        return False


class _Dense(_Producer):
    def can_fold(self, input_index):
        return ops.can_fold("dense")


class _SeparableConv(_Producer):
    """Depthwise on the input channels, then a pointwise producer."""

    def _kernel(self):
        return _np(self.layer.pointwise_kernel)

    def can_fold(self, input_index):
        return False

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.pointwise_kernel, -1)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def weights(self, in_keeps, out_keep, folds):
        L = self.layer
        m = int(L.depth_multiplier)
        new = {
            id(L.depthwise_kernel): ops.take_channels(_np(L.depthwise_kernel), in_keeps[0], -2),
            id(L.pointwise_kernel): ops.take_channels(ops.take_channels(self._kernel(), np.repeat(in_keeps[0], m), -2), out_keep, -1),
        }
        if L.use_bias:
            new[id(L.bias)] = self._bias()[out_keep]
        return [new.get(id(w), _np(w)) for w in L.weights]  # a QAT twin's quantizer ranges stay


class _Depthwise(LayerKind):
    """DepthwiseConv: output channel c*m+k reads only input channel c."""

    rule = Rule.DEPTHWISE
    has_channel_params = True

    def channels(self):
        return int(self.layer.depth_multiplier)

    def _bias(self):
        return _np(self.layer.bias) if self.layer.use_bias else np.zeros(self.call.out_width)

    def _kernel(self) -> np.ndarray:
        """The kernel as (..., in, multiplier)."""
        return _np(self.layer.kernel)

    def const_out(self, in_consts):
        L = self.layer
        out = ops.const_out("depthwise", in_consts, kernel=self._kernel(), bias=self._bias(),
                            valid_padding=L.padding == "valid")
        return [elementwise_consts(_activation_fn(L.activation), out)]

    def output_params(self):
        L = self.layer
        k = tuple(L.kernel.shape)
        view = k[:-2] + (k[-2] * k[-1],)  # output channel c*m+j is kernel[..., c, j]
        return [ChannelParam(L.kernel, -1, view)] + ([ChannelParam(L.bias, 0)] if L.use_bias else [])

    def macs(self, in_counts, out_count):
        return ops.macs("depthwise", in_counts, out_count, positions=ops.positions(self.call.out_shape),
                        window=math.prod(self.layer.kernel_size))

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


class _LayerNorm(LayerKind):
    """LayerNormalization over the channel axis: statistics over all channels, then a per-channel affine.

    Its inputs are read as a whole (a removed channel must be a known constant, which the stripped layer
    keeps in its statistics: :class:`PartialLayerNormalization`); an output channel whose gamma is zero is
    the constant beta.
    """

    has_channel_params = True
    reads_all_channels = True

    def _vectors(self):
        L, n = self.layer, self.call.out_width
        gamma = _np(L.gamma) if L.scale else np.ones(n)
        beta = _np(L.beta) if L.center else np.zeros(n)
        return gamma, beta

    def const_out(self, in_consts):
        gamma, beta = self._vectors()
        return [ops.const_out("layernorm", in_consts, gamma=gamma, beta=beta)]

    def can_fold(self, input_index):
        return ops.can_fold("layernorm")

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.gamma, 0)] * bool(L.scale) + [ChannelParam(L.beta, 0)] * bool(L.center)

    def rebuilt_class(self):
        return PartialLayerNormalization

    def config(self, in_keeps, out_keep, folds):
        removed = list(getattr(self.layer, "removed_values", [])) + [float(v) for v in folds[0][~in_keeps[0]]]
        return {**self.layer.get_config(), "removed_values": removed}

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(_np(w), out_keep, 0) for w in self.layer.weights]


class _Join(LayerKind):
    rule = Rule.JOIN
    op = "add"  # its canonical op in :data:`tfcompress.graph.ops.OPS`

    def const_out(self, in_consts):
        return [ops.const_out(self.op, in_consts)]


def _join(op: str) -> type:
    return type("_JoinKind", (_Join,), {"op": op})


class _Concat(LayerKind):
    rule = Rule.CONCAT

    def const_out(self, in_consts):
        return [ops.const_out("concat", in_consts)]


class _Flatten(LayerKind):
    rule = Rule.FLATTEN

    def channels(self):
        return int(math.prod(self.call.in_shapes[0][1:-1]))

    def const_out(self, in_consts):
        return [np.tile(in_consts[0], self.channels())]


# --------------------------------------------------------------------------- user-declared layers

@dataclasses.dataclass(frozen=True)
class LayerRule:
    """The channel rule of a custom layer, as declared with :func:`register_layer`."""

    rule: str
    channel_weights: tuple[str, ...] = ()
    resize_config: Callable[[dict, int], dict] | None = None


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
) -> None:
    """Declare how a custom Keras layer maps channels, so that pruning, stripping and QAT go through it.

    Args:
        cls: the layer class (its subclasses inherit the rule unless registered themselves).
        rule: ``"elementwise"``: output channel c depends only on channel c of each input, the same function
            at every position (activations, per-channel scales; with several inputs of the same channels, a
            join like ``Add``); the layer's own ``call`` on per-channel constants tells stripping what a
            constant channel becomes. ``"blocker"``: channels reaching the layer are
            never removed.
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
    _REGISTRY[cls] = LayerRule(rule, names, resize_config)


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
        super().__init__(call)
        self.declared = registered_rule(call.layer)
        self.has_channel_params = bool(self.declared.channel_weights)

    def const_out(self, in_consts):
        return [_run_on_consts(self.call, in_consts, zero_absorbs=False)]

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


class _RegisteredJoin(_Registered):
    """A layer declared ``"elementwise"`` called on several tensors of the same channels: it joins them."""

    rule = Rule.JOIN


# --------------------------------------------------------------------------- keras.ops nodes

def _per_channel(c: np.ndarray, rank: int) -> np.ndarray:
    """A per-channel constant vector as a tensor of ``rank`` that broadcasts over every other axis."""
    return np.nan_to_num(c).astype(np.float32).reshape((1,) * (rank - 1) + (-1,))


def _run_on_consts(call: LayerCall, in_consts: list[np.ndarray], zero_absorbs: bool) -> np.ndarray:
    """The output constants of a position-wise call, found by running the call itself on its inputs' constants.

    An output channel is unknown where an input channel is, except (``zero_absorbs``: a product) where an
    input is exactly zero.
    """
    node = call.node
    values = {id(t): _per_channel(c, len(t.shape)) for t, c in zip(node.input_tensors, in_consts)}
    args, kwargs = node.arguments.fill_in(values)
    out = _np(call.layer(*args, **kwargs)).astype(np.float64).reshape(-1)
    if out.size != call.out_width:
        return np.full(call.out_width, np.nan)
    unknown = np.any([np.isnan(c) for c in in_consts], axis=0)
    if zero_absorbs:
        unknown &= ~np.any([c == 0 for c in in_consts], axis=0)
    return np.where(unknown, np.nan, out)


class _OpPointwise(LayerKind):
    """A ``keras.ops`` function applied position by position (``x + y``, ``x * 0.5``, ``relu6``, ``gelu``...).

    Its constant output is found by running the op itself on the inputs' per-channel constants, so each op's
    value semantics live in Keras alone. An output channel is unknown where an input channel is, except that
    a product with an exact zero is zero.
    """

    zero_absorbs = False

    def const_out(self, in_consts):
        return [_run_on_consts(self.call, in_consts, self.zero_absorbs)]


class _OpProduct(_OpPointwise):
    zero_absorbs = True


class _OpJoin(_OpPointwise):
    rule = Rule.JOIN


class _OpProductJoin(_OpProduct):
    rule = Rule.JOIN


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


def _pointwise_kind(node: Any, out_shape: tuple, product: bool) -> type[LayerKind]:
    """Elementwise with one tensor (the rest scalars), a join of several tensors of the output's channels."""
    tensors = node.input_tensors
    operands = [v for v in keras.tree.flatten(node.arguments.args)
                if not isinstance(v, keras.KerasTensor | str | bool) and v is not None]
    if not all(_is_scalar(v) for v in operands):
        return _Blocker  # a constant array may vary over channels
    rank = len(out_shape)
    if any(len(t.shape) != rank or t.shape[-1] != out_shape[-1] for t in tensors):
        return _Blocker  # broadcasting over the channel axis
    if len(tensors) == 1:
        return _OpProduct if product else _OpPointwise
    return _OpProductJoin if product else _OpJoin


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


def _op_reduce(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    axes = _axes(op.get_config().get("axis"), len(in_shapes[0]))
    ok = axes is not None and len(in_shapes[0]) - 1 not in axes and out_shape[-1] == in_shapes[0][-1]
    return _Elementwise if ok else _Blocker


def _op_pool(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    fmt = op.get_config().get("data_format") or keras.config.image_data_format()
    return _Elementwise if fmt == "channels_last" else _Blocker


def _op_reshape(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    if not _keeps_channel_axis(in_shapes[0], out_shape):
        return _Blocker
    return _OpReshape if "newshape" in op.get_config() else _Elementwise


def _op_concat(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    rank = len(out_shape)
    if any(len(s) != rank for s in in_shapes):
        return _Blocker
    if int(op.get_config().get("axis", 0)) % rank == rank - 1:
        return _Concat
    return _join("stack_spatial")


def _pointwise(product: bool = False) -> Callable:
    return lambda op, node, in_shapes, out_shape: _pointwise_kind(node, out_shape, product)


_POINTWISE_OPS = (
    "Add", "Subtract", "Divide", "TrueDivide", "Maximum", "Minimum", "Negative", "Abs", "Square", "Sqrt",
    "Exp", "Tanh", "Sigmoid", "Relu", "Relu6", "Silu", "HardSigmoid", "HardSilu", "Gelu", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "LeakyRelu", "LogSigmoid", "Clip", "Cast", "Erf", "Sign", "Floor", "Ceil",
    "Round",
)
# keras.ops operation class name -> function(op, node, input shapes, output shape) giving its LayerKind;
# every other keras.ops node blocks the channels it reads.
KERAS_OPS: dict[str, Callable[..., type[LayerKind]]] = {
    **{name: _pointwise() for name in _POINTWISE_OPS},
    "Multiply": _pointwise(product=True),
    **{name: _op_reduce for name in ("Mean", "Max", "Min", "Amax", "Amin")},
    **{name: _op_pool for name in ("AveragePool", "MaxPool")},
    **{name: _op_reshape for name in ("Reshape", "ExpandDims", "Squeeze")},
    "Concatenate": _op_concat,
}


def op_kind(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    """The :class:`LayerKind` of a ``keras.ops`` node (an Operation that is not a Layer)."""
    rule = KERAS_OPS.get(type(op).__name__) if type(op).__module__.startswith("keras.src.ops.") else None
    if rule is None or not in_shapes:
        return _Blocker
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
# A rule: f(layer, matched base class, input shapes, output shape) -> the LayerKind of that call.
LayerRuleFn = Callable[[Any, type, list, tuple], "type[LayerKind]"]


def _channel_axis(layer: Any, rank: int) -> bool:
    axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
    return axis is not None and axis % rank == rank - 1


def _plain(kind: type[LayerKind]) -> LayerRuleFn:
    """``kind`` for a channels-last layer whose ``call`` is its base class's, else a blocker."""
    def rule(layer, base, ins, out):
        return kind if _channels_last(layer) and not _overrides_call(layer, base) else _Blocker
    return rule


def _always(kind: type[LayerKind]) -> LayerRuleFn:
    return lambda layer, base, ins, out: kind


def _conv(layer, base, ins, out):
    if not _channels_last(layer) or _overrides_call(layer, base) or layer.padding == "causal":
        return _Blocker
    return _GroupedDepthwise if layer.groups > 1 and layer.groups == ins[0][-1] else _Producer


def _dense(layer, base, ins, out):
    plain = not _overrides_call(layer, base) and getattr(layer, "quantization_mode", None) is None
    return _Dense if plain and not getattr(layer, "lora_enabled", False) else _Blocker


def _batchnorm(layer, base, ins, out):
    return _BatchNorm if _channel_axis(layer, len(out)) and not _overrides_call(layer, base) else _Blocker


def _layernorm(layer, base, ins, out):
    plain = not getattr(layer, "rms_scaling", False) and (
        isinstance(layer, PartialLayerNormalization) or not _overrides_call(layer, base))
    return _LayerNorm if plain and _channel_axis(layer, len(out)) else _Blocker


def _activation(layer, base, ins, out):
    name = getattr(layer.activation, "__name__", str(layer.activation))
    return _Blocker if name in _CHANNEL_MIXING_ACTIVATIONS else _Activation


def _rescaling(layer, base, ins, out):
    return _Rescaling if np.size(layer.scale) == 1 and np.size(layer.offset) == 1 else _Blocker


def _merge(layer, base, ins, out):
    if any(len(s) != len(out) or s[-1] != out[-1] for s in ins):
        return _Blocker  # broadcasting over the channel axis
    return _join(_JOINS[base])


def _concatenate(layer, base, ins, out):
    if layer.axis % len(out) == len(out) - 1:
        return _Concat
    return _join("stack_spatial")  # concatenation along a spatial axis keeps channels aligned


def _flatten(layer, base, ins, out):
    if len(ins[0]) == 2:
        return _Elementwise
    return _Flatten if _channels_last(layer) and all(d is not None for d in ins[0][1:]) else _Blocker


def _reshape(layer, base, ins, out):
    return _Reshape if _keeps_channel_axis(ins[0], out) else _Blocker


# Keras layer classes -> their rule, first match wins (subclasses match their base's entry).
KERAS_LAYERS: list[tuple[tuple[type, ...], LayerRuleFn]] = [
    ((_L.SeparableConv1D, _L.SeparableConv2D), _plain(_SeparableConv)),
    ((_L.DepthwiseConv1D, _L.DepthwiseConv2D), _plain(_Depthwise)),
    ((_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose), _plain(_ConvTranspose)),
    ((_L.Conv1D, _L.Conv2D, _L.Conv3D), _conv),
    ((_L.Dense,), _dense),
    ((_L.BatchNormalization,), _batchnorm),
    ((_L.LayerNormalization,), _layernorm),
    ((_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D), _plain(_ZeroPadding)),
    (_ELEMENTWISE, _plain(_Elementwise)),
    ((_L.Activation,), _activation),
    ((_L.ReLU, _L.LeakyReLU, _L.ELU), _always(_Activation)),
    ((_L.PReLU,), _always(_PReLU)),
    ((_L.Rescaling,), _rescaling),
    (tuple(_JOINS), _merge),
    ((_L.Concatenate,), _concatenate),
    ((_L.Flatten,), _flatten),
    ((_L.Reshape,), _reshape),
]


def layer_kind(layer: keras.layers.Layer, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    """The :class:`LayerKind` describing ``layer`` as called with these shapes."""
    declared = registered_rule(layer)
    if declared is not None:
        same = all(len(s) == len(out_shape) and s[-1] == out_shape[-1] for s in in_shapes)
        if declared.rule != "elementwise" or not same:
            return _Blocker
        return _Registered if len(in_shapes) == 1 else _RegisteredJoin
    for bases, rule in KERAS_LAYERS:
        for base in bases:
            if isinstance(layer, base):
                return rule(layer, base, in_shapes, out_shape)
    return _Blocker


def _kind_of(op: Any, node: Any, in_shapes: list[tuple], out_shape: tuple) -> type[LayerKind]:
    if len(node.outputs) != 1:
        return _Blocker
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
            self.records.append(_Record(op, _Input(LayerCall(None, [], self._widths[tid], [])), None, {}))
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
