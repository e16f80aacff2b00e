"""Translate a frozen TensorFlow GraphDef into the channel engine's graph, and rewrite it without channels.

This is the SavedModel counterpart of :mod:`tfcompress.graph.keras_adapter`: each TF op type is mapped to a
channel :class:`~tfcompress.graph.engine.Rule` by a :class:`NodeKind`, which also knows how constant channels
flow through the op and how to slice the op's constant inputs (weights, BN vectors, reshape targets).
The graph must be frozen and constant-folded first (:func:`fold_constants`): weights are ``Const`` nodes,
possibly behind a ``FakeQuantWithMinMaxVars(PerChannel)`` that quantization-aware training left there.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import tensorflow as tf

from tfcompress.graph.engine import ChannelGraph, Op, Rule, elementwise_consts
from tfcompress.graph.kernels import depthwise_consts, fold_into_bias, producer_consts, slice_kernel

__all__ = ["GraphDefGraph", "fold_constants", "NodeKind"]

_FAKE_QUANT = {"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs"}
_STATEFUL_OR_INPUT = {"Placeholder", "PlaceholderWithDefault", "VarHandleOp", "ReadVariableOp", "NoOp"}


def _attr(node, key: str):
    """A node attribute without inserting it (``node.attr[key]`` on a missing key adds an empty, invalid one)."""
    return node.attr[key] if key in node.attr else _EMPTY_ATTR


_EMPTY_ATTR = tf.compat.v1.AttrValue()


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _softplus(v):
    return np.logaddexp(0.0, v)


_UNARY: dict[str, Callable[[np.ndarray, object], np.ndarray]] = {
    "Identity": lambda v, n: v,
    "StopGradient": lambda v, n: v,
    "Relu": lambda v, n: np.maximum(v, 0),
    "Relu6": lambda v, n: np.clip(v, 0, 6),
    "Elu": lambda v, n: np.where(v > 0, v, np.expm1(v)),
    "Selu": lambda v, n: 1.0507009873554805 * np.where(v > 0, v, 1.6732632423543772 * np.expm1(v)),
    "LeakyRelu": lambda v, n: np.where(v >= 0, v, _attr(n, "alpha").f * v),
    "Sigmoid": lambda v, n: _sigmoid(v),
    "Tanh": lambda v, n: np.tanh(v),
    "Softplus": lambda v, n: _softplus(v),
    "Softsign": lambda v, n: v / (1 + np.abs(v)),
    "Neg": lambda v, n: -v,
    "Abs": lambda v, n: np.abs(v),
    "Square": lambda v, n: v * v,
    "Exp": lambda v, n: np.exp(v),
    "Erf": lambda v, n: np.vectorize(math.erf)(v),
    "Cast": lambda v, n: v,
}
_POOL = {"MaxPool", "AvgPool", "MaxPoolV2"}
_REDUCE = {"Mean", "Max", "Min", "Sum"}
_BINARY = {"Add", "AddV2", "Sub", "Mul", "RealDiv", "Maximum", "Minimum", "BiasAdd"}


def _fake_quant(v: np.ndarray, lo, hi, num_bits: int, narrow: bool) -> np.ndarray:
    """numpy FakeQuantWithMinMaxVars (TF's nudged grid)."""
    qmin, qmax = (1 if narrow else 0), 2 ** num_bits - 1
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    nlo, nhi = (qmin - zp) * scale, (qmax - zp) * scale
    q = np.round((np.clip(v, nlo, nhi) - nlo) / scale)
    return q * scale + nlo


# --------------------------------------------------------------------------- constant folding

def fold_constants(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Evaluate every subgraph that does not depend on an input into a ``Const``; drop unused nodes.

    FakeQuant ops are kept (grappler's constant folding would bake weight quantization into float
    constants, and OpenVINO then runs those layers in float): only their inputs are folded.
    ``IdentityN`` (how custom gradients such as swish's appear) becomes one ``Identity`` per output.
    """
    graph_def = _split_identity_n(graph_def)
    nodes = {n.name: n for n in graph_def.node}
    order = _topological(graph_def)
    foldable: set[str] = set()
    for name in order:
        n = nodes[name]
        if n.op == "Const":
            foldable.add(name)
        elif n.op not in _STATEFUL_OR_INPUT and n.op not in _FAKE_QUANT and not n.op.startswith("Stateful"):
            data = [i for i in n.input if not i.startswith("^")]
            if data and all(_node(i) in foldable for i in data):
                foldable.add(name)
    # evaluate the foldable nodes that something non-foldable (or an output) reads
    needed: dict[str, None] = {}
    for n in graph_def.node:
        if n.name in foldable:
            continue
        for i in n.input:
            if not i.startswith("^") and _node(i) in foldable and nodes[_node(i)].op != "Const":
                needed[_tensor(i)] = None
    for o in outputs:
        if _node(o) in foldable and nodes[_node(o)].op != "Const":
            needed[_tensor(o)] = None
    values = {}
    if needed:
        g = tf.Graph()
        with g.as_default():
            tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            results = sess.run(list(needed))
        values = dict(zip(needed, results))
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    renamed: dict[str, str] = {}
    for t, v in values.items():
        name = _node(t) if t.endswith(":0") else _node(t) + "/output_" + t.split(":")[1]
        renamed[t] = name
    for n in graph_def.node:
        if n.name in foldable and n.op != "Const" and _tensor(n.name) not in values:
            continue
        if n.name in foldable and n.op != "Const":
            new = out.node.add()
            new.CopyFrom(_const_node(renamed[_tensor(n.name)], values[_tensor(n.name)]))
            continue
        new = out.node.add()
        new.CopyFrom(n)
        new.input[:] = [
            renamed.get(_tensor(i), i) if not i.startswith("^") else i
            for i in n.input if not (i.startswith("^") and i[1:] in foldable)
        ]
    for t, name in renamed.items():
        if not t.endswith(":0"):
            out.node.add().CopyFrom(_const_node(name, values[t]))
    return prune_unused(out, outputs)


def _split_identity_n(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    out = tf.compat.v1.GraphDef()
    out.CopyFrom(graph_def)
    rename: dict[str, str] = {}
    new_nodes = []
    for n in out.node:
        if n.op != "IdentityN":
            continue
        data = [i for i in n.input if not i.startswith("^")]
        ctrl = [i for i in n.input if i.startswith("^")]
        dtypes = list(n.attr["T"].list.type)
        for k, src in enumerate(data):
            name = n.name if k == 0 else f"{n.name}/tfcompress_out_{k}"
            ident = tf.compat.v1.NodeDef(name=name, op="Identity", input=[src] + ctrl)
            ident.attr["T"].type = dtypes[k]
            new_nodes.append(ident)
            rename[f"{n.name}:{k}"] = name
    if not new_nodes:
        return graph_def
    kept = [n for n in out.node if n.op != "IdentityN"]
    del out.node[:]
    out.node.extend(kept + new_nodes)
    for n in out.node:
        n.input[:] = [rename.get(i, rename.get(i + ":0", i) if ":" not in i else i)
                      if not i.startswith("^") else i for i in n.input]
    return out


def prune_unused(graph_def: tf.compat.v1.GraphDef, outputs: list[str]) -> tf.compat.v1.GraphDef:
    """Keep only the nodes the outputs depend on."""
    nodes = {n.name: n for n in graph_def.node}
    keep, stack = set(), [_node(o) for o in outputs]
    while stack:
        name = stack.pop()
        if name in keep or name not in nodes:
            continue
        keep.add(name)
        stack.extend(_node(i.lstrip("^")) for i in nodes[name].input)
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for n in graph_def.node:
        if n.name in keep:
            out.node.add().CopyFrom(n)
    return out


def _const_node(name: str, value: np.ndarray) -> tf.compat.v1.NodeDef:
    value = np.asarray(value)
    n = tf.compat.v1.NodeDef(name=name, op="Const")
    n.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    n.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
    return n


def _node(t: str) -> str:
    return t.lstrip("^").split(":")[0]


def _tensor(t: str) -> str:
    return t if ":" in t else t + ":0"


def _topological(graph_def) -> list[str]:
    nodes = {n.name: n for n in graph_def.node}
    indeg = {n.name: 0 for n in graph_def.node}
    users: dict[str, list[str]] = {n.name: [] for n in graph_def.node}
    for n in graph_def.node:
        for i in n.input:
            src = _node(i)
            if src in nodes:
                indeg[n.name] += 1
                users[src].append(n.name)
    ready = [n.name for n in graph_def.node if indeg[n.name] == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for u in users[name]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle (control flow): only feed-forward graphs can be stripped")
    return order


# --------------------------------------------------------------------------- per-op semantics

class Rewriter:
    """Collects the edits of a strip: new constants, replaced nodes, inserted nodes."""

    def __init__(self, graph: "GraphDefGraph") -> None:
        self.graph = graph
        self.new_nodes: list[tf.compat.v1.NodeDef] = []
        self.redirect: dict[str, str] = {}  # tensor name -> replacement tensor name (for inserted nodes)

    def const(self, base: str, value: np.ndarray) -> str:
        name = f"{base}/tfcompress_sliced"
        k = 0
        while name in self.graph.nodes or any(n.name == name for n in self.new_nodes):
            k += 1
            name = f"{base}/tfcompress_sliced_{k}"
        self.new_nodes.append(_const_node(name, value))
        return name

    def add_bias(self, node: tf.compat.v1.NodeDef, bias: np.ndarray) -> None:
        """Insert ``BiasAdd(node, bias)`` and make every reader of ``node`` read it instead."""
        dtype = node.attr["T"].type
        c = self.const(node.name + "/tfcompress_folded_bias", bias.astype(tf.as_dtype(dtype).as_numpy_dtype))
        b = tf.compat.v1.NodeDef(name=node.name + "/tfcompress_folded", op="BiasAdd", input=[node.name, c])
        b.attr["T"].type = dtype
        b.attr["data_format"].s = b"NHWC"
        self.new_nodes.append(b)
        self.redirect[_tensor(node.name)] = b.name


class NodeKind:
    """A TF op as the engine sees it. Subclasses override what differs from a pass-through."""

    rule = Rule.ELEMENTWISE
    has_channel_params = False

    def __init__(self, node, graph: "GraphDefGraph") -> None:
        self.node = node
        self.g = graph

    # engine protocol
    def const_out(self, in_consts: list[np.ndarray]) -> list[np.ndarray]:
        return [in_consts[0]]

    def can_fold(self, input_index: int) -> bool:
        return False

    def channels(self) -> int:
        return self.g.width(self.node.name)

    def blocks(self) -> int:
        return 1

    def data_inputs(self) -> list[str]:
        """The inputs that carry channels (tensors), as opposed to parameters."""
        return [i for i in self.node.input if not i.startswith("^")][:1]

    def macs(self, in_counts: list[int], out_count: int) -> float:
        return 0.0

    def rewrite(self, new, in_keeps, out_keep, folds, rw: Rewriter) -> None:
        """Edit ``new`` (a copy of the node) for the kept channels."""


class _Const(NodeKind):
    rule = Rule.INPUT

    def data_inputs(self):
        return []

    def const_out(self, in_consts):
        return [np.full(self.g.width(self.node.name), np.nan)]


class _Blocker(NodeKind):
    rule = Rule.BLOCKER

    def data_inputs(self):
        return [i for i in self.node.input if not i.startswith("^")]

    def const_out(self, in_consts):
        return [np.full(self.g.width(self.node.name), np.nan)]


class _Shape(_Blocker):
    rule = Rule.SHAPE


class _Unary(NodeKind):
    def const_out(self, in_consts):
        fn = _UNARY[self.node.op]
        return [elementwise_consts(lambda v: fn(v, self.node), in_consts[0])]


class _FakeQuantTensor(NodeKind):
    """Per-tensor activation fake-quant: 0 stays 0 (it is on the grid), a constant stays constant."""

    def const_out(self, in_consts):
        n = self.node
        if n.op == "FakeQuantWithMinMaxArgs":
            lo, hi = _attr(n, "min").f, _attr(n, "max").f
        else:
            lo, hi = float(self.g.const(n.input[1])), float(self.g.const(n.input[2]))
        fq = lambda v: _fake_quant(v, lo, hi, _attr(n, "num_bits").i or 8, _attr(n, "narrow_range").b)  # noqa: E731
        return [elementwise_consts(fq, in_consts[0])]


class _Pool(NodeKind):
    pass


class _Pad(NodeKind):
    def const_out(self, in_consts):
        c = in_consts[0].copy()
        if self.node.op != "MirrorPad":
            c[c != 0] = np.nan
        return [c]


class _Reduce(NodeKind):
    def const_out(self, in_consts):
        c = in_consts[0].copy()
        if self.node.op == "Sum":
            c[c != 0] = np.nan
        return [c]


class _Reshape(NodeKind):
    """A reshape keeping the channel axis; its target shape's last entry is rewritten."""

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        shape_src = self.g.nodes[_node(self.node.input[1])]
        n = int(out_keep.sum())
        if shape_src.op == "Const":
            shape = self.g.const(shape_src.name).copy()
            shape[-1] = n
            new.input[1] = rw.const(shape_src.name, shape)
        else:  # Pack(batch, d1, ..., C): replace the last packed constant
            last = shape_src.input[-1]
            packed = tf.compat.v1.NodeDef()
            packed.CopyFrom(shape_src)
            packed.name = shape_src.name + "/tfcompress"
            packed.input[-1] = rw.const(_node(last), np.asarray(n, dtype=self.g.const(last).dtype))
            rw.new_nodes.append(packed)
            new.input[1] = packed.name


class _ChannelParam(NodeKind):
    """x op c with c a constant per channel (BiasAdd, BN's Mul/Add, Relu6-as-Minimum ...)."""

    has_channel_params = True

    def __init__(self, node, graph, const_index: int) -> None:
        super().__init__(node, graph)
        self.ci = const_index
        self.xi = 1 - const_index

    def data_inputs(self):
        return [self.node.input[self.xi]]

    def _c(self) -> np.ndarray:
        c = self.g.const(self.node.input[self.ci]).astype(np.float64)
        return c.reshape(-1) if c.size > 1 else c.reshape(())

    def const_out(self, in_consts):
        v, c, op = in_consts[0], self._c(), self.node.op
        if c.ndim:
            c = np.broadcast_to(c, v.shape)
        if op in ("Add", "AddV2", "BiasAdd"):
            return [v + c]
        if op == "Sub":
            return [v - c if self.ci == 1 else c - v]
        if op == "Mul":
            out = v * c
            out[np.broadcast_to(c == 0, v.shape)] = 0.0
            return [out]
        if op == "RealDiv":
            return [v / c if self.ci == 1 else np.full(v.shape, np.nan)]
        if op == "Maximum":
            return [np.maximum(v, c)]
        return [np.minimum(v, c)]

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        name = self.node.input[self.ci]
        c = self.g.const(name)
        if c.size > 1:
            new.input[self.ci] = rw.const(_node(name), np.take(c, np.nonzero(out_keep)[0], axis=-1))


class _FusedBatchNorm(NodeKind):
    has_channel_params = True

    def _vectors(self):
        return [self.g.const(i).astype(np.float64) for i in self.node.input[1:5]]

    def const_out(self, in_consts):
        gamma, beta, mean, var = self._vectors()
        eps = _attr(self.node, "epsilon").f
        out = gamma * (in_consts[0] - mean) / np.sqrt(var + eps) + beta
        return [np.where(gamma == 0, beta, out)]

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        for k in range(1, 5):
            name = self.node.input[k]
            new.input[k] = rw.const(_node(name), self.g.const(name)[out_keep])


class _Weights:
    """A producer's weight input: a Const, a FakeQuant of a Const (from quantization-aware training), or a
    Reshape of such a FakeQuant (QAT depthwise kernels: per-channel FakeQuant works on the last axis only, so
    the (h, w, c, m) kernel is quantized as (h, w, 1, c * m) and reshaped back)."""

    def __init__(self, graph: "GraphDefGraph", tensor: str) -> None:
        self.g = graph
        node = self._skip_identity(graph.nodes[_node(tensor)])
        self.reshape = None
        if node.op == "Reshape":
            inner = self._skip_identity(graph.nodes[_node(node.input[0])])
            if inner.op not in _FAKE_QUANT or graph.nodes[_node(node.input[1])].op != "Const":
                raise KeyError(tensor)
            self.reshape, node = node, inner
        self.fq = node if node.op in _FAKE_QUANT else None
        self.const_name = _node(self.fq.input[0]) if self.fq is not None else node.name
        if graph.nodes[self.const_name].op != "Const":
            raise KeyError(tensor)

    def _skip_identity(self, node):
        while node.op == "Identity":
            node = self.g.nodes[_node(node.input[0])]
        return node

    @property
    def value(self) -> np.ndarray:
        v = self.g.const(self.const_name)
        return v if self.reshape is None else v.reshape(self.g.const(_node(self.reshape.input[1])))

    def replace(self, new_value: np.ndarray, out_keep: np.ndarray | None, rw: Rewriter) -> str:
        """Name of a tensor with ``new_value`` (re-quantized the same way); ``out_keep`` slices the per-channel
        ranges of the FakeQuant (its last axis, before any Reshape)."""
        stored = self.g.const(self.const_name).shape
        c = rw.const(self.const_name, new_value if self.reshape is None else new_value.reshape(stored[:-1] + (-1,)))
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
        if self.reshape is None:
            return fq.name
        shape = self.g.const(_node(self.reshape.input[1]))
        reshape = tf.compat.v1.NodeDef()
        reshape.CopyFrom(self.reshape)
        reshape.name = self.reshape.name + "/tfcompress"
        reshape.input[0] = fq.name
        reshape.input[1] = rw.const(_node(self.reshape.input[1]), np.asarray(new_value.shape, shape.dtype))
        rw.new_nodes.append(reshape)
        return reshape.name


class _Producer(NodeKind):
    """Conv2D (HWIO filter, grouped when its in-dim is smaller than the input's) and MatMul."""

    rule = Rule.PRODUCER
    has_channel_params = True

    def __init__(self, node, graph, weights: _Weights) -> None:
        super().__init__(node, graph)
        self.w = weights
        self.transpose_b = node.op == "MatMul" and _attr(node, "transpose_b").b

    def _kernel(self) -> np.ndarray:
        """The weights as (..., in, out)."""
        k = self.w.value
        return k.T if self.transpose_b else k

    def channels(self):
        return int(self._kernel().shape[-1])

    def blocks(self):
        if self.node.op != "Conv2D":
            return 1
        return max(1, self.g.width(self.node.input[0]) // int(self._kernel().shape[-2]))

    def const_out(self, in_consts):
        return [producer_consts(self._kernel())]

    def can_fold(self, input_index):
        if self.node.op == "MatMul":
            return not _attr(self.node, "transpose_a").b
        k = self._kernel()
        return _attr(self.node, "padding").s == b"VALID" or k.shape[0] * k.shape[1] == 1

    def macs(self, in_counts, out_count):
        shape = self.g.shape(self.node.name)
        spatial = math.prod(d for d in shape[1:-1] if d) if len(shape) > 2 else 1
        k = self._kernel()
        ksz = k.shape[0] * k.shape[1] if k.ndim == 4 else 1
        return float(spatial * ksz * in_counts[0] * out_count / self.blocks())

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        k = self._kernel()
        add = fold_into_bias(k, in_keeps[0], folds[0], self.blocks())
        k = slice_kernel(k, in_keeps[0], out_keep, self.blocks())
        new.input[1] = self.w.replace(k.T if self.transpose_b else k, out_keep, rw)
        if np.any(add[out_keep] != 0):
            rw.add_bias(new, add[out_keep])


class _Depthwise(NodeKind):
    rule = Rule.DEPTHWISE
    has_channel_params = True

    def __init__(self, node, graph, weights: _Weights) -> None:
        super().__init__(node, graph)
        self.w = weights

    def channels(self):
        return int(self.w.value.shape[-1])

    def const_out(self, in_consts):
        return [depthwise_consts(self.w.value, in_consts[0], _attr(self.node, "padding").s == b"VALID")]

    def macs(self, in_counts, out_count):
        shape = self.g.shape(self.node.name)
        k = self.w.value
        return float(math.prod(d for d in shape[1:-1] if d) * k.shape[0] * k.shape[1] * out_count)

    def rewrite(self, new, in_keeps, out_keep, folds, rw):
        k = self.w.value  # (h, w, c, multiplier): output channel c * multiplier + j
        new.input[1] = self.w.replace(np.take(k, np.nonzero(in_keeps[0])[0], axis=-2),
                                      np.repeat(in_keeps[0], k.shape[-1]), rw)


class _Join(NodeKind):
    rule = Rule.JOIN

    def data_inputs(self):
        return [i for i in self.node.input if not i.startswith("^")][:2]

    def const_out(self, in_consts):
        a, b = in_consts
        op = self.node.op
        if op in ("Add", "AddV2"):
            return [a + b]
        if op == "Sub":
            return [a - b]
        if op == "Mul":
            out = a * b
            out[(a == 0) | (b == 0)] = 0.0
            return [out]
        if op == "Maximum":
            return [np.maximum(a, b)]
        return [np.minimum(a, b)]


class _Concat(NodeKind):
    rule = Rule.CONCAT

    def data_inputs(self):
        return [i for i in self.node.input if not i.startswith("^")][:-1]

    def const_out(self, in_consts):
        return [np.concatenate(in_consts)]


class _SpatialConcat(_Concat):
    rule = Rule.JOIN

    def const_out(self, in_consts):
        out = in_consts[0].copy()
        for c in in_consts[1:]:
            out[c != out] = np.nan
        return [out]


# --------------------------------------------------------------------------- the graph

class GraphDefGraph:
    """A frozen, constant-folded GraphDef analysed into a :class:`ChannelGraph`.

    Args:
        graph_def: the frozen graph (see :func:`fold_constants`).
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
        self._shapes = {}
        for op in g.get_operations():
            for k, t in enumerate(op.outputs):
                try:
                    self._shapes[f"{op.name}:{k}"] = tuple(t.shape.as_list())
                except ValueError:  # unknown rank
                    self._shapes[f"{op.name}:{k}"] = ()
        self.order = _topological(graph_def)
        self.kinds: dict[str, NodeKind] = {}
        self._tid: dict[str, int] = {}
        ops = []
        for name in self.order:
            node = self.nodes[name]
            kind = self._kind(node)
            self.kinds[name] = kind
            ins = [self._tensor_id(i) for i in kind.data_inputs()]
            n_out = max(1, sum(1 for t in self._shapes if t.startswith(name + ":")))
            outs = [self._tensor_id(f"{name}:{k}") for k in range(n_out)]
            ops.append(Op(name, kind.rule, ins, outs, channels=kind.channels() if kind.rule in (
                Rule.PRODUCER, Rule.DEPTHWISE) else 0, blocks=kind.blocks(),
                has_channel_params=kind.has_channel_params, semantics=kind))
        widths = {tid: self.width(t) for t, tid in self._tid.items()}
        self.ops = ops
        self.graph = ChannelGraph(ops, [self._tensor_id(o) for o in self.outputs], widths)

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

    def width(self, tensor: str) -> int:
        s = self.shape(tensor)
        return int(s[-1]) if s and s[-1] is not None else 0

    def tensor_id(self, tensor: str) -> int:
        return self._tid[_tensor(tensor)]

    def _tensor_id(self, tensor: str) -> int:
        t = _tensor(tensor)
        if t not in self._tid:
            self._tid[t] = len(self._tid)
        return self._tid[t]

    # --- op -> kind
    def _kind(self, node) -> NodeKind:
        op = node.op
        rank = len(self.shape(node.name))
        nhwc = _attr(node, "data_format").s in (b"", b"NHWC")
        if op == "Const":
            return _Const(node, self)
        if op in ("Placeholder", "PlaceholderWithDefault"):
            return _Const(node, self)
        if op == "Shape" and self._batch_only(node):
            return _Shape(node, self)
        if op in _UNARY:
            return _Unary(node, self)
        if op in ("FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs"):
            if op == "FakeQuantWithMinMaxArgs" or (self.is_const(node.input[1]) and self.is_const(node.input[2])):
                return _FakeQuantTensor(node, self)
            return _Blocker(node, self)
        if op == "FakeQuantWithMinMaxVarsPerChannel" and not self.is_const(node.input[0]):
            return _Blocker(node, self)  # per-channel activation ranges: rare, left alone
        if op in _POOL and nhwc:
            return _Pool(node, self)
        if op in ("Pad", "PadV2", "MirrorPad") and self.is_const(node.input[1]):
            pads = self.const(node.input[1])
            value_ok = op != "PadV2" or (self.is_const(node.input[2]) and float(self.const(node.input[2])) == 0)
            if pads.ndim == 2 and not pads[-1].any() and value_ok:
                return _Pad(node, self)
            return _Blocker(node, self)
        if op in _REDUCE and self.is_const(node.input[1]):
            axes = np.atleast_1d(self.const(node.input[1]))
            in_rank = len(self.shape(node.input[0]))
            if in_rank and all(int(a) % in_rank != in_rank - 1 for a in axes):
                return _Reduce(node, self)
            return _Blocker(node, self)
        if op in ("Squeeze", "ExpandDims", "Reshape"):
            return self._reshape_kind(node)
        if op in ("Conv2D", "MatMul", "DepthwiseConv2dNative"):
            try:
                w = _Weights(self, node.input[1])
            except KeyError:
                return _Blocker(node, self)
            if op == "MatMul" and _attr(node, "transpose_a").b:
                return _Blocker(node, self)
            if op != "MatMul" and (not nhwc or _attr(node, "padding").s == b"EXPLICIT"):
                return _Blocker(node, self)
            if op == "DepthwiseConv2dNative":
                return _Depthwise(node, self, w)
            return _Producer(node, self, w)
        if op == "FusedBatchNormV3" and nhwc and not _attr(node, "is_training").b and all(
            self.is_const(i) for i in node.input[1:5]
        ):
            return _FusedBatchNorm(node, self)
        if op in _BINARY:
            return self._binary_kind(node, rank)
        if op == "ConcatV2" and self.is_const(node.input[-1]):
            axis = int(self.const(node.input[-1]))
            return _Concat(node, self) if axis % rank == rank - 1 else _SpatialConcat(node, self)
        return _Blocker(node, self)

    def _batch_only(self, node) -> bool:
        """True if every reader of this Shape takes only element 0 (the batch size)."""
        readers = [n for n in self.graph_def.node if any(_node(i) == node.name for i in n.input)]
        for r in readers:
            if r.op != "StridedSlice":
                return False
            try:
                begin, end = self.const(r.input[1]), self.const(r.input[2])
            except KeyError:
                return False
            if begin.tolist() != [0] or end.tolist() != [1]:
                return False
        return bool(readers)

    def _reshape_kind(self, node) -> NodeKind:
        src, dst = self.shape(node.input[0]), self.shape(node.name)
        if not src or not dst or src[-1] is None or dst[-1] != src[-1] or None in src[1:] or None in dst[1:]:
            return _Blocker(node, self)
        if math.prod(src[1:-1]) != math.prod(dst[1:-1]):
            return _Blocker(node, self)
        if node.op != "Reshape":
            return _Pool(node, self)
        shape_src = self.nodes.get(_node(node.input[1]))
        if shape_src is None:
            return _Blocker(node, self)
        if shape_src.op == "Const" or (shape_src.op == "Pack" and self.is_const(shape_src.input[-1])):
            return _Reshape(node, self)
        return _Blocker(node, self)

    def _binary_kind(self, node, rank: int) -> NodeKind:
        a, b = node.input[0], node.input[1]
        ca, cb = self.is_const(a), self.is_const(b)
        if ca and cb:
            return _Blocker(node, self)
        if ca or cb:
            ci = 0 if ca else 1
            c = self.const(node.input[ci])
            width = self.width(node.name)
            per_channel = c.ndim >= 1 and c.shape[-1] == width and c.size == width
            if c.size == 1 or per_channel:
                return _ChannelParam(node, self, ci)
            return _Blocker(node, self)
        if node.op in ("RealDiv", "BiasAdd"):
            return _Blocker(node, self)
        sa, sb = self.shape(a), self.shape(b)
        if not sa or not sb or sa[-1] != sb[-1] or len(sa) != len(sb):
            return _Blocker(node, self)
        return _Join(node, self)

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
            new = tf.compat.v1.NodeDef()
            new.CopyFrom(self.nodes[op.name])
            kind.rewrite(new, in_keeps, out_keep, folds, rw)
            edited[op.name] = new
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
        return prune_unused(out, self.outputs)
