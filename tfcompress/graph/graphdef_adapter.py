"""Translate a frozen TensorFlow GraphDef into the channel engine's graph, and rewrite it without channels.

This is the SavedModel counterpart of :mod:`tfcompress.graph.keras_adapter`. It only translates: one table,
:data:`KINDS`, maps each TF op type to a classifier that reads the node as a canonical op of
:data:`tfcompress.graph.ops.OPS` (channel rule, constants, folding and MACs are the table's) with its parameters
and the inputs that carry channels, or declines (the node then blocks the channels reaching it). The kinds, and
how each slices its constant inputs when channels go, are in :mod:`tfcompress.graph.graphdef_kinds`.
The graph must be frozen and constant-folded first (:func:`tfcompress.graph.frozen_graph.fold_constants`):
weights are ``Const`` nodes, possibly behind a ``FakeQuantWithMinMaxVars(PerChannel)`` that quantization-aware
training left there.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf

from tfcompress.graph import graphdef_kinds as kinds, ops
from tfcompress.graph.engine import ChannelGraph, Op, Rule
from tfcompress.graph.frozen_graph import (
    node_name as _node, prune_unused, tensor_name as _tensor, topological_order as _topological,
    unfusable_grouped_biases,
)
from tfcompress.graph.graphdef_groupnorm import GroupNorm, find_group_norms
from tfcompress.graph.graphdef_kinds import NodeKind, Rewriter

__all__ = ["GraphDefGraph", "KINDS", "NodeKind", "register"]


# TF unary op -> its canonical activation in :data:`tfcompress.graph.ops.UNARY`
_UNARY = {
    "Identity": "linear", "StopGradient": "linear", "Cast": "linear", "Relu": "relu", "Relu6": "relu6",
    "Elu": "elu", "Selu": "selu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Softplus": "softplus", "Softsign": "softsign", "Neg": "neg", "Abs": "abs", "Square": "square",
    "Exp": "exponential", "Erf": "erf", "Erfc": "erfc", "Sqrt": "sqrt", "Rsqrt": "rsqrt",
    "Reciprocal": "reciprocal", "Log": "log", "Log1p": "log1p", "Expm1": "expm1", "Floor": "floor",
    "Ceil": "ceil", "Round": "round", "Sign": "sign", "Sin": "sin", "Cos": "cos",
}
_POOL = {"MaxPool", "AvgPool", "MaxPoolV2", "MaxPool3D", "AvgPool3D"}
_REDUCE = {"Mean", "Max", "Min", "Sum"}
# TF binary op -> its canonical op in tfcompress.graph.ops.OPS (RealDiv only by a constant: see kinds.ChannelParam)
_BINARY = {"Add": "add", "AddV2": "add", "BiasAdd": "add", "Sub": "sub", "Mul": "mul", "RealDiv": "div",
           "Maximum": "max", "Minimum": "min", "SquaredDifference": "squared_difference",
           "Greater": "greater", "GreaterEqual": "greater_equal", "Less": "less", "LessEqual": "less_equal",
           "Equal": "equal", "NotEqual": "not_equal"}


# --------------------------------------------------------------------------- the graph

class GraphDefGraph:
    """A frozen, constant-folded GraphDef analysed into a :class:`ChannelGraph`.

    Args:
        graph_def: the frozen graph (see :func:`tfcompress.graph.frozen_graph.fold_constants`).
        inputs, outputs: tensor names of the signature's inputs and outputs.
    """

    def __init__(self, graph_def, inputs: list[str], outputs: list[str]) -> None:
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.inputs, self.outputs = list(inputs), list(outputs)
        self._consts: dict[str, np.ndarray] = {}
        g = tf.Graph()
        with g.as_default():
            tf.import_graph_def(graph_def, name="")
        self._shapes, self._unknown_rank = {}, set()
        n_outputs = {}
        for op in g.get_operations():
            n_outputs[op.name] = len(op.outputs)
            for k, t in enumerate(op.outputs):
                try:
                    self._shapes[f"{op.name}:{k}"] = tuple(t.shape.as_list())
                except ValueError:  # unknown rank
                    self._shapes[f"{op.name}:{k}"] = ()
                    self._unknown_rank.add(f"{op.name}:{k}")
        self.order = _topological(graph_def)
        self.readers: dict[str, list] = {}  # node name -> the nodes reading one of its outputs as data
        for n in graph_def.node:
            for i in dict.fromkeys(_node(i) for i in n.input if not i.startswith("^")):
                self.readers.setdefault(i, []).append(n)
        self._refine_reshape_widths()
        self._batch_factors()
        self._group_norms = find_group_norms(self)
        self._inside_group_norms = {n for p in self._group_norms.values() for n in p.inside}
        self.kinds: dict[str, NodeKind] = {}
        self._tid: dict[str, int] = {}
        graph_ops = []
        for name in self.order:
            node = self.nodes[name]
            kind = self._kind(node)
            self.kinds[name] = kind
            ins = [self._tensor_id(i) for i in kind.data_inputs()]
            n_out = max(1, n_outputs.get(name, 0))
            outs = [self._tensor_id(f"{name}:{k}") for k in range(n_out)]
            graph_ops.append(Op(name, kind.rule, ins, outs, channels=kind.channels() if kind.rule in (
                Rule.PRODUCER, Rule.DEPTHWISE, Rule.FLATTEN) else 0, blocks=kind.blocks(),
                has_channel_params=kind.has_channel_params, semantics=kind,
                reads_all_channels=kind.reads_all_channels, slices=kind.channel_slices(),
                contracted=kind.contraction()[0], passed=kind.contraction()[1]))
        widths = {tid: self.width(t) for t, tid in self._tid.items()}
        self.ops = graph_ops
        self.graph = ChannelGraph(graph_ops, [self._tensor_id(o) for o in self.outputs], widths)

    # --- lookups
    def const(self, tensor: str) -> np.ndarray:
        name = _node(tensor)
        if name not in self._consts:
            node = self.nodes[name]
            while node.op == "Identity":
                node = self.nodes[_node(node.input[0])]
            if node.op != "Const":
                raise KeyError(name)
            self._consts[name] = tf.make_ndarray(node.attr["value"].tensor)
        return self._consts[name]

    def is_const(self, tensor: str) -> bool:
        try:
            self.const(tensor)
            return True
        except KeyError:
            return False

    def shape(self, tensor: str) -> tuple:
        return self._shapes.get(_tensor(tensor), ())

    def is_scalar(self, tensor: str) -> bool:
        """Whether ``tensor`` is known to be a scalar (rank 0; :meth:`shape` also gives ``()`` for an unknown
        rank)."""
        t = _tensor(tensor)
        return self._shapes.get(t) == () and t not in self._unknown_rank

    def width(self, tensor: str) -> int:
        s = self.shape(tensor)
        return int(s[-1]) if s and s[-1] is not None else 0

    def positions(self, tensor: str) -> int:
        """Spatial positions per example of ``tensor`` (1 for a vector); a tensor between SpaceToBatchND and
        BatchToSpaceND (a dilated convolution) holds its example's positions in several batch entries."""
        s = self.shape(tensor)
        if _node(tensor) in self._folded:
            return self._folded[_node(tensor)]
        spatial = math.prod(d for d in s[1:-1] if d) if len(s) > 2 else 1
        return int(round(spatial * self._batch_factor.get(_node(tensor), 1.0)))

    def _batch_factors(self) -> None:
        """Per node, what its output's static spatial size must be multiplied by to give the positions per
        example (the block size between SpaceToBatchND and BatchToSpaceND), and the positions of tensors
        whose spatial sizes are not static because a reshape folded them into the batch (tensordot's
        ``[N, H, W, C] -> [N*H*W, C] -> MatMul -> [N, H, W, U]``): those carry their source's positions."""
        self._batch_factor: dict[str, float] = {}
        self._folded: dict[str, int] = {}
        for name in self.order:
            n = self.nodes[name]
            data = [i for i in n.input if not i.startswith("^") and not self.is_const(i)]
            f = self._batch_factor.get(_node(data[0]), 1.0) if data else 1.0
            if n.op in ("SpaceToBatchND", "BatchToSpaceND") and self.is_const(n.input[1]):
                block = float(np.prod(self.const(n.input[1])))
                f = f * block if n.op == "SpaceToBatchND" else f / block
            self._batch_factor[name] = f
            if not data:
                continue
            s, src = self.shape(name), self.shape(data[0])
            if n.op == "Reshape" and self.width(name) and self.width(name) == self.width(data[0]):
                self._folded[name] = self.positions(data[0])
            elif s and len(s) == len(src) and (len(s) == 2 or None in s[1:-1]) and _node(data[0]) in self._folded:
                self._folded[name] = self._folded[_node(data[0])]

    def _refine_reshape_widths(self) -> None:
        """Give a Reshape whose target's last entry is known only at run time its static size, so the channel
        rules see its channel count: ``Shape(x)[i]`` (tensordot) is that axis of ``x``; the ``-1`` of
        ``[Shape(x)[0], -1]`` (tf.keras' Flatten of its own input ``x``) is the product of ``x``'s other axes."""
        for name in self.order:
            node = self.nodes[name]
            shape = self._shapes.get(_tensor(name), ())
            if node.op != "Reshape" or not shape or shape[-1] is not None:
                continue
            entries = _target_entries(self, node.input[1])
            size = None
            if entries and entries[-1] is not None:
                src, axis = entries[-1]
                src_shape = self.shape(src)
                size = src_shape[axis] if axis < len(src_shape) else None
            elif entries and len(entries) == 2 and entries[0] == (_tensor(node.input[0]), 0):
                src_shape = self.shape(node.input[0])
                rest_unknown = kinds.has_constant_last_entry(self, node.input[1]) and kinds.last_entry(
                    self, node.input[1]) == -1
                if rest_unknown and len(src_shape) > 1 and None not in src_shape[1:]:
                    size = math.prod(src_shape[1:])
            if size is not None:
                self._shapes[_tensor(name)] = shape[:-1] + (size,)

    def tensor_id(self, tensor: str) -> int:
        return self._tid[_tensor(tensor)]

    def _tensor_id(self, tensor: str) -> int:
        t = _tensor(tensor)
        if t not in self._tid:
            self._tid[t] = len(self._tid)
        return self._tid[t]

    # --- op -> kind
    def _kind(self, node) -> NodeKind:
        """The node's kind from the :data:`KINDS` table; a node no rule recognises blocks its channels.

        An element-wise kind whose data input is narrower than its output (a broadcast, such as a
        LayerNormalization's per-row scale times its per-channel gamma) creates new channels: it blocks too.
        A traced GroupNormalization is one op, its output node's; its inner nodes read nothing the rules follow.
        """
        if node.name in self._group_norms:
            return GroupNorm(node, self, self._group_norms[node.name])
        if node.name in self._inside_group_norms:
            return NodeKind(node, self, "input", slice(0, 0), width=self.width(node.name))
        classify = KINDS.get(node.op)
        kind = classify(self, node) if classify is not None else None
        if kind is None:
            return kinds.blocker(node, self)
        if kind.rule is Rule.ELEMENTWISE and kind.data_inputs():
            if self.width(kind.data_inputs()[0]) != self.width(node.name):
                return kinds.blocker(node, self)
        return kind

    # --- rewriting
    def rewrite(self, removed: dict[int, np.ndarray], consts: dict[int, np.ndarray]) -> tf.compat.v1.GraphDef:
        """A new GraphDef without the ``removed`` channels (group id -> mask)."""
        rw = Rewriter(self)
        out = tf.compat.v1.GraphDef()
        out.versions.CopyFrom(self.graph_def.versions)
        out.library.CopyFrom(self.graph_def.library)
        edited = {}
        for op in self.ops:
            kind = self.kinds[op.name]
            in_keeps = [self.graph.keep_mask(t, removed) for t in op.inputs]
            out_keep = self.graph.keep_mask(op.outputs[0], removed) if op.outputs else np.ones(0, bool)
            changed = (out_keep.size and not out_keep.all()) or any(not k.all() for k in in_keeps)
            if not changed:
                continue
            folds = [np.where(k, 0.0, np.nan_to_num(consts[t])) for k, t in zip(in_keeps, op.inputs)]
            new = kinds.copy_node(self.nodes[op.name])
            kind.rewrite(new, in_keeps, out_keep, folds, rw)
            edited[op.name] = new
        self._place_biases(rw, edited)
        for n in self.graph_def.node:
            node = edited.get(n.name, n)
            copy = out.node.add()
            copy.CopyFrom(node)
        for n in rw.new_nodes:
            out.node.add().CopyFrom(n)
        if rw.redirect:
            inserted = {n.name for n in rw.new_nodes}
            for n in out.node:
                if n.name in inserted:
                    continue
                n.input[:] = [rw.redirect.get(_tensor(i), i) if not i.startswith("^") else i for i in n.input]
        return unfusable_grouped_biases(prune_unused(out, self.outputs + self.inputs))  # unread inputs stay

    def _place_biases(self, rw: Rewriter, edited: dict) -> None:
        """Add each folded bias to the bias constant that follows its node, or insert one ``BiasAdd``.

        A second ``BiasAdd`` after a convolution's own would be converted by tf2onnx into a Conv with four
        inputs (invalid ONNX), and costs an extra pass over the tensor in any runtime.
        """
        for name, (node, bias) in rw.biases.items():
            reader = self._bias_reader(name)
            if reader is None:
                rw.insert_bias_add(node, bias)
                continue
            new = edited.setdefault(reader.name, kinds.copy_node(reader))
            ci = self.kinds[reader.name].ci
            c = rw.value(new.input[ci])
            summed = c + bias.reshape(c.shape) if c.size == bias.size else c.reshape(()) + bias
            new.input[ci] = rw.const(_node(reader.input[ci]), summed.astype(c.dtype))

    def _bias_reader(self, name: str):
        """The node's only reader if it adds a constant that can absorb a per-channel bias."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or _tensor(name) in {_tensor(o) for o in self.outputs}:
            return None
        reader = readers[0]
        kind = self.kinds.get(reader.name)
        if type(kind) is not kinds.ChannelParam or reader.op not in ("Add", "AddV2", "BiasAdd"):
            return None
        if _tensor(reader.input[kind.xi]) != _tensor(name):
            return None
        scalar = self.const(reader.input[kind.ci]).size == 1 and self.width(name) != 1
        return None if scalar and reader.op == "BiasAdd" else reader


# --------------------------------------------------------------------------- the op table

Classifier = Callable[[GraphDefGraph, tf.compat.v1.NodeDef], "NodeKind | None"]
KINDS: dict[str, Classifier] = {}
"""TF op type -> function returning the node's :class:`NodeKind` (``None``: the node blocks its channels)."""


def register(*op_types: str) -> Callable[[Classifier], Classifier]:
    """Declare the classifier of the TF op types ``op_types`` in :data:`KINDS` (each op type once)."""

    def decorate(fn: Classifier) -> Classifier:
        for op in op_types:
            if op in KINDS:
                raise ValueError(f"TF op {op!r} already has a channel rule ({KINDS[op].__name__})")
            KINDS[op] = fn
        return fn

    return decorate


def _nhwc(node) -> bool:
    """Channels last (NHWC, or NDHWC for the volumetric ops)."""
    return kinds.attr(node, "data_format").s in (b"", b"NHWC", b"NDHWC")


@register("Const", "Placeholder", "PlaceholderWithDefault")
def _input(g: GraphDefGraph, node):
    return NodeKind(node, g, "input", slice(0, 0), width=g.width(node.name))


@register("Shape")
def _shape(g: GraphDefGraph, node):
    return kinds.blocker(node, g, "shape") if _shape_reads_are_safe(g, node) else None


@register(*_UNARY)
def _unary(g: GraphDefGraph, node):
    params = {"negative_slope": kinds.attr(node, "alpha").f} if node.op == "LeakyRelu" else {}
    return NodeKind(node, g, _UNARY[node.op], **params)


@register("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs")
def _fake_quant_tensor(g: GraphDefGraph, node):
    """Per-tensor activation fake-quant: 0 stays 0 (it is on the grid), a constant stays constant."""
    if node.op == "FakeQuantWithMinMaxArgs":
        lo, hi = kinds.attr(node, "min").f, kinds.attr(node, "max").f
    elif g.is_const(node.input[1]) and g.is_const(node.input[2]):
        lo, hi = float(g.const(node.input[1])), float(g.const(node.input[2]))
    else:
        return None
    return NodeKind(node, g, "fake_quant", lo=lo, hi=hi, num_bits=kinds.attr(node, "num_bits").i or 8,
                    narrow_range=kinds.attr(node, "narrow_range").b)


@register(*_POOL)
def _pool(g: GraphDefGraph, node):
    return NodeKind(node, g) if _nhwc(node) else None


@register("ResizeBilinear", "ResizeNearestNeighbor")
def _resize(g: GraphDefGraph, node):
    """Each output pixel is a convex combination of input pixels of the same channel."""
    return NodeKind(node, g)


@register("Pad", "PadV2", "MirrorPad")
def _pad(g: GraphDefGraph, node):
    if not g.is_const(node.input[1]):
        return None
    pads = g.const(node.input[1])
    value_ok = node.op != "PadV2" or (g.is_const(node.input[2]) and float(g.const(node.input[2])) == 0)
    if pads.ndim != 2 or pads[-1].any() or not value_ok:
        return None
    return NodeKind(node, g, "identity" if node.op == "MirrorPad" else "zero_pad")


@register("SpaceToBatchND")
def _space_to_batch(g: GraphDefGraph, node):
    """A dilated convolution's spatial zero padding and split into the batch: a zero padding."""
    return NodeKind(node, g, "zero_pad") if g.is_const(node.input[1]) and g.is_const(node.input[2]) else None


@register("BatchToSpaceND")
def _batch_to_space(g: GraphDefGraph, node):
    return NodeKind(node, g) if g.is_const(node.input[1]) and g.is_const(node.input[2]) else None


@register("Tile")
def _tile(g: GraphDefGraph, node):
    """Tiling of the non-channel axes (UpSampling2D's repeat)."""
    ok = g.is_const(node.input[1]) and int(np.atleast_1d(g.const(node.input[1]))[-1]) == 1
    return NodeKind(node, g) if ok else None


@register("StridedSlice")
def _strided_slice(g: GraphDefGraph, node):
    """A slice with constant bounds: of other axes only (cropping, ``x[:, -1]``), it keeps every channel, however
    many there are; a step-1 range of the channel axis (``x[..., a:b]``) is a channel slice."""
    rank, width = len(g.shape(node.input[0])), g.width(node.input[0])
    if not rank or not all(g.is_const(i) for i in node.input[1:4]):
        return None
    spec = _slice_spec(node, *(np.atleast_1d(g.const(i)) for i in node.input[1:4]), rank)
    if spec is None:
        return None
    if spec[-1] is None:
        return NodeKind(node, g)
    k, entry = spec[-1]
    if not isinstance(entry, slice) or not width:
        return None  # an index that drops the channel axis
    a, b, step = entry.indices(width)
    if step != 1 or b <= a or g.width(node.name) != b - a:
        return None
    return kinds.ChannelRange(node, g, [(a, b)], k)


def _slice_spec(node, begin: np.ndarray, end: np.ndarray, strides: np.ndarray, rank: int) -> list | None:
    """Per input axis of a StridedSlice: None where the ellipsis or the end of the bounds leaves it whole,
    ``(k, slice)`` where entry ``k`` of the bounds slices it, ``(k, index)`` where it picks one index
    (``shrink_axis_mask``); None for new axes or more bounds than axes."""
    mask = {m: kinds.attr(node, f"{m}_mask").i for m in ("begin", "end", "ellipsis", "new_axis", "shrink_axis")}
    if mask["new_axis"] or bin(mask["ellipsis"]).count("1") > 1:
        return None
    out: list = []
    for k in range(begin.size):
        if mask["ellipsis"] >> k & 1:
            out += [None] * (rank - (begin.size - 1 - k) - len(out))
            continue
        if mask["shrink_axis"] >> k & 1:
            out.append((k, int(begin[k])))
            continue
        lo = None if mask["begin"] >> k & 1 else int(begin[k])
        hi = None if mask["end"] >> k & 1 else int(end[k])
        out.append((k, slice(lo, hi, int(strides[k]))))
    if len(out) > rank:
        return None
    out += [None] * (rank - len(out))
    return out


@register("Split", "SplitV")
def _split(g: GraphDefGraph, node):
    """``tf.split``: along the channels, consecutive channel ranges (one per output); along another axis, every
    output carries all the channels."""
    value, axis = (node.input[1], node.input[0]) if node.op == "Split" else (node.input[0], node.input[2])
    rank, width = len(g.shape(value)), g.width(value)
    n = kinds.attr(node, "num_split").i
    widths = [g.width(f"{node.name}:{k}") for k in range(n)]
    if not rank or not width or not g.is_const(axis) or not all(widths):
        return None
    data = slice(1, 2) if node.op == "Split" else slice(0, 1)
    if int(g.const(axis)) % rank != rank - 1:
        return kinds.ChannelRange(node, g, [(0, width)] * n, None, data, along_channels=False)
    edges = np.cumsum([0] + widths).tolist()
    return kinds.ChannelRange(node, g, list(zip(edges, edges[1:])), None, data) if edges[-1] == width else None


@register("Transpose")
def _transpose(g: GraphDefGraph, node):
    """A permutation of the other axes (Keras' ``Permute`` of them, TimeDistributed's swap of the batch and
    time axes): the channel axis stays last, each channel whole. A swap of the last two axes that only products
    of two tensors read (``k^T`` in ``q @ k^T``) is looked through by them (:func:`_matmul_operand`): it
    carries no channels of its own."""
    rank = len(g.shape(node.input[0]) or ())
    if not rank or not g.is_const(node.input[1]):
        return None
    if _looked_through(g, node):
        return NodeKind(node, g, "shape", slice(0, 0), width=g.width(node.name))
    perm = np.atleast_1d(g.const(node.input[1]))
    return NodeKind(node, g) if perm.size == rank and int(perm[-1]) % rank == rank - 1 else None


_BATCH_MATMULS = ("BatchMatMulV2", "BatchMatMulV3")


def _weights(g: GraphDefGraph, tensor: str) -> "kinds.Weights | None":
    try:
        return kinds.Weights(g, tensor)
    except KeyError:
        return None


def _swaps_last_two(g: GraphDefGraph, node) -> bool:
    rank = len(g.shape(node.input[0]) or ())
    if node.op != "Transpose" or rank < 2 or not g.is_const(node.input[1]):
        return False
    return np.array_equal(np.atleast_1d(g.const(node.input[1])), [*range(rank - 2), rank - 1, rank - 2])


def _product_of_tensors(g: GraphDefGraph, node) -> bool:
    """A batched matmul of two tensors (no weights among its operands)."""
    return node.op in _BATCH_MATMULS and all(_weights(g, i) is None for i in node.input[:2])


def _looked_through(g: GraphDefGraph, node) -> bool:
    """A Transpose of the last two axes read only by products of two tensors, and no signature output."""
    readers = g.readers.get(node.name, [])
    outputs = {_tensor(o) for o in g.outputs}
    return (_swaps_last_two(g, node) and bool(readers) and _tensor(node.name) not in outputs
            and all(_product_of_tensors(g, r) for r in readers))


def _matmul_operand(g: GraphDefGraph, tensor: str, adjoint: bool) -> tuple[str, bool]:
    """The tensor a matmul operand comes from and whether the matmul reads it with its last two axes swapped
    (the adjoint flag, or a looked-through Transpose of them)."""
    node = g.nodes.get(_node(tensor))
    if node is not None and _looked_through(g, node):
        return node.input[0], not adjoint
    return tensor, adjoint


def _contraction(g: GraphDefGraph, node) -> "kinds.Contraction | None":
    """``a @ b`` of two tensors: ``a``'s last axis (after its adjoint) is summed against ``b``'s second last and
    the output's last axis is ``b``'s last. An operand's channel axis is summed when ``a`` is not swapped, or
    ``b`` is; where both are, their channels are summed together; ``b``'s unswapped channels pass; any other
    channel axis ends up on another axis or is summed against positions (which cannot lose entries): blocked."""
    if not all(g.shape(i) for i in node.input[:2]):
        return None
    (a, swap_a), (b, swap_b) = (_matmul_operand(g, node.input[k], kinds.attr(node, f"adj_{x}").b)
                                for k, x in ((0, "x"), (1, "y")))
    contracted = (0, 1) if not swap_a and swap_b else ()
    # b's axis that is not its channels (its positions, e.g. attention's keys) is the summed one or the output's
    # columns; its static size, else the positions a tensordot's reshape left unknown to shape inference
    rows = g.shape(b)[-2]
    rows = rows if rows is not None else g.positions(b)
    inner = rows if not swap_b else g.shape(b)[-1] or 0
    columns = rows if swap_b else g.shape(b)[-1] or 0
    return kinds.Contraction(node, g, [a, b], contracted, None if swap_b else 1, inner, columns)


@register("Pack")
def _pack(g: GraphDefGraph, node):
    """Tensors stacked along a new axis before the channel axis (TimeDistributed's time steps): like a
    concatenation along a spatial axis, the inputs' channels line up."""
    rank = len(g.shape(node.name))
    axis = kinds.attr(node, "axis").i
    if rank < 2 or axis % rank == rank - 1:
        return None
    return NodeKind(node, g, "stack_spatial", slice(None))


def _is_identity_transpose(g: GraphDefGraph, node) -> bool:
    return (node.op == "Transpose" and g.is_const(node.input[1])
            and np.array_equal(g.const(node.input[1]), np.arange(len(g.shape(node.input[0]) or ()))))


@register(*_REDUCE)
def _reduce(g: GraphDefGraph, node):
    if not g.is_const(node.input[1]):
        return None
    axes = np.atleast_1d(g.const(node.input[1]))
    in_rank = len(g.shape(node.input[0]))
    if not in_rank:
        return None
    if not any(int(a) % in_rank == in_rank - 1 for a in axes):
        return NodeKind(node, g, "sum_positions" if node.op == "Sum" else "identity")
    if node.op in ("Sum", "Mean") and tf.as_dtype(node.attr["T"].type).is_floating:
        return kinds.ChannelStatistic(node, g, *_centered_square(g, node))
    return None  # a max or min over channels changes when a channel goes


def _centered_square(g: GraphDefGraph, node) -> tuple[str, str | None]:
    """For a channel Mean (keeping dims) of ``(x - m)^2`` with ``m`` the channel Mean of ``x`` (tf.nn.moments'
    variance): ``(x, m)``; for any other channel reduction: ``(its input, None)``. Copies (Identity,
    StopGradient) anywhere in the pattern are looked through, on the mean's side and on ``x``'s alike."""
    src = g.nodes.get(_node(_copied(g, node.input[0])))
    pair = []
    if node.op == "Mean" and kinds.attr(node, "keep_dims").b and src is not None:
        if src.op == "SquaredDifference":
            pair = src.input[:2]
        elif src.op == "Square":
            sub = g.nodes.get(_node(_copied(g, src.input[0])))
            pair = sub.input[:2] if sub is not None and sub.op == "Sub" else []
    for x, m in (pair, pair[::-1]) if pair else ():
        mean = g.nodes.get(_node(_copied(g, m)))
        if (mean is not None and mean.op == "Mean" and kinds.attr(mean, "keep_dims").b
                and _copied(g, mean.input[0]) == _copied(g, x) and _same_axes(g, mean, node)):
            return x, mean.name
    return node.input[0], None


_COPIES = ("Identity", "StopGradient", "Snapshot")


def _copied(g: GraphDefGraph, t: str) -> str:
    """The tensor that ``t`` is a copy of (through Identity / StopGradient / Snapshot nodes), as ``node:k``."""
    node = g.nodes.get(_node(t))
    while node is not None and node.op in _COPIES:
        t = node.input[0]
        node = g.nodes.get(_node(t))
    return _tensor(t)


def _same_axes(g: GraphDefGraph, a, b) -> bool:
    """Whether two reductions of tensors of the same rank reduce the same axes."""
    rank = len(g.shape(a.input[0]))
    if not (rank and g.is_const(a.input[1]) and g.is_const(b.input[1])):
        return False
    return {int(i) % rank for i in np.atleast_1d(g.const(a.input[1]))} == {
        int(i) % rank for i in np.atleast_1d(g.const(b.input[1]))}


@register("Squeeze", "ExpandDims", "Reshape")
def _reshape(g: GraphDefGraph, node):
    src, dst = g.shape(node.input[0]), g.shape(node.name)
    # in row-major order the last axis stays innermost: when its size is kept, channel j stays channel j
    # whatever happens to the other axes (tensordot's [N, H, W, C] -> [N*H*W, C] and back included)
    if not src or not dst or src[-1] is None or dst[-1] != src[-1]:
        flat = ops.flatten_tile(src, dst) if node.op == "Reshape" else 0
        return kinds.Flatten(node, g, flat) if flat and kinds.has_constant_last_entry(g, node.input[1]) else None
    if node.op != "Reshape" or _self_adjusting_reshape(g, node):
        return NodeKind(node, g)  # adjusts its target itself
    return kinds.Reshape(node, g) if kinds.has_constant_last_entry(g, node.input[1]) else None


@register("Conv2D", "MatMul", "BatchMatMulV2", "BatchMatMulV3", "DepthwiseConv2dNative", "Conv2DBackpropInput",
          "Conv3D", "Conv3DBackpropInputV2")
def _producer(g: GraphDefGraph, node):
    op = node.op
    if op in _BATCH_MATMULS and _product_of_tensors(g, node):
        return _contraction(g, node)
    try:
        w = kinds.Weights(g, node.input[1])
    except KeyError:
        return None
    if op == "MatMul":
        return None if kinds.attr(node, "transpose_a").b else kinds.Producer(node, g, w, "dense")
    if op.startswith("BatchMatMul"):  # Keras < 3.15 writes a Dense on [N, ..., C] as x @ kernel, one 2-D kernel
        adjoint = kinds.attr(node, "adj_x").b or kinds.attr(node, "adj_y").b
        return None if adjoint or w.value.ndim != 2 else kinds.Producer(node, g, w, "dense")
    if not _nhwc(node) or kinds.attr(node, "padding").s == b"EXPLICIT":
        return None
    depthwise_groups = op == "Conv2D" and w.value.shape[-2] == 1 and g.width(node.input[0]) > 1
    if op == "DepthwiseConv2dNative" or (depthwise_groups and w.value.shape[-1] % g.width(node.input[0]) == 0):
        return kinds.Depthwise(node, g, w)
    if op == "Conv3D" and w.value.shape[-2] != g.width(node.input[0]):
        return None  # grouped: TensorFlow runs no grouped Conv3D on CPU
    if op in ("Conv2DBackpropInput", "Conv3DBackpropInputV2"):
        ok = kinds.has_constant_last_entry(g, node.input[0])
        return kinds.TransposedConv(node, g, w, "conv_transpose", slice(2, 3)) if ok else None
    return kinds.Producer(node, g, w, "conv")


@register("FusedBatchNormV3")
def _fused_batch_norm(g: GraphDefGraph, node):
    ok = _nhwc(node) and not kinds.attr(node, "is_training").b and all(g.is_const(i) for i in node.input[1:5])
    return kinds.FusedBatchNorm(node, g, "batchnorm") if ok else None


@register(*_BINARY)
def _binary(g: GraphDefGraph, node):
    a, b = node.input[0], node.input[1]
    ca, cb = g.is_const(a), g.is_const(b)
    if ca and cb:
        return None
    if ca or cb:
        ci = 0 if ca else 1
        c = g.const(node.input[ci])
        width = g.width(node.name)
        per_channel = c.ndim >= 1 and c.shape[-1] == width and c.size == width
        if per_channel and width > 1 and g.width(node.input[1 - ci]) == 1:
            return kinds.ChannelSource(node, g, ci, _BINARY[node.op])
        if c.size == 1 or per_channel:
            return kinds.ChannelParam(node, g, ci, _BINARY[node.op] if node.op != "RealDiv" or ci else "opaque")
        return _spatial_param(g, node, ci) if c.ndim == len(g.shape(node.name)) and c.shape[-1] == 1 else None
    sa, sb = g.shape(a), g.shape(b)
    if sa and sb and sa[-1] != sb[-1] and 1 in (sa[-1], sb[-1]):
        return _spatial_param(g, node, 0 if sa[-1] == 1 else 1)  # a channel-free tensor broadcast over channels
    if node.op in ("RealDiv", "BiasAdd"):
        return None
    if not sa or not sb or sa[-1] != sb[-1] or len(sa) != len(sb):
        return None
    return NodeKind(node, g, _BINARY[node.op], slice(0, 2))


@register("SelectV2", "Select")
def _select(g: GraphDefGraph, node):
    """``where(condition, x, y)`` of tensors of one shape and scalar constants; the condition may also be free
    of channels (its last axis 1, broadcast over the channels: a masked ``GlobalAveragePooling1D``'s
    ``where(mask, x, 0)``; or a scalar, a boolean switch fed as an input), which then carries none."""
    names = list(node.input[:3])
    free = _channel_free_condition(g, node)
    tensors = [n for n in names[1 if free else 0:] if not g.is_const(n)]
    shapes = {g.shape(n) for n in tensors}
    if not tensors or len(shapes) != 1 or not next(iter(shapes)) or any(
            g.const(n).size != 1 for n in names if g.is_const(n)):
        return None
    return kinds.Select(node, g, condition_channels=not free)


def _channel_free_condition(g: GraphDefGraph, node) -> bool:
    """Whether a select's condition is a tensor of one channel (or a scalar) broadcast over its operands' several
    channels."""
    cond, width = node.input[0], g.width(node.name)
    shape = g.shape(cond)
    if g.is_const(cond) or width <= 1:
        return False
    return g.is_scalar(cond) or (bool(shape) and shape[-1] == 1 and len(shape) == len(g.shape(node.name)))


@register("ConcatV2")
def _concat(g: GraphDefGraph, node):
    if not g.is_const(node.input[-1]):
        return None
    rank = len(g.shape(node.name))
    axis = int(g.const(node.input[-1]))
    return NodeKind(node, g, "concat" if axis % rank == rank - 1 else "stack_spatial", slice(0, -1))


def _spatial_param(g: GraphDefGraph, node, ci: int) -> NodeKind:
    """x op c with c the same for every channel but varying over other axes (a LayerNormalization's statistics, a
    constant scaling each position): a zero channel stays zero through a product, nothing stays constant."""
    keeps_zero = node.op == "Mul" or (node.op == "RealDiv" and ci == 1)
    return NodeKind(node, g, "scale_positions" if keeps_zero else "opaque", slice(1 - ci, 2 - ci))


# --------------------------------------------------------------------------- shapes read at run time

def _shape_reads_are_safe(g: GraphDefGraph, node) -> bool:
    """Whether the readers of ``Shape(x)`` stay right when channels of ``x`` are removed: they use only batch
    and spatial sizes, or pass the channel count on, unchanged, into the target of a reshape whose channels
    are those of ``x`` (UpSampling2D's repeat: ``reshape(tile(x), concat(shape(x)[:1], [2 * h], shape(x)[2:]))``).
    """
    rank = len(g.shape(node.input[0]))
    readers = g.readers.get(node.name, [])
    if not rank or not readers:
        return False
    for r in readers:
        idx = _shape_entries(g, r, rank) if _node(r.input[0]) == node.name else None
        if idx is None:
            return False
        if rank - 1 in idx and not _feeds_self_adjusting_reshapes(g, r, _tensor(node.input[0])):
            return False
    return True


def _shape_entries(g: GraphDefGraph, node, rank: int) -> list[int] | None:
    """The entries of a length-``rank`` shape vector that a constant StridedSlice or GatherV2 of it selects."""
    if node.op == "GatherV2":
        if not (g.is_const(node.input[1]) and g.is_const(node.input[2]) and int(g.const(node.input[2])) == 0):
            return None
        return [int(i) % rank for i in np.atleast_1d(g.const(node.input[1]))]
    if node.op != "StridedSlice" or not all(g.is_const(i) for i in node.input[1:4]):
        return None
    if kinds.attr(node, "ellipsis_mask").i or kinds.attr(node, "new_axis_mask").i:
        return None
    b, e, st = (int(np.atleast_1d(g.const(i))[0]) for i in node.input[1:4])
    if kinds.attr(node, "shrink_axis_mask").i & 1:
        return [b % rank]
    begin = None if kinds.attr(node, "begin_mask").i & 1 else b
    end = None if kinds.attr(node, "end_mask").i & 1 else e
    return list(range(rank))[slice(begin, end, st)]


def _feeds_self_adjusting_reshapes(g: GraphDefGraph, node, source: str) -> bool:
    """Whether ``node``'s value (holding ``source``'s channel count) only builds targets of reshapes that take
    their channel count from ``source`` (through Pack / ConcatV2 / Identity, never arithmetic)."""
    for r in g.readers.get(node.name, []):
        if r.op == "Prod" and len(_target_entries(g, node.name) or ()) != 1:
            return False  # a product of the channel count with other sizes
        if r.op in ("Pack", "ConcatV2", "Identity", "Prod"):
            if (r.op == "ConcatV2" and _node(r.input[-1]) == node.name) or not _feeds_self_adjusting_reshapes(
                g, r, source
            ):
                return False
        elif r.op != "Reshape" or _node(r.input[1]) != node.name or _self_adjusting_reshape(g, r) != source:
            return False
    return True


def _self_adjusting_reshape(g: GraphDefGraph, node) -> str | None:
    """For a Reshape whose target's last entry is, at run time, ``Shape(x)[-1]`` of a tensor ``x`` carrying the
    same channels as its input (and no other entry is a channel count): ``x``. Such a reshape needs no edit."""
    entries = _target_entries(g, node.input[1])
    if not entries or entries[-1] is None:
        return None
    counts = [e for e in entries if e is not None and e[1] == len(g.shape(e[0])) - 1]
    source = entries[-1][0]
    if counts != [entries[-1]] or not _carries_same_channels(g, source, node.input[0]):
        return None
    return source


def _target_entries(g: GraphDefGraph, tensor: str) -> list | None:
    """Per entry of an int shape vector: ``(x, i)`` if it is ``Shape(x)[i]``, else None; None if not traceable."""
    node = g.nodes.get(_node(tensor))
    if node is None:
        return None
    if node.op == "Const":
        return [None] * np.atleast_1d(g.const(node.name)).size
    if node.op == "Identity":
        return _target_entries(g, node.input[0])
    if node.op in ("ConcatV2", "Pack"):
        parts = node.input[:-1] if node.op == "ConcatV2" else node.input
        expanded = [_target_entries(g, i) for i in parts]
        if node.op == "Pack":  # scalars: an untraceable one is a size computed otherwise (e.g. 2 * height)
            return [e[0] if e is not None and len(e) == 1 else None for e in expanded]
        return None if any(e is None for e in expanded) else [x for e in expanded for x in e]
    if node.op == "Prod":  # tensordot's sizes: the product of one entry is that entry
        entries = _target_entries(g, node.input[0])
        return entries if entries is not None and len(entries) == 1 else None
    src = g.nodes.get(_node(node.input[0])) if node.op in ("StridedSlice", "GatherV2") else None
    if src is None or src.op != "Shape":
        return None
    idx = _shape_entries(g, node, len(g.shape(src.input[0])))
    return None if idx is None else [(_tensor(src.input[0]), i) for i in idx]


def _carries_same_channels(g: GraphDefGraph, source: str, tensor: str) -> bool:
    """Whether ``tensor`` is ``source`` behind only shape-changing ops that keep the channel axis."""
    while _tensor(tensor) != _tensor(source):
        node = g.nodes.get(_node(tensor))
        if node is None or node.op not in ("ExpandDims", "Squeeze", "Tile", "Identity", "Reshape", "Transpose"):
            return False
        if node.op == "Transpose" and not _is_identity_transpose(g, node):
            return False
        if g.width(node.input[0]) != g.width(tensor):
            return False
        tensor = node.input[0]
    return True
