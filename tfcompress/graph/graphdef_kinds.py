"""What one node of a frozen GraphDef is to the channel engine, and how it is rewritten with fewer channels.

A :class:`NodeKind` is a node read as a canonical op of :data:`tfcompress.graph.ops.OPS` (channel rule,
constants, folding and MACs are the table's) with its parameters and the inputs that carry channels. The
subclasses add only how to slice the op's constant inputs (weights, BN vectors, reshape targets) when channels
are removed, through a :class:`Rewriter`. Which kind a node gets is decided by
:mod:`tfcompress.graph.graphdef_adapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from tfcompress.graph import ops
from tfcompress.graph.engine import Rule
from tfcompress.graph.frozen_graph import (
    FAKE_QUANT_OPS as _FAKE_QUANT, const_node as _const_node, node_name as _node, tensor_name as _tensor,
)
from tfcompress.graph.kernels import slice_kernel

if TYPE_CHECKING:
    from tfcompress.graph.graphdef_adapter import GraphDefGraph

def attr(node, key: str):
    """A node attribute without inserting it (``node.attr[key]`` on a missing key adds an empty, invalid one)."""
    return node.attr[key] if key in node.attr else _EMPTY_ATTR


_EMPTY_ATTR = tf.compat.v1.AttrValue()
def copy_node(node: tf.compat.v1.NodeDef) -> tf.compat.v1.NodeDef:
    new = tf.compat.v1.NodeDef()
    new.CopyFrom(node)
    return new


class Rewriter:
    """Collects the edits of a strip: new constants, replaced nodes, inserted nodes."""

    def __init__(self, graph: "GraphDefGraph") -> None:
        self.graph = graph
        self.new_nodes: list[tf.compat.v1.NodeDef] = []
        self.redirect: dict[str, str] = {}  # tensor name -> replacement tensor name (for inserted nodes)
        self.values: dict[str, np.ndarray] = {}  # value of each new constant
        self.biases: dict[str, tuple[tf.compat.v1.NodeDef, np.ndarray]] = {}  # node -> bias folded into it

    def const(self, base: str, value: np.ndarray) -> str:
        name = f"{base}/tfcompress_sliced"
        k = 0
        while name in self.graph.nodes or name in self.values:
            k += 1
            name = f"{base}/tfcompress_sliced_{k}"
        self.new_nodes.append(_const_node(name, value))
        self.values[name] = np.asarray(value)
        return name

    def value(self, tensor: str) -> np.ndarray:
        """The value of a new or an original constant."""
        return self.values[_node(tensor)] if _node(tensor) in self.values else self.graph.const(tensor)

    def add_bias(self, node: tf.compat.v1.NodeDef, bias: np.ndarray) -> None:
        """Add ``bias`` (per output channel) to ``node``'s output; placed by :meth:`GraphDefGraph.rewrite`."""
        self.biases[node.name] = (node, bias)

    def insert_bias_add(self, node: tf.compat.v1.NodeDef, bias: np.ndarray) -> None:
        """Insert ``BiasAdd(node, bias)`` and make every reader of ``node`` read it instead."""
        dtype = node.attr["T"].type
        c = self.const(node.name + "/tfcompress_folded_bias", bias.astype(tf.as_dtype(dtype).as_numpy_dtype))
        b = tf.compat.v1.NodeDef(name=node.name + "/tfcompress_folded", op="BiasAdd", input=[node.name, c])
        b.attr["T"].type = dtype
        b.attr["data_format"].s = b"NHWC"
        self.new_nodes.append(b)
        self.redirect[_tensor(node.name)] = b.name


class NodeKind(ops.TableOp):
    """A TF node as the engine sees it: its canonical op in :data:`tfcompress.graph.ops.OPS` with the
    parameters read from the node, and which of its inputs carry channels. Subclasses add how to rewrite
    the node for fewer channels (and read parameters that need more than an attribute)."""

    has_channel_params = False
    reads_all_channels = False
    weighted = True  # a producer with weights of its own (a layer of the strip report), not a channel source

    def __init__(self, node, graph: "GraphDefGraph", op: str = "identity", inputs: slice = slice(0, 1),
                 **params) -> None:
        self.node = node
        self.g = graph
        self.op = op
        self._inputs = inputs
        self._params = params

    @property
    def rule(self) -> Rule:
        return ops.rule(self.op, len(self.data_inputs()))

    @property
    def label(self) -> str:
        """How messages name the node: its TF op type and name."""
        return f"{self.node.op} {self.node.name!r}"

    def fold_note(self) -> str:
        """Why a constant input cannot be folded into this op's bias ('' when it can or nothing specific)."""
        return ""

    def params(self) -> dict:
        """The parameters of its canonical op."""
        return self._params

    def geometry(self) -> dict:
        """The node's shape as the table's MAC and folding rules read it (:class:`ops.OpSemantics`)."""
        data = self.data_inputs()
        w = getattr(self, "w", None)
        return dict(positions=self.g.positions(self.node.name), groups=self.blocks(),
                    in_positions=self.g.positions(data[0]) if data else 1,
                    window=int(np.prod(w.value.shape[:-2])) if w is not None and w.value.ndim >= 4 else 1,
                    valid_padding=attr(self.node, "padding").s == b"VALID")

    def channels(self) -> int:
        return self.g.width(self.node.name)

    def blocks(self) -> int:
        return 1

    def data_inputs(self) -> list[str]:
        """The inputs that carry channels (tensors), as opposed to parameters."""
        return [i for i in self.node.input if not i.startswith("^")][self._inputs]

    def rewrite(self, new, in_keeps, out_keep, folds, rw: Rewriter) -> None:
        """Edit ``new`` (a copy of the node) for the kept channels."""


def blocker(node, g: "GraphDefGraph", op: str = "blocker") -> NodeKind:
    """A node whose channels are never removed (every data input is read as a whole)."""
    return NodeKind(node, g, op, slice(None), width=g.width(node.name))


class Reshape(NodeKind):
    """A reshape keeping the channel axis; its target shape's last entry is rewritten."""

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        new.input[1] = _with_last_entry(self.g, self.node.input[1], int(out_keep.sum()), rw)


class Flatten(Reshape):
    """A reshape of ``[N, d1, ..., dk, C]`` to ``[N, d1 * ... * dk * C]`` (Keras' ``Flatten``): in row-major order
    the channels repeat ``d1 * ... * dk`` times along the new last axis, so the channel map is tiled that often."""

    def __init__(self, node, graph: "GraphDefGraph", tile: int) -> None:
        super().__init__(node, graph, "flatten", tile=tile)

    def channels(self) -> int:
        return self._params["tile"]


class ChannelRange(NodeKind):
    """Outputs that are ranges of consecutive input channels (``bounds``, one ``(start, stop)`` per output): a
    StridedSlice whose bounds entry ``entry`` is the channel axis, or a Split / SplitV. Stripping moves the
    bounds (a Split becomes a SplitV, since its parts may no longer be equal)."""

    def __init__(self, node, graph: "GraphDefGraph", bounds: list[tuple[int, int]], entry: int | None,
                 inputs: slice = slice(0, 1), along_channels: bool = True) -> None:
        super().__init__(node, graph, "slice", inputs, bounds=[(int(a), int(b)) for a, b in bounds])
        self.entry = entry
        self.along_channels = along_channels

    def channel_slices(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._params["bounds"])

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        bounds = ops.kept_bounds(self._params["bounds"], in_keeps[0])
        if not self.along_channels:
            return
        if new.op == "StridedSlice":
            (a, b), = bounds
            for i, v in ((1, a), (2, b)):
                vec = rw.value(new.input[i]).copy()
                vec[self.entry] = v
                new.input[i] = rw.const(_node(self.node.input[i]), vec)
        else:
            value, axis = (new.input[1], new.input[0]) if new.op == "Split" else (new.input[0], new.input[2])
            sizes = rw.const(self.node.name + "/size_splits", np.array([b - a for a, b in bounds], np.int32))
            new.op = "SplitV"
            new.input[:] = [value, sizes, axis] + [i for i in new.input if i.startswith("^")]
            new.attr["Tlen"].type = tf.int32.as_datatype_enum


def has_constant_last_entry(graph: "GraphDefGraph", shape_tensor: str) -> bool:
    """A shape operand whose channel entry :func:`_with_last_entry` can rewrite: a Const, ``Pack(..., C)`` or
    ``ConcatV2(..., [..., C])`` (tensordot's output shape)."""
    src = graph.nodes.get(_node(shape_tensor))
    if src is None or src.op not in ("Const", "Pack", "ConcatV2"):
        return False
    return src.op == "Const" or graph.is_const(_last_part(src))


def last_entry(graph: "GraphDefGraph", shape_tensor: str) -> int:
    """The last entry of a shape operand accepted by :func:`has_constant_last_entry`."""
    src = graph.nodes[_node(shape_tensor)]
    value = graph.const(src.name if src.op == "Const" else _last_part(src))
    return int(np.asarray(value).reshape(-1)[-1])


def _last_part(shape_node) -> str:
    """The operand of a ``Pack`` / ``ConcatV2`` shape vector that holds its last entry."""
    return shape_node.input[-1] if shape_node.op == "Pack" else shape_node.input[-2]


def _with_last_entry(graph: "GraphDefGraph", shape_tensor: str, n: int, rw: "Rewriter") -> str:
    """A tensor equal to the shape operand ``shape_tensor`` with its last entry (the channel count) set to ``n``."""
    src = graph.nodes[_node(shape_tensor)]
    if src.op == "Const":
        shape = graph.const(src.name).copy()
        shape[-1] = n
        return rw.const(src.name, shape)
    last = _last_part(src)  # Pack(batch, d1, ..., C) or ConcatV2(..., [..., C]): replace the constant part
    value = np.array(graph.const(last))
    value.reshape(-1)[-1] = n  # a packed scalar, or the last entry of a concatenated vector
    packed = tf.compat.v1.NodeDef()
    packed.CopyFrom(src)
    packed.name = src.name + "/tfcompress"
    packed.input[-1 if src.op == "Pack" else -2] = rw.const(_node(last), value)
    rw.new_nodes.append(packed)
    return packed.name


class ChannelParam(NodeKind):
    """x op c with c a constant per channel (BiasAdd, BN's Mul/Add, Relu6-as-Minimum ...)."""

    has_channel_params = True

    def __init__(self, node, graph, const_index: int, op: str) -> None:
        super().__init__(node, graph, op)
        self.ci = const_index
        self.xi = 1 - const_index

    def data_inputs(self):
        return [self.node.input[self.xi]]

    def _c(self) -> np.ndarray:
        c = self.g.const(self.node.input[self.ci]).astype(np.float64)
        return c.reshape(-1) if c.size > 1 else c.reshape(())

    def const_out(self, in_consts):
        v = in_consts[0]
        c = np.broadcast_to(self._c(), v.shape).astype(np.float64)
        return [ops.const_out(self.op, [v, c] if self.ci == 1 else [c, v])]

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        name = self.node.input[self.ci]
        c = self.g.const(name)
        if c.size > 1:
            new.input[self.ci] = rw.const(_node(name), ops.take_channels(c, out_keep, -1))


class Select(NodeKind):
    """``SelectV2`` / ``Select``: ``where(condition, x, y)``, the operands tensors of one shape (joined position
    by position) or scalar constants. A condition without channels (``condition_channels`` False: one channel
    broadcast over the others) carries none and is unknown per channel."""

    def __init__(self, node, graph, condition_channels: bool = True) -> None:
        super().__init__(node, graph, "where")
        self.first = 0 if condition_channels else 1

    def data_inputs(self):
        return [n for n in self.node.input[self.first:3] if not self.g.is_const(n)]

    def const_out(self, in_consts):
        width, tensors = len(in_consts[0]), iter(in_consts)
        operands = [np.full(width, np.nan)] * self.first + [
            np.full(width, float(self.g.const(n).reshape(()))) if self.g.is_const(n) else next(tensors)
            for n in self.node.input[self.first:3]]
        return [ops.const_out("where", operands)]


class ChannelSource(ChannelParam):
    """``r op c`` with ``r`` free of channels (its last axis 1, e.g. a LayerNormalization's ``rsqrt(var)``) and
    ``c`` a constant per channel (gamma): the output's channels are ``c``'s, created here as a producer creates
    its filters; removing one slices ``c``."""

    weighted = False

    @property
    def rule(self) -> Rule:
        return Rule.PRODUCER

    def data_inputs(self):
        """None: the channel-free operand carries no channels."""
        return []

    def const_out(self, in_consts):
        # the channel-free operand is not a known constant: the binary op's own rule gives each channel
        return super().const_out([np.full(self._c().shape, np.nan)])


class Contraction(NodeKind):
    """A product of two tensors summed over one axis (``BatchMatMulV2`` of two activations, attention's
    ``q @ k^T`` and ``weights @ v``), each operand read as ``source`` with its last two axes swapped or not.

    ``contracted``: the operands whose channel axes are the summed axis (both or none: a channel axis summed
    against positions cannot lose entries, the positions stay). ``passed``: the operand whose channel axis is the
    output's (its channels pass one to one) or None. ``inner`` and ``columns``: the sizes of the summed axis and
    of the output's last axis (for the MACs, where they are not channels). The op has no parameters: nothing to
    slice when channels go.
    """

    def __init__(self, node, graph, sources: list[str], contracted: tuple[int, ...], passed: int | None,
                 inner: float, columns: float) -> None:
        super().__init__(node, graph, "matmul", slice(None), passed=passed, width=graph.width(node.name))
        self.sources, self._contraction = sources, (contracted, passed)
        self.inner, self.columns = inner, columns

    def data_inputs(self):
        return list(self.sources)

    def contraction(self):
        return self._contraction

    def geometry(self):
        return dict(positions=self.g.positions(self.node.name), contracted=list(self._contraction[0]),
                    inner=self.inner, columns=self.columns, passed=self._contraction[1])


class ChannelStatistic(NodeKind):
    """A Sum or Mean over the channel axis (a normalization's statistics): its output has no channels to remove.

    A zeroed channel of its input may leave: it adds nothing to a sum, and a mean keeps the original count (the kept
    channels' mean times kept / original). ``variance_of``: for ``Mean((x - Mean(x))^2)``, the mean node of
    ``x``: each removed channel of ``x`` held 0, so its term was ``Mean(x)^2``; it is added back.
    """

    reads_all_channels = True

    def __init__(self, node, graph, x: str, variance_of: str | None = None) -> None:
        super().__init__(node, graph, "channel_statistic", width=graph.width(node.name))
        self.x, self.variance_of = x, variance_of

    def data_inputs(self):
        return [self.x]

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        if self.node.op == "Sum":
            return
        keep = in_keeps[0]
        kept, total = int(keep.sum()), keep.size
        # the edited node gets a new name and the corrected value takes its old one, for every reader
        new.name = self.node.name + "/tfcompress_kept"
        dtype = tf.as_dtype(self.node.attr["T"].type).as_numpy_dtype
        scaled = _binary_node(self.node.name if self.variance_of is None else new.name + "/scaled", "Mul",
                              new.name, rw.const(new.name + "/kept_fraction", np.asarray(kept / total, dtype)),
                              self.node)
        rw.new_nodes.append(scaled)
        if self.variance_of is None:
            return
        square = _binary_node(new.name + "/mean_squared", "Mul", self.variance_of, self.variance_of, self.node)
        removed = _binary_node(new.name + "/removed_terms", "Mul", square.name,
                               rw.const(new.name + "/removed_fraction", np.asarray((total - kept) / total, dtype)),
                               self.node)
        rw.new_nodes += [square, removed, _binary_node(self.node.name, "AddV2", scaled.name, removed.name, self.node)]


def _binary_node(name: str, op: str, a: str, b: str, like) -> tf.compat.v1.NodeDef:
    """A new binary node with ``like``'s dtype."""
    n = tf.compat.v1.NodeDef(name=name, op=op, input=[a, b])
    n.attr["T"].type = like.attr["T"].type
    return n


class FusedBatchNorm(NodeKind):
    has_channel_params = True

    def params(self):
        gamma, beta, mean, var = [self.g.const(i).astype(np.float64) for i in self.node.input[1:5]]
        return dict(gamma=gamma, beta=beta, mean=mean, var=var, epsilon=attr(self.node, "epsilon").f)

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        for k in range(1, 5):
            name = self.node.input[k]
            new.input[k] = rw.const(_node(name), ops.take_channels(self.g.const(name), out_keep, 0))


class Weights:
    """A producer's weight input: a Const, or a FakeQuant of a Const (from quantization-aware training) behind
    ops that only lay its values out for the consumer: a Reshape or ExpandDims (QAT depthwise kernels:
    per-channel FakeQuant works on the last axis only, so the (h, w, c, m) kernel is quantized as
    (h, w, 1, c * m) and reshaped back; a QAT Conv1D's (k, in, out) kernel is expanded to the (1, k, in, out) of
    the Conv2D that runs it), a Transpose (a QAT transposed convolution quantizes its kernel per output channel,
    then moves that axis where the op reads it) or a Cast (a mixed-precision model quantizes in float32 and
    casts the result to float16)."""

    _LAYOUT_OPS = ("Reshape", "ExpandDims", "Transpose", "Cast")

    def __init__(self, graph: "GraphDefGraph", tensor: str) -> None:
        self.g = graph
        node = self._skip_identity(graph.nodes[_node(tensor)])
        self.after: list = []  # the layout ops after the FakeQuant, the one next to it first
        while node.op in self._LAYOUT_OPS:
            if node.op != "Cast" and graph.nodes[_node(node.input[1])].op != "Const":
                raise KeyError(tensor)
            self.after.insert(0, node)
            node = self._skip_identity(graph.nodes[_node(node.input[0])])
        if self.after and node.op not in _FAKE_QUANT:
            raise KeyError(tensor)
        self.fq = node if node.op in _FAKE_QUANT else None
        self.const_name = _node(self.fq.input[0]) if self.fq is not None else node.name
        if graph.nodes[self.const_name].op != "Const":
            raise KeyError(tensor)

    def _skip_identity(self, node):
        while node.op == "Identity":
            node = self.g.nodes[_node(node.input[0])]
        return node

    def _arg(self, node) -> np.ndarray:
        return self.g.const(_node(node.input[1]))

    def _forward(self, node, v: np.ndarray) -> np.ndarray:
        if node.op == "ExpandDims":
            return np.expand_dims(v, int(self._arg(node)))
        if node.op == "Reshape":
            return v.reshape(self._arg(node))
        if node.op == "Transpose":
            return np.transpose(v, self._arg(node))
        return v  # Cast: the values, in another dtype

    def _backward(self, node, v: np.ndarray, before: tuple) -> np.ndarray:
        """``v`` (after ``node``) as it was before it; ``before``: the original shape before it."""
        if node.op == "ExpandDims":
            return np.squeeze(v, int(self._arg(node)))
        if node.op == "Reshape":  # the channel axis of the flattened kernel is its last one
            if len(before) == 2:  # (window x inputs, outputs) of a per-channel FakeQuant: both may shrink
                return v.reshape(-1, v.shape[-1])
            return v.reshape(tuple(before[:-1]) + (-1,))
        if node.op == "Transpose":
            return np.transpose(v, np.argsort(self._arg(node)))
        return v

    @property
    def value(self) -> np.ndarray:
        v = self.g.const(self.const_name)
        for node in self.after:
            v = self._forward(node, v)
        return v

    def ranges_axis(self) -> int | None:
        """The axis of :attr:`value` along which a per-channel FakeQuant's ranges run (None without one, or
        when a Reshape merges that axis with others or moves it)."""
        if self.fq is None or self.fq.op != "FakeQuantWithMinMaxVarsPerChannel":
            return None
        shape = self.g.const(self.const_name).shape
        axis = len(shape) - 1
        for node in self.after:
            out = self._forward(node, np.empty(shape, np.float32)).shape
            if node.op == "Reshape":  # one that only splits the other axes keeps the ranges' (last) axis whole
                if axis != len(shape) - 1 or out[-1] != shape[-1]:
                    return None
                axis = len(out) - 1
            elif node.op == "ExpandDims":
                axis += int(self._arg(node)) % len(out) <= axis
            elif node.op == "Transpose":
                axis = list(self._arg(node)).index(axis)
            shape = out
        return axis

    def _layouts(self, value: np.ndarray) -> list[np.ndarray]:
        """``value`` (the op's layout) before each layout op and after the last: the first is what the Const
        before the FakeQuant holds."""
        before = [self.g.const(self.const_name).shape]
        for node in self.after[:-1]:
            before.append(self._forward(node, np.empty(before[-1], np.float32)).shape)
        values = [value]
        for node, shape in zip(reversed(self.after), reversed(before)):
            values.insert(0, self._backward(node, values[0], shape))
        return values

    def _stored(self, value: np.ndarray) -> np.ndarray:
        """``value`` (the op's layout) as the Const before the FakeQuant holds it."""
        return self._layouts(value)[0]

    def replace(self, new_value: np.ndarray, out_keep: np.ndarray | None, rw: Rewriter) -> str:
        """Name of a tensor with ``new_value`` (re-quantized and laid out the same way); ``out_keep`` slices the
        per-channel ranges of the FakeQuant (its last axis, before the layout ops)."""
        layouts = self._layouts(new_value)
        c = rw.const(self.const_name, layouts[0])
        if self.fq is None:
            return c
        fq = tf.compat.v1.NodeDef()
        fq.CopyFrom(self.fq)
        fq.name = self.fq.name + "/tfcompress"
        fq.input[0] = c
        if self.fq.op == "FakeQuantWithMinMaxVarsPerChannel" and out_keep is not None:
            for k in (1, 2):
                rng = self.g.const(self.fq.input[k])
                if rng.size == out_keep.size:
                    fq.input[k] = rw.const(_node(self.fq.input[k]), rng[out_keep])
        rw.new_nodes.append(fq)
        name = fq.name
        for node, after in zip(self.after, layouts[1:]):
            layout = tf.compat.v1.NodeDef()
            layout.CopyFrom(node)
            layout.name = node.name + "/tfcompress"
            layout.input[0] = name
            if node.op == "Reshape":  # the new shape; the other layout ops keep their arguments
                target = self._arg(node)
                layout.input[1] = rw.const(_node(node.input[1]), np.asarray(after.shape, target.dtype))
            rw.new_nodes.append(layout)
            name = layout.name
        return name


class Producer(NodeKind):
    """Conv2D (HWIO filter, grouped when its in-dim is smaller than the input's), Conv3D (DHWIO) and MatMul."""

    has_channel_params = True

    def __init__(self, node, graph, weights: Weights, op: str, inputs: slice = slice(0, 1)) -> None:
        super().__init__(node, graph, op, inputs)
        self.w = weights
        self.transpose_b = node.op == "MatMul" and attr(node, "transpose_b").b

    def _kernel(self) -> np.ndarray:
        """The weights as (..., in, out)."""
        return self._stored(self.w.value)

    def _stored(self, k: np.ndarray) -> np.ndarray:
        """Between the (..., in, out) layout and the op's own (an involution)."""
        return k.T if self.transpose_b else k

    def channels(self):
        return int(self._kernel().shape[-1])

    def blocks(self):
        if self.node.op != "Conv2D":
            return 1
        return max(1, self.g.width(self.node.input[0]) // int(self._kernel().shape[-2]))

    def params(self):
        return dict(kernel=self._kernel(), bias=0.0)  # its bias is a BiasAdd

    def fold_note(self):
        if self.can_fold(0):
            return ""
        k = self._kernel()
        size = "x".join(str(d) for d in k.shape[:-2])
        return (f" (a {attr(self.node, 'padding').s.decode()}-padded {size} convolution: "
                "its zero padding makes a constant input contribute differently at the borders)")

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        k, add = ops.shrink_producer(self._kernel(), np.zeros(self.channels()), in_keeps[0], out_keep, folds[0],
                                     self.blocks())
        new.input[1] = self.w.replace(self._stored(k), out_keep, rw)
        if np.any(add != 0):
            rw.add_bias(new, add)


class TransposedConv(Producer):
    """Conv2DBackpropInput / Conv3DBackpropInputV2 (Conv2DTranspose / Conv3DTranspose): filter (..., out, in),
    input 0 the output shape, input 2 the data.

    A constant input does not give a constant output (strided windows overlap unevenly at the borders), so
    nothing is folded into its bias.
    """

    def _stored(self, k):
        return np.swapaxes(k, -1, -2)

    def blocks(self):
        return 1

    def fold_note(self):
        return " (a transposed convolution: its windows overlap unevenly, so a constant input is not constant out)"

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        k = slice_kernel(self._kernel(), in_keeps[0], out_keep)
        stored = self._stored(k)  # (..., out, in): QAT quantizes per output channel, behind a Transpose
        per_output = self.w.ranges_axis() in (stored.ndim - 2, -2)
        new.input[1] = self.w.replace(stored, out_keep if per_output else in_keeps[0], rw)
        new.input[0] = _with_last_entry(self.g, self.node.input[0], int(out_keep.sum()), rw)


class Depthwise(NodeKind):
    """DepthwiseConv2dNative, or a Conv2D whose every group reads one input channel (Keras's
    ``Conv2D(groups=channels)``, as in ConvNeXt): its (h, w, 1, c * m) filter is the depthwise (h, w, c, m) one."""

    has_channel_params = True

    def __init__(self, node, graph, weights: Weights) -> None:
        super().__init__(node, graph, "depthwise")
        self.w = weights

    def _kernel(self) -> np.ndarray:
        """(h, w, c, multiplier): output channel c * multiplier + j."""
        k = self.w.value
        return k if self.node.op != "Conv2D" else k.reshape(k.shape[:2] + (self.g.width(self.node.input[0]), -1))

    def channels(self):
        return int(self._kernel().shape[-1])

    def params(self):
        return dict(kernel=self._kernel(), bias=0.0, valid_padding=attr(self.node, "padding").s == b"VALID")

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        k = ops.take_channels(self._kernel(), in_keeps[0], -2)
        stored = k if self.node.op != "Conv2D" else k.reshape(k.shape[:2] + (1, -1))
        new.input[1] = self.w.replace(stored, np.repeat(in_keeps[0], k.shape[-1]), rw)
