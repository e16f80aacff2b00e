"""What one Keras layer call is to the channel engine, and how its weights change with its channels.

A :class:`LayerKind` is a call read as a canonical op of :data:`tfcompress.graph.ops.OPS` (whose table gives the
channel rule, constant propagation, bias folding and MACs) plus what is Keras's own: which weights are indexed
by output channels (pruning zeroes them) and the config and weights of the layer rebuilt with fewer channels
(stripping). Which kind a call gets is decided by :mod:`tfcompress.graph.keras_adapter`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
import numpy as np

from tfcompress.graph import ops
from tfcompress.graph.kernels import channel_mask
from tfcompress.graph.custom_layers import registered_rule
from tfcompress.graph.engine import Rule
from tfcompress.graph.keras_layers import (PartialGroupNormalization, PartialLayerNormalization,
                                           PartialRMSNormalization, PartialUnitNormalization)

def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "numpy"):  # variables and eager tensors
        return np.asarray(x.numpy())
    return np.asarray(keras.ops.convert_to_numpy(x))


def activation_op(activation: Any) -> tuple[str, dict]:
    """A Keras activation as a canonical op of :data:`tfcompress.graph.ops.OPS` and its parameters; a function
    of the user's own is applied as it is, through Keras."""
    fn = keras.activations.get(activation)
    name = getattr(fn, "__name__", "")
    if name in ops.UNARY and keras.activations.get(name) is fn:
        return name, {}
    return "function", {"fn": lambda v: to_numpy(fn(keras.ops.convert_to_tensor(np.asarray(v, np.float32))))}


# Keras activations whose every output reads all channels (glu also halves them)
CHANNEL_MIXING_ACTIVATIONS = frozenset({"softmax", "log_softmax", "sparsemax", "glu"})


def mixes_channels(activation: Any) -> bool:
    """Whether an activation's output channel depends on other channels (a softmax). A function of the
    user's own is probed: one channel of a sample is changed and the others must stay; a function that fails
    on the probe counts as mixing, so its channels stay."""
    fn = keras.activations.get(activation)
    name = getattr(fn, "__name__", "")
    if name and getattr(keras.activations, name, None) is fn:  # one of Keras' own: known by name
        return name in CHANNEL_MIXING_ACTIVATIONS
    probe = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    moved = probe.copy()
    moved[..., 0] += 1.0
    try:
        a, b = (to_numpy(fn(keras.ops.convert_to_tensor(v))) for v in (probe, moved))
    except Exception:
        return True
    return a.shape != probe.shape or not np.array_equal(a[..., 1:], b[..., 1:])


def _activated(activation: Any, c: np.ndarray) -> np.ndarray:
    op, params = activation_op(activation)
    return ops.const_out(op, [c], **params)


@dataclasses.dataclass
class ChannelParam:
    """A weight whose ``axis`` (of its ``view`` shape, if given) is indexed by a layer's channels; with ``blocks``
    > 1, in blocks on ``axis`` and the next axis (:func:`tfcompress.graph.kernels.channel_mask`)."""

    variable: Any
    axis: int
    view: tuple | None = None
    blocks: int = 1

    def mask(self, keep: np.ndarray) -> np.ndarray:
        """A 0/1 array of the variable's shape that zeroes the channels where ``keep`` is False."""
        return channel_mask(tuple(self.variable.shape), keep, self.axis, self.view, self.blocks)


def ranges_read_rows(layer: Any) -> bool:
    """Whether ``layer`` quantizes its kernel on a range it takes from the kernel's values (a QAT twin's
    ``quantized_kernel``): kernel rows that read a removed channel then still move the other rows' rounding,
    so they are zeroed with the channel, and stripping them keeps the layer's arithmetic."""
    return callable(getattr(layer, "quantized_kernel", None))


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
    mixes_outputs = ""

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

    def output_width(self) -> int:
        """Channels of the op's output (the call's, unless the op is a part of the call)."""
        return self.call.out_width

    # --- weights
    def output_params(self) -> list["ChannelParam"]:
        """The weights indexed by this layer's output channels (zeroing them zeroes those channels)."""
        return []

    def input_params(self) -> list["ChannelParam"]:
        """The weights indexed by this layer's (first) input channels: the kernel rows that read them."""
        return []

    def zero_outputs(self, pos: np.ndarray) -> None:
        """Zero every weight that produces the output channels ``pos``."""
        keep = np.ones(self.output_width(), dtype=bool)
        keep[pos] = False
        for p in self.output_params():
            p.variable.assign(to_numpy(p.variable) * p.mask(keep))

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
        return [to_numpy(w) for w in getattr(self.layer, "weights", [])]

    def needs_bias(self, folds: list[np.ndarray]) -> bool:
        return False

    def strides(self) -> int:
        """The largest stride of the call (1 unless the layer strides over positions)."""
        return 1

    def arguments(self, args: tuple, kwargs: dict, out_keep: np.ndarray,
                  in_keeps: list[np.ndarray]) -> tuple[tuple, dict]:
        """The call's arguments (with the new input tensors filled in) for the rebuilt call whose output keeps
        the channels ``out_keep`` of inputs that keep ``in_keeps``: as they are, unless the call itself holds
        per-channel constants or channel positions."""
        return args, kwargs

    def parts(self) -> list["Part"]:
        """The ops the call is made of before its own (a MultiHeadAttention's heads); none for most layers."""
        return []

    def wrap(self, layer: Any, path: str) -> Any:
        """The layer the rebuilt model calls, given the rebuilt ``layer`` (the one this kind describes): itself,
        unless the call wraps the layer (:class:`TimeDistributed`)."""
        return layer


KindFactory = Callable[[LayerCall], LayerKind]


def table_kind(op: str, params: Callable[[LayerCall], dict] | None = None) -> KindFactory:
    """The kind of a call that is canonical op ``op`` and has nothing to edit but its channel count."""
    return lambda call: LayerKind(call, op, params)


def width_params(call: LayerCall) -> dict:
    return {"width": call.out_width}


BLOCKER = table_kind("blocker", width_params)


class ChannelsFirst(LayerKind):
    """A layer with ``data_format="channels_first"``: the channel rules follow channels on the last axis, so
    it blocks the channels that reach it, and messages name its layout (the model can be built channels-last)."""

    op = "blocker"

    def params(self):
        return width_params(self.call)

    @property
    def label(self) -> str:
        return f"{self.layer.name} (data_format='channels_first'; channels are followed on the last axis only)"


PASS = table_kind("identity")


class _TargetShape:
    """A reshape whose target shape's last entry is the output's channel count (unless it says ``-1``): the
    ``target_shape`` of a ``Reshape`` layer or the ``newshape`` of ``keras.ops.reshape``, rewritten to the kept
    count."""

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        key = "target_shape" if "target_shape" in cfg else "newshape"
        shape = list(cfg[key])
        if shape[-1] != -1:
            shape[-1] = int(out_keep.sum())
        cfg[key] = tuple(shape)
        return cfg


class Reshape(_TargetShape, LayerKind):
    """A reshape that keeps the channel axis ((C,) -> (1, 1, C), (H, W, C) -> (H*W, C)) passes channels."""


class PReLU(LayerKind):
    op = "prelu"
    has_channel_params = True

    def params(self):
        return {"alpha": to_numpy(self.layer.alpha)}

    def weights(self, in_keeps, out_keep, folds):
        alpha = to_numpy(self.layer.alpha)
        return [ops.take_channels(alpha, out_keep, -1) if alpha.shape[-1] == out_keep.size else alpha]


class Normalization(LayerKind):
    """A normalization over the channel axis: its weights are vectors over the channels, gamma and beta (ones
    and zeros where it does not learn them) produce them."""

    has_channel_params = True

    def params(self):
        L, n = self.layer, self.call.out_width
        return dict(gamma=to_numpy(L.gamma) if L.scale else np.ones(n),
                    beta=to_numpy(L.beta) if L.center else np.zeros(n))

    def output_params(self):
        L = self.layer
        return [ChannelParam(L.gamma, 0)] * bool(L.scale) + [ChannelParam(L.beta, 0)] * bool(L.center)

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(to_numpy(w), out_keep, 0) for w in self.layer.weights]


class BatchNorm(Normalization):
    op = "batchnorm"

    def params(self):
        L = self.layer
        return dict(**super().params(), mean=to_numpy(L.moving_mean), var=to_numpy(L.moving_variance),
                    epsilon=L.epsilon)


class _Kernel(LayerKind):
    """A layer with a kernel, an optional bias over its output channels and an activation."""

    has_channel_params = True

    def _bias(self) -> np.ndarray:
        return to_numpy(self.layer.bias) if self.layer.use_bias else np.zeros(self.call.out_width)

    def _kernel_param(self) -> ChannelParam:
        """The kernel as a weight indexed by output channels."""
        return ChannelParam(self.layer.kernel, -1)

    def output_params(self):
        return [self._kernel_param()] + ([ChannelParam(self.layer.bias, 0)] if self.layer.use_bias else [])

    def _kept_bias(self, out_keep: np.ndarray) -> list[np.ndarray]:
        return [self._bias()[out_keep]] if self.layer.use_bias else []

    def const_out(self, in_consts):
        return [_activated(self.layer.activation, super().const_out(in_consts)[0])]

    @property
    def mixes_outputs(self) -> str:
        if mixes_channels(self.layer.activation):
            name = getattr(keras.activations.get(self.layer.activation), "__name__", "")
            return f"the {name} activation of layer {self.layer.name!r} combines them"
        return ""


class Producer(_Kernel):
    """Conv1D/2D/3D (grouped too), Dense: a kernel (..., in, out), a bias (out) and an activation."""

    op = "conv"
    out_axis = -1  # axis of the kernel indexed by output channels
    in_axis = -2

    def channels(self):
        return int(self.layer.filters if hasattr(self.layer, "filters") else self.layer.units)

    def blocks(self):
        return int(getattr(self.layer, "groups", 1) or 1)

    def _kernel(self) -> np.ndarray:
        return to_numpy(self.layer.kernel)

    def _kernel_param(self):
        return ChannelParam(self.layer.kernel, self.out_axis)

    def params(self):
        return dict(kernel=np.moveaxis(self._kernel(), self.out_axis, -1), bias=self._bias())

    def strides(self) -> int:
        return max(tuple(getattr(self.layer, "strides", (1,))))

    def input_params(self):
        g = self.blocks()
        if g == 1:
            return [ChannelParam(self.layer.kernel, self.in_axis)]
        shape = tuple(self.layer.kernel.shape)  # grouped: (..., in / g, out), block j of the rows feeds outputs j
        return [ChannelParam(self.layer.kernel, -3, shape[:-1] + (g, shape[-1] // g), g)]

    def filters(self, value: Callable[[Any], np.ndarray] = to_numpy) -> np.ndarray:
        """The kernel as one row per output channel, its values read by ``value(variable)`` (pruning reads the
        values pruned channels had)."""
        kernel = value(self._kernel_param().variable)
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


class ConvTranspose(Producer):
    op = "conv_transpose"
    out_axis = -2
    in_axis = -1


class SeparableConv(Producer):
    """Depthwise on the input channels, then a pointwise producer."""

    op = "separable_conv"

    def _kernel(self):
        return to_numpy(self.layer.pointwise_kernel)

    def _kernel_param(self):
        return ChannelParam(self.layer.pointwise_kernel, -1)

    def input_params(self):  # the pointwise rows (depth_multiplier of them per input channel)
        shape = tuple(self.layer.pointwise_kernel.shape)
        m = int(self.layer.depth_multiplier)
        return [ChannelParam(self.layer.pointwise_kernel, -3, shape[:-2] + (shape[-2] // m, m, shape[-1]))]

    def weights(self, in_keeps, out_keep, folds):
        L = self.layer
        m = int(L.depth_multiplier)
        new = {
            id(L.depthwise_kernel): ops.take_channels(to_numpy(L.depthwise_kernel), in_keeps[0], -2),
            id(L.pointwise_kernel): ops.take_channels(
                ops.take_channels(self._kernel(), np.repeat(in_keeps[0], m), -2), out_keep, -1),
        }
        if L.use_bias:
            new[id(L.bias)] = self._kept_bias(out_keep)[0]
        return [new.get(id(w), to_numpy(w)) for w in L.weights]  # a QAT twin's quantizer ranges stay


class Depthwise(_Kernel):
    """DepthwiseConv: output channel c*m+k reads only input channel c."""

    op = "depthwise"

    def channels(self):
        return int(self.layer.depth_multiplier)

    def _kernel(self) -> np.ndarray:
        """The kernel as (..., in, multiplier)."""
        return to_numpy(self.layer.kernel)

    def params(self):
        return dict(kernel=self._kernel(), bias=self._bias(), valid_padding=self.layer.padding == "valid")

    def _kernel_param(self):
        k = tuple(self.layer.kernel.shape)
        return ChannelParam(self.layer.kernel, -1, k[:-2] + (k[-2] * k[-1],))  # channel c*m+j: kernel[..., c, j]

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(to_numpy(self.layer.kernel), in_keeps[0], -2)] + self._kept_bias(out_keep)


class GroupedDepthwise(Depthwise):
    """Conv(groups == input channels): a depthwise convolution with a (..., 1, in * multiplier) kernel."""

    def channels(self):
        return int(self.layer.filters) // int(self.layer.groups)

    def _kernel(self):
        k = to_numpy(self.layer.kernel)
        return k.reshape(k.shape[:-2] + (int(self.layer.groups), self.channels()))

    def _kernel_param(self):
        return ChannelParam(self.layer.kernel, -1)

    def config(self, in_keeps, out_keep, folds):
        return {**self.layer.get_config(), "filters": int(out_keep.sum()), "groups": int(in_keeps[0].sum())}

    def weights(self, in_keeps, out_keep, folds):
        return [ops.take_channels(to_numpy(self.layer.kernel), out_keep, -1)] + self._kept_bias(out_keep)


class _ChannelStatistics(LayerKind):
    """A normalization whose statistics are over the channel axis: its inputs are read as a whole, so a removed
    input channel must be a known constant, which the stripped layer (:attr:`partial`, one of
    :mod:`tfcompress.graph.keras_layers`) keeps in its statistics as ``removed_values``."""

    reads_all_channels = True
    partial: type = PartialLayerNormalization

    def rebuilt_class(self):
        return self.partial

    def removed_values(self, in_keeps, folds) -> list[float]:
        """The removed input channels' constants, after those an earlier stripping removed."""
        return list(getattr(self.layer, "removed_values", [])) + [float(v) for v in folds[0][~in_keeps[0]]]

    def config(self, in_keeps, out_keep, folds):
        return {**self.layer.get_config(), "removed_values": self.removed_values(in_keeps, folds)}


class LayerNorm(_ChannelStatistics, Normalization):
    """LayerNormalization over the channel axis: statistics over all channels, then a per-channel affine; an
    output channel whose gamma is zero is the constant beta."""

    op = "layernorm"


class RMSScaled(_ChannelStatistics, Normalization):
    """``x * rsqrt(statistic of the squares over the channels) * scale`` (RMSNormalization, and
    UnitNormalization with no scale): an output channel is 0 where its input or its scale is 0."""

    op = "rms_norm"

    def _scale(self):
        return getattr(self.layer, "scale", None) if isinstance(self.layer, keras.layers.RMSNormalization) else None

    def params(self):
        scale = self._scale()
        return {"gamma": np.ones(self.call.out_width) if scale is None else to_numpy(scale)}

    def output_params(self):
        scale = self._scale()
        return [] if scale is None else [ChannelParam(scale, 0)]

    def rebuilt_class(self):
        if isinstance(self.layer, keras.layers.RMSNormalization):
            return PartialRMSNormalization
        return PartialUnitNormalization


class GroupNorm(LayerNorm):
    """GroupNormalization over the channel axis: statistics per group of channels (and over positions), then
    a per-channel affine. Stripped, groups may hold different numbers of channels
    (:class:`PartialGroupNormalization`)."""

    partial = PartialGroupNormalization

    def _channel_groups(self) -> np.ndarray:
        if isinstance(self.layer, PartialGroupNormalization):
            return np.asarray(self.layer.channel_groups, int)
        return ops.norm_groups(self.call.out_width, int(self.layer.groups))

    def config(self, in_keeps, out_keep, folds):
        member, keep, fold = self._channel_groups(), in_keeps[0], folds[0]
        earlier = getattr(self.layer, "removed_values", None) or [[] for _ in range(member.max() + 1)]
        removed = [list(v) + [float(c) for c in fold[~keep & (member == g)]] for g, v in enumerate(earlier)]
        return {**self.layer.get_config(), "channel_groups": [int(g) for g in member[keep]],
                "removed_values": removed}


def reads_one_sequence(call: LayerCall) -> bool:
    """A recurrent layer's call whose only tensors are its sequence (batch, time, channels) and optionally its
    ``mask`` (batch, time), which ``Embedding(mask_zero=True)`` or ``Masking`` attach: the mask only says which
    time steps count, so the channels are read as without it. An initial state is another tensor: not this."""
    mask = call.node.arguments.kwargs.get("mask")
    return len([t for t in call.node.input_tensors if t is not mask]) == 1 and (
        mask is None or len(mask.shape) == 2)


class Recurrent(LayerKind):
    """LSTM, GRU and SimpleRNN, alone or as a Bidirectional pair: at every time step the input channels are read
    through the rows of a kernel (in, gates x units), so an input channel that is 0 can go with its rows. The
    units feed each other through the recurrent kernel: they are never pruned."""

    op = "recurrent"
    has_channel_params = True

    def _directions(self) -> list:
        L = self.layer
        return [L.forward_layer, L.backward_layer] if isinstance(L, keras.layers.Bidirectional) else [L]

    @property
    def mixes_outputs(self) -> str:
        return f"the units of recurrent layer {self.layer.name!r} feed each other"

    def params(self):
        return width_params(self.call)

    def geometry(self):
        kernels = [to_numpy(d.cell.kernel) for d in self._directions()]
        units = [int(d.cell.units) for d in self._directions()]
        return dict(in_positions=ops.positions(self.call.in_shapes[0]),
                    kernel_columns=sum(k.shape[-1] for k in kernels),
                    recurrent_macs=sum(u * k.shape[-1] for u, k in zip(units, kernels)))

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        for key in ("layer", "backward_layer"):  # a Bidirectional's directions: built again for the new input
            if isinstance(cfg.get(key), dict):
                cfg[key] = {k: v for k, v in cfg[key].items() if k != "build_config"}
        return cfg

    def weights(self, in_keeps, out_keep, folds):
        kernels = {id(d.cell.kernel) for d in self._directions()}
        return [ops.take_channels(to_numpy(w), in_keeps[0], 0) if id(w) in kernels else to_numpy(w)
                for w in self.layer.weights]


_ATTENTION_ARGS = ("query", "value", "key")
_ATTENTION_MASKS = ("query_mask", "value_mask", "key_mask", "attention_mask")


def attention_roles(call: LayerCall) -> list[str] | None:
    """For each input tensor of a MultiHeadAttention call, the argument it is (``"query"``, ``"value"``,
    ``"key"`` or one of the masks); None if the call also returns the attention scores or another tensor is an
    input. Keras flattens the positional arguments first, then the keyword ones by name."""
    args = call.node.arguments
    if len(call.node.output_tensors) != 1:  # the attention scores too: their last axis is not the channels
        return None
    named = list(zip(_ATTENTION_ARGS, args.args)) + sorted(args.kwargs.items())
    roles = [name for name, v in named if isinstance(v, keras.KerasTensor)]
    if len(roles) != len(call.node.input_tensors) or not set(roles) <= set(_ATTENTION_ARGS + _ATTENTION_MASKS):
        return None
    return roles


@dataclasses.dataclass
class Part:
    """An op a layer call is made of before its own op (:meth:`LayerKind.parts`): ``kind`` reads the call's input
    tensors ``inputs`` (indices); with ``width``, it makes a tensor of that many channels inside the call, which
    the call's own op then reads instead of the call's inputs."""

    name: str
    kind: "LayerKind"
    inputs: list[int]
    width: int = 0


class _AttentionCall(LayerKind):
    """What the two ops of a MultiHeadAttention call share: which input is which argument, and the projections
    (EinsumDense kernels (in, heads, dims), biases (heads, dims); the output projection's kernel (heads, dims,
    out))."""

    has_channel_params = True

    def __init__(self, call: LayerCall, op: str | None = None) -> None:
        super().__init__(call, op)
        self.roles = attention_roles(call)
        L = self.layer
        self.heads, self.key_dim = int(L.num_heads), int(L.key_dim)
        self.value_dim = int(L.value_dim or L.key_dim)

    def _readers(self, role: str) -> list:
        """The projections that read the input passed as ``role`` (without a key, the value input is the key)."""
        L = self.layer
        dense = {"query": [L.query_dense], "value": [L.value_dense], "key": [L.key_dense]}.get(role, [])
        return dense + ([L.key_dense] if role == "value" and "key" not in self.roles else [])

    def _projections(self) -> list:
        L = self.layer
        return [L.query_dense, L.key_dense, L.value_dense]


class AttentionHeads(_AttentionCall):
    """The heads of a MultiHeadAttention call, as a producer of one channel per head that reads the query, value
    and key through the rows of their projections. A head is its ``key_dim`` query and key columns, its
    ``value_dim`` value columns and the ``value_dim`` rows of the output projection that read them: pruning
    zeroes all of them (the criterion compares heads by them), and a head whose value columns are zero adds only
    its value bias, which the output projection folds (:func:`tfcompress.graph.ops._head_consts`)."""

    op = "attention_heads"

    def channels(self):
        return self.heads

    def params(self):
        v = self.layer.value_dense
        return dict(value_kernel=to_numpy(v.kernel),
                    value_bias=to_numpy(v.bias) if v.bias is not None else np.zeros((self.heads, self.value_dim)))

    def geometry(self):
        c = self.call
        steps = {role: ops.positions(shape) for role, shape in zip(self.roles, c.in_shapes)}
        reads = [r for r in self.roles if r in _ATTENTION_ARGS]
        return dict(input_positions=[steps[r] for r in reads],
                    head_columns=[sum(int(np.prod(d.kernel.shape[2:])) for d in self._readers(r)) for r in reads],
                    query_positions=steps["query"], key_positions=steps.get("key", steps["value"]),
                    key_dim=self.key_dim, value_dim=self.value_dim)

    def output_params(self):
        params = [ChannelParam(d.kernel, 1) for d in self._projections()]
        params += [ChannelParam(d.bias, 0) for d in self._projections() if d.bias is not None]
        return params + [ChannelParam(self.layer.output_dense.kernel, 0)]

    def output_width(self):
        return self.heads

    def input_params(self):
        """The rows of the projections that read the tensor the op reads first (the query; also the value and
        the key where they are that same tensor)."""
        tensors = self.call.node.input_tensors
        reads = [i for i, r in enumerate(self.roles) if r in _ATTENTION_ARGS]
        same = [self.roles[i] for i in reads if tensors[i] is tensors[reads[0]]]
        kernels = {id(d.kernel): d.kernel for role in same for d in self._readers(role)}
        return [ChannelParam(k, 0) for k in kernels.values()]

    def filters(self, value: Callable[[Any], np.ndarray] = to_numpy) -> np.ndarray:
        """One row per head: its query, key and value columns and its output projection rows."""
        kernels = [np.moveaxis(value(d.kernel), 1, 0) for d in self._projections()]
        kernels.append(value(self.layer.output_dense.kernel))
        return np.concatenate([k.reshape(self.heads, -1) for k in kernels], axis=1)


class Attention(_AttentionCall):
    """MultiHeadAttention over (batch, positions, channels), as two ops: its heads (:class:`AttentionHeads`, a
    part of the call) and its output projection, which reads the heads and writes the output channels like a
    Dense layer's (a residual add joins them to the stream they are added to). Masks are read as positions:
    the channels reaching them are blocked."""

    op = "attention"

    def parts(self) -> list[Part]:
        reads = [i for i, r in enumerate(self.roles) if r in _ATTENTION_ARGS]
        masks = [i for i, r in enumerate(self.roles) if r not in _ATTENTION_ARGS]
        heads = Part("heads", AttentionHeads(self.call), reads, self.heads)
        return [heads] + ([Part("masks", BLOCKER(self.call), masks)] if masks else [])

    def params(self):
        out = self.layer.output_dense
        kernel = to_numpy(out.kernel)
        return dict(kernel=kernel, bias=to_numpy(out.bias) if out.bias is not None else np.zeros(kernel.shape[-1]))

    def geometry(self):
        return dict(positions=ops.positions(self.call.out_shape), value_dim=self.value_dim)

    def output_params(self):
        out = self.layer.output_dense
        return [ChannelParam(out.kernel, -1)] + ([ChannelParam(out.bias, 0)] if out.bias is not None else [])

    def filters(self, value: Callable[[Any], np.ndarray] = to_numpy) -> np.ndarray:
        """The output projection's kernel as one row per output channel."""
        kernel = value(self.layer.output_dense.kernel)
        return np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)

    def config(self, in_keeps, out_keep, folds):
        """``in_keeps``: one per input tensor of the call (by :attr:`roles`), then the heads'."""
        cfg = self.layer.get_config()
        cfg["num_heads"] = int(in_keeps[-1].sum())
        if cfg.get("output_shape") is not None or out_keep.sum() != in_keeps[self.roles.index("query")].sum():
            cfg["output_shape"] = int(out_keep.sum())
        return cfg

    def weights(self, in_keeps, out_keep, folds):
        """The projections without the removed heads and channels; a removed head's constant (its value bias,
        ``folds[-1]`` times) is added to the output bias through the rows that read it."""
        heads = in_keeps[-1]
        rows = {id(d.kernel): keep for role, keep in zip(self.roles, in_keeps) for d in self._readers(role)}
        projections = self._projections()
        kernels = {id(d.kernel) for d in projections}
        biases = {id(d.bias) for d in projections if d.bias is not None}
        out = self.layer.output_dense
        new = []
        for w in self.layer.weights:  # a QAT twin's quantizer ranges (scalars) stay as they are
            value = to_numpy(w)
            if w is out.kernel:
                value = ops.take_channels(ops.take_channels(value, heads, 0), out_keep, -1)
            elif w is out.bias:
                v = self.layer.value_dense
                if v.bias is not None:
                    value = value + np.einsum("h,hd,hdo->o", folds[-1], to_numpy(v.bias), to_numpy(out.kernel))
                value = ops.take_channels(value, out_keep, -1)
            elif id(w) in kernels:  # (in, heads, dims)
                value = ops.take_channels(ops.take_channels(value, rows[id(w)], 0), heads, 1)
            elif id(w) in biases:  # (heads, dims)
                value = ops.take_channels(value, heads, 0)
            new.append(value)
        return new


def attention_inputs(call: LayerCall) -> int:
    """How many of a Keras ``Attention`` call's input tensors are its ``[query, value(, key)]`` list (they come
    first: Keras flattens the positional arguments, then the keyword ones by name, and ``inputs`` sorts before
    ``mask``); 0 if that list is not 2 or 3 tensors of one rank, at least 3 (batch, positions..., channels)."""
    args = call.node.arguments
    listed = args.args[0] if args.args else args.kwargs.get("inputs")
    if not isinstance(listed, (list, tuple)) or len(listed) not in (2, 3):
        return 0
    tensors = call.node.input_tensors
    if not all(isinstance(t, keras.KerasTensor) for t in listed) or list(tensors[:len(listed)]) != list(listed):
        return 0
    ranks = {len(t.shape) for t in listed}
    return len(listed) if len(ranks) == 1 and ranks.pop() >= 3 else 0


class AttentionProduct(LayerKind):
    """Keras's ``Attention`` and ``AdditiveAttention`` on ``[query, value(, key)]`` (the key is the value when it
    is not given): scores sum over the channels of the query and the key together (``q . k``, or
    ``tanh(q + k)`` times a scale), so those are one group, and a channel leaves both only where it adds
    nothing (0 in both: ``0 . 0`` and ``tanh(0 + 0)`` are 0); the output is each query position's weighted sum
    of the value over the key positions, carrying the value's channels one to one. Masks only say which
    positions count; the attention scores output is over positions. ``AdditiveAttention``'s learned scale is a
    vector over the query/key channels: stripping slices it (``Attention``'s scales are scalars)."""

    op = "attention_product"
    has_channel_params = True

    def __init__(self, call: LayerCall) -> None:
        super().__init__(call)
        self.key = 2 if attention_inputs(call) == 3 else 1

    def contraction(self):
        return (0, self.key), 1

    def params(self):
        return {"passed": 1}

    def geometry(self):
        c = self.call
        return dict(positions=ops.positions(c.out_shape), key_positions=ops.positions(c.in_shapes[1]),
                    contracted=[0], dot=self._dot())

    def _dot(self) -> bool:
        """Whether the scores are dot products (``AdditiveAttention`` keeps its base's ``score_mode="dot"``
        attribute but sums ``tanh(q + k)``)."""
        return not isinstance(self.layer, keras.layers.AdditiveAttention) and self.layer.score_mode == "dot"

    def _channel_scale(self) -> Any:
        scale = getattr(self.layer, "scale", None)
        return scale if scale is not None and len(scale.shape) == 1 else None

    def weights(self, in_keeps, out_keep, folds):
        scale = self._channel_scale()
        return [ops.take_channels(to_numpy(w), in_keeps[0], 0) if w is scale else to_numpy(w)
                for w in self.layer.weights]


class Flatten(LayerKind):
    op = "flatten"

    def channels(self):
        return int(math.prod(self.call.in_shapes[0][1:-1]))

    def params(self):
        return {"tile": self.channels()}


class FlatReshape(_TargetShape, Flatten):
    """A ``Reshape`` layer or ``keras.ops.reshape`` to one axis per sample (``Reshape((-1,))``): a Flatten whose
    target shape, unless it says ``-1``, names the kept count."""


class Registered(LayerKind):
    """A layer declared ``"elementwise"`` with :func:`register_layer`."""

    def __init__(self, call: LayerCall) -> None:
        self.declared = registered_rule(call.layer)
        read = self.declared.params
        super().__init__(call, self.declared.op, (lambda c: read(c.layer)) if read is not None else None)
        self.has_channel_params = bool(self.declared.channel_weights)

    def const_out(self, in_consts):
        if self.declared.op is not None:
            return super().const_out(in_consts)
        return [run_on_consts(self.call, in_consts)]

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        resize = self.declared.resize_config
        return resize(cfg, int(out_keep.sum())) if resize is not None else cfg

    def weights(self, in_keeps, out_keep, folds):
        names = self.declared.channel_weights
        attrs = {id(getattr(self.layer, n, None)) for n in names}
        new = []
        for w in self.layer.weights:
            value = to_numpy(w)
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


def run_on_consts(call: LayerCall, in_consts: list[np.ndarray]) -> np.ndarray:
    """The output constants of a position-wise call, found by running the call itself on its inputs' constants
    (a custom layer's semantics are its own). An output channel is unknown where an input channel is."""
    node = call.node
    values = {id(t): _per_channel(c, len(t.shape)) for t, c in zip(node.input_tensors, in_consts)}
    args, kwargs = node.arguments.fill_in(values)
    out = to_numpy(call.layer(*args, **kwargs)).astype(np.float64).reshape(-1)
    if out.size != call.out_width:
        return np.full(call.out_width, np.nan)
    return np.where(np.any([np.isnan(c) for c in in_consts], axis=0), np.nan, out)



class OpPointwise(LayerKind):
    """A ``keras.ops`` function applied position by position (``x + y``, ``3.0 - x``, ``x * scales``,
    ``relu6``, ``gelu``...): its operands are the inputs' per-channel constants and its constant arguments
    (scalars, or arrays over the channels: stripping slices those), in call order; its parameters are its
    config."""

    def params(self):
        return {k: v for k, v in self.layer.get_config().items() if k not in ("name", "dtype")}

    def const_out(self, in_consts):
        node, width = self.call.node, self.call.out_width
        consts = {id(t): c for t, c in zip(node.input_tensors, in_consts)}
        operands = [consts[id(v)] if isinstance(v, keras.KerasTensor) else np.broadcast_to(
                        np.ravel(np.asarray(v, np.float64)), (width,))
                    for v in keras.tree.flatten(node.arguments.args) if is_operand(v)]
        return [ops.const_out(self.op, operands, **self.params())]

    def arguments(self, args, kwargs, out_keep, in_keeps):
        width = self.call.out_width

        def sliced(v):
            if isinstance(v, keras.KerasTensor) or not is_operand(v) or not per_channel(v, width):
                return v
            return ops.take_channels(np.asarray(v), out_keep, -1)
        return keras.tree.map_structure(sliced, args), kwargs


def is_operand(v: Any) -> bool:
    return v is not None and not isinstance(v, str | bool)


def per_channel(v: Any, width: int) -> bool:
    """A constant array with one value per channel (shape ``(width,)``, ``(1, 1, width)``...)."""
    return width > 1 and np.ndim(v) >= 1 and np.shape(v)[-1] == width and np.size(v) == width


class OpReshape(_TargetShape, LayerKind):
    """``keras.ops.reshape`` keeping the channel axis: its target shape follows the kept channel count."""


class TimeDistributed:
    """A ``TimeDistributed`` call: the wrapped layer applied to every time step of a (batch, time, ...) tensor.

    The wrapped layer's own kind, for a call on one step's shapes (batch, ...), answers everything: the channel
    rule, constants, folding, the weights pruning zeroes and the config and weights of the layer rebuilt with
    fewer channels (:attr:`layer` is the wrapped layer, so QAT and compensation read its weights directly).
    The wrapper adds only the time axis: every step costs the wrapped layer's MACs, and the rebuilt layer is
    wrapped again (:meth:`wrap`). Anything else is looked up on :attr:`step`.
    """

    def __init__(self, step: LayerKind, wrapper: keras.layers.Layer, steps: int) -> None:
        self.step = step
        self.wrapper = wrapper
        self.steps = steps

    def __getattr__(self, name: str) -> Any:
        if name == "step":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.step, name)

    def macs(self, in_counts: list[int], out_count: int) -> float:
        return self.steps * self.step.macs(in_counts, out_count)

    def wrap(self, layer: Any, path: str) -> Any:
        layer = self.step.wrap(layer, path)
        if layer is self.wrapper.layer:  # the wrapped layer as it was (it could not be re-created): share both
            return self.wrapper
        cfg = {k: v for k, v in self.wrapper.get_config().items() if k != "layer"}
        if "/" in path:  # a nested model's layer, inlined: a unique name
            cfg["name"] = path.replace("/", "_")
        return keras.layers.TimeDistributed(layer, **cfg)


class ChannelSlice(LayerKind):
    """Outputs that are ranges of consecutive input channels, ``bounds`` (one ``(start, stop)`` per output):
    ``x[..., a:b]``, ``keras.ops.split`` along the channels; a split along another axis gives every output all
    of them. Stripping moves the ranges to the channels kept."""

    op = "slice"

    def __init__(self, call: LayerCall, bounds: list[tuple[int, int]]) -> None:
        super().__init__(call)
        self.bounds = [(int(a), int(b)) for a, b in bounds]

    def params(self):
        return {"bounds": self.bounds}

    def channel_slices(self):
        return tuple(self.bounds)

    def kept_bounds(self, in_keep: np.ndarray) -> list[tuple[int, int]]:
        return ops.kept_bounds(self.bounds, in_keep)


class ItemSlice(ChannelSlice):
    """``x[key]`` whose ``key`` (``expanded``: one entry per axis) takes the channel range ``bounds[0]``."""

    def __init__(self, call: LayerCall, expanded: tuple, bounds: list[tuple[int, int]]) -> None:
        super().__init__(call, bounds)
        self.expanded = expanded

    def arguments(self, args, kwargs, out_keep, in_keeps):
        (a, b), = self.kept_bounds(in_keeps[0])
        return (args[0], (*self.expanded[:-1], slice(a, b))), kwargs


class SplitSlice(ChannelSlice):
    """``keras.ops.split``: along the channels (``along_channels``), its split points move to the kept channels."""

    def __init__(self, call: LayerCall, bounds: list[tuple[int, int]], along_channels: bool) -> None:
        super().__init__(call, bounds)
        self.along_channels = along_channels

    def config(self, in_keeps, out_keep, folds):
        cfg = self.layer.get_config()
        if self.along_channels:
            cfg["indices_or_sections"] = [b for _, b in self.kept_bounds(in_keeps[0])[:-1]]
        return cfg


class ChannelMixing(LayerKind):
    """A ``Softmax`` layer over the channel axis, or an ``Activation`` layer of a softmax: each output channel
    depends on every input channel, so removing one changes the others (the channels reaching it are blocked,
    with this reason)."""

    op = "opaque"

    @property
    def mixes_outputs(self) -> str:
        fn = getattr(self.layer, "activation", None)
        name = getattr(keras.activations.get(fn), "__name__", "") if fn is not None else "softmax"
        return f"the {name} of layer {self.layer.name!r} combines them"
