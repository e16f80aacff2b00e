"""GroupNormalization as Keras 3 traces it into a GraphDef, read as one op and rewritten for fewer channels.

Keras reshapes the ``C`` channels of ``x`` into ``(groups, C / groups)``, takes each group's mean and variance
over its channels and all positions (``moments``), normalises, applies gamma (and beta) shaped like the groups,
and reshapes back. Node by node, the reshape into groups moves channels onto another axis, which blocks them;
read as a whole, the pattern is the canonical op ``"layernorm"`` with statistics per group, as the Keras adapter
reads the layer (:class:`tfcompress.graph.keras_kinds.GroupNorm`), so a zeroed channel may leave it. Stripped,
the groups may hold different numbers of channels and each group's statistics still count the constants its
removed channels held, as :class:`tfcompress.graph.keras_layers.PartialGroupNormalization` computes them.

Only the form the installed Keras traces is recognised (with gamma: without it a removed channel comes out as
``(0 - mean) / std``, which varies, and the Keras adapter blocks too); any other form keeps blocking.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from tfcompress.graph import ops
from tfcompress.graph.frozen_graph import node_name as _node, tensor_name as _tensor
from tfcompress.graph.graphdef_kinds import NodeKind, Rewriter, attr

if TYPE_CHECKING:
    from tfcompress.graph.graphdef_adapter import GraphDefGraph

__all__ = ["GroupNorm", "GroupNormPattern", "find_group_norms"]

_COPIES = ("Identity", "StopGradient", "Snapshot")


@dataclasses.dataclass
class GroupNormPattern:
    """One traced GroupNormalization: ``output`` (the reshape back) normalises ``x`` in ``groups`` groups."""

    output: str  # the node reshaping the result back to x's shape
    x: str  # the normalised tensor
    groups: int
    gamma: np.ndarray  # (C,)
    beta: np.ndarray | None  # (C,), None without center
    epsilon: float
    inside: set[str]  # the nodes between x and output, computed by the rewrite of output alone


def find_group_norms(g: "GraphDefGraph") -> dict[str, GroupNormPattern]:
    """Every traced GroupNormalization of ``g`` whose inner nodes nothing else reads, by output node name."""
    found = {}
    for node in g.graph_def.node:
        p = _match(g, node) if node.op == "Reshape" else None
        if p is not None and all(r.name in p.inside or r.name == p.output
                                 for n in p.inside for r in g.readers.get(n, [])):
            found[p.output] = p
    return found


class GroupNorm(NodeKind):
    """A traced GroupNormalization (:class:`GroupNormPattern`) as the canonical op ``"layernorm"``: it reads all
    the channels of ``x`` (those of each group for its statistics), and an output channel whose gamma is 0 is
    the constant beta. Its inner nodes are rewritten as one: see :func:`partial_group_norm`."""

    reads_all_channels = True
    has_channel_params = True

    def __init__(self, node, graph: "GraphDefGraph", pattern: GroupNormPattern) -> None:
        beta = np.zeros_like(pattern.gamma) if pattern.beta is None else pattern.beta
        super().__init__(node, graph, "layernorm", gamma=pattern.gamma, beta=beta)
        self.pattern = pattern

    def data_inputs(self):
        return [self.pattern.x]

    def rewrite(self, new, in_keeps, out_keep, folds, rw: Rewriter):
        p = self.pattern
        keep = in_keeps[0]
        dtype = tf.as_dtype(self.node.attr["T"].type)
        shape = self.g.shape(p.x)[:-1] + (int(keep.sum()),)
        member = ops.norm_groups(keep.size, p.groups)
        beta = None if p.beta is None else p.beta[keep]
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(dtype, shape, name="x")
            y = partial_group_norm(x, member, keep, folds[0], p.gamma[keep], beta, p.epsilon)
        prefix = self.node.name + "/tfcompress_partial/"
        for n in graph.as_graph_def().node:
            if n.name != "x":
                n.name = prefix + n.name
                n.input[:] = [_tensor(p.x) if _node(i) == "x" else prefix + i for i in n.input]
                rw.new_nodes.append(n)
        controls = [i for i in new.input if i.startswith("^")]
        new.op = "Identity"
        new.input[:] = [prefix + y.op.name] + controls
        new.ClearField("attr")
        new.attr["T"].type = dtype.as_datatype_enum


def partial_group_norm(x: tf.Tensor, member: np.ndarray, keep: np.ndarray, values: np.ndarray,
                       gamma: np.ndarray, beta: np.ndarray | None, epsilon: float) -> tf.Tensor:
    """GroupNormalization of ``x``, the kept channels of a tensor whose channel ``c`` was in group ``member[c]``
    and, where ``keep`` is False, held the constant ``values[c]``; each group's mean and variance (over its
    channels and the positions) count them. Per-group values are laid out in the original channel order (kept
    channels' from ``x``, removed ones' from their constants), reshaped into equal groups and averaged, so the
    statistics keep the original form; the normalisation itself runs on the kept channels only."""
    rank, groups = x.shape.rank, int(member.max()) + 1
    last, axes = rank - 1, list(range(1, rank - 1))
    removed = ~keep
    n_kept, n_removed = int(keep.sum()), int(removed.sum())
    np_dtype = x.dtype.as_numpy_dtype
    # position of each original channel in [kept channels, removed channels]
    layout = np.empty(keep.size, np.int32)
    layout[keep] = np.arange(n_kept)
    layout[removed] = n_kept + np.arange(n_removed)
    grouped = [-1] + [1] * len(axes) + [groups, keep.size // groups]

    def group_mean(kept: tf.Tensor, removed_part: tf.Tensor) -> tf.Tensor:
        """(batch, 1..., kept) and (batch, 1..., removed) per-channel values -> (batch, 1..., groups) means."""
        full = tf.gather(tf.concat([kept, removed_part], axis=last), layout, axis=last)
        return tf.reduce_mean(tf.reshape(full, grouped), axis=-1)

    def per_channel(per_group: tf.Tensor, which: np.ndarray) -> tf.Tensor:
        return tf.gather(per_group, member[which].astype(np.int32), axis=last)

    def spatial_mean(t: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(t, axis=axes, keepdims=True) if axes else t

    removed_values = np.asarray(values[removed], np_dtype)
    x_mean = spatial_mean(x)
    # a removed channel holds its constant at every position: a tensor shaped like x_mean's removed part
    constants = tf.zeros_like(tf.gather(x_mean, np.zeros(n_removed, np.int32), axis=last))
    if removed_values.any():
        constants = constants + removed_values
    mean = group_mean(x_mean, constants)
    centred = x - per_channel(mean, keep)
    variance = group_mean(spatial_mean(tf.square(centred)), tf.square(constants - per_channel(mean, removed)))
    scale = per_channel(tf.math.rsqrt(variance + np.asarray(epsilon, np_dtype)), keep) * gamma.astype(np_dtype)
    out = centred * scale
    return out if beta is None else out + beta.astype(np_dtype)


# --------------------------------------------------------------------------- recognising the pattern

def _match(g: "GraphDefGraph", out) -> GroupNormPattern | None:
    """``out = Reshape(r * a + shift)`` with ``r = Reshape(x)`` into groups, ``a = rsqrt(var + eps) * gamma``,
    ``shift = -mean * a (+ beta)`` and ``mean, var`` the moments of ``r`` over all axes but batch and groups."""
    y = _source(g, out.input[0])
    if y is None or y.op not in ("Add", "AddV2"):
        return None
    for scaled, shift in _orders(g, y):
        for r, a in _orders(g, scaled) if scaled.op == "Mul" else ():
            grouping = r is not None and r.op == "Reshape" and _grouping(g, r, out)
            found = grouping and _statistics(g, r, a, shift, *grouping)
            if found:
                gamma, beta, epsilon, inside = found
                return GroupNormPattern(out.name, _tensor(r.input[0]), grouping[0], gamma, beta, epsilon,
                                        inside | {y.name, scaled.name, r.name})
    return None


def _grouping(g: "GraphDefGraph", r, out) -> tuple[int, int] | None:
    """``(groups, C)`` if ``r`` reshapes ``x`` of static ``C`` channels to ``x``'s shape with the channel axis
    split in ``(groups, C / groups)`` and ``out`` has ``x``'s shape again; else None."""
    xs, rs, os = g.shape(r.input[0]), g.shape(r.name), g.shape(out.name)
    if len(xs) < 2 or len(rs) != len(xs) + 1 or len(os) != len(xs) or not xs[-1] or os[-1] != xs[-1]:
        return None
    if rs[-2] is None or rs[-1] is None or rs[-2] * rs[-1] != xs[-1] or tuple(rs[1:-2]) != tuple(xs[1:-1]):
        return None
    if not tf.as_dtype(attr(r, "T").type).is_floating:
        return None
    return int(rs[-2]), int(xs[-1])


def _statistics(g: "GraphDefGraph", r, a, shift, groups: int, channels: int):
    """``(gamma, beta, epsilon, inner nodes)`` if ``a`` and ``shift`` are the normalisation of ``r`` by its
    moments; else None."""
    if a is None or a.op != "Mul":
        return None
    for inv, gamma_node in _orders(g, a):
        gamma = _per_channel(g, gamma_node, groups, channels, len(g.shape(r.name)))
        if inv is None or inv.op != "Rsqrt" or gamma is None:
            continue
        var_eps = _source(g, inv.input[0])
        if var_eps is None or var_eps.op not in ("Add", "AddV2"):
            continue
        for var, eps in _orders(g, var_eps):
            if eps is None or eps.op != "Const" or g.const(eps.name).size != 1:
                continue
            mean, inner = _moments(g, r, var)
            found = mean and _shift(g, shift, mean, a, groups, channels, len(g.shape(r.name)))
            if found:
                beta, shift_nodes = found
                epsilon = float(g.const(eps.name).reshape(()))
                return gamma, beta, epsilon, inner | shift_nodes | {a.name, inv.name, var_eps.name}
    return None


def _moments(g: "GraphDefGraph", r, var) -> tuple:
    """For ``var = Mean((r - mean)^2)`` and ``mean = Mean(r)`` over all axes of ``r`` but batch and groups (as
    ``moments`` traces them): ``(mean node, the nodes of both)``; else ``(None, set())``."""
    if var is None or var.op != "Mean":
        return None, set()
    diff = _source(g, var.input[0])
    if diff is None or diff.op != "SquaredDifference":
        return None, set()
    for r2, mean in _orders(g, diff):
        if r2 is r and mean is not None and mean.op == "Mean" and _source(g, mean.input[0]) is r:
            rank = len(g.shape(r.name))
            wanted = set(range(1, rank)) - {rank - 2}
            if all(attr(m, "keep_dims").b and _axes(g, m, rank) == wanted for m in (mean, var)):
                return mean, {var.name, diff.name, mean.name} | _copies_between(g, diff, mean)
    return None, set()


def _shift(g: "GraphDefGraph", shift, mean, a, groups: int, channels: int, rank: int):
    """``(beta or None, nodes)`` if ``shift`` is ``-mean * a`` or ``-mean * a + beta``; else None."""
    if shift is None:
        return None
    beta, product = None, shift
    if shift.op in ("Add", "AddV2"):
        for p, b in _orders(g, shift):
            beta = _per_channel(g, b, groups, channels, rank)
            if beta is not None:
                product = p
                break
        else:
            return None
    if product is None or product.op != "Mul":
        return None
    for neg, a2 in _orders(g, product):
        if a2 is a and neg is not None and neg.op == "Neg" and _source(g, neg.input[0]) is mean:
            return beta, {shift.name, product.name, neg.name}
    return None


def _per_channel(g: "GraphDefGraph", node, groups: int, channels: int, rank: int) -> np.ndarray | None:
    """A constant shaped ``(1, ..., groups, C / groups)`` (broadcast over the grouped tensor) as a vector over
    the ``C`` channels in their original order (row-major: channel ``c`` is group ``c // (C / groups)``)."""
    if node is None or node.op != "Const":
        return None
    value = g.const(node.name)
    lead = value.shape[:-2]
    if value.ndim > rank or value.shape[-2:] != (groups, channels // groups) or any(d != 1 for d in lead):
        return None
    return value.reshape(channels).astype(np.float64)


def _axes(g: "GraphDefGraph", reduce, rank: int) -> set[int] | None:
    if not g.is_const(reduce.input[1]):
        return None
    return {int(i) % rank for i in np.atleast_1d(g.const(reduce.input[1]))}


def _source(g: "GraphDefGraph", tensor: str):
    """The node computing ``tensor``, through copies (Identity, StopGradient); None if a node reads it with an
    output index other than 0."""
    node = g.nodes.get(_node(tensor))
    while node is not None and node.op in _COPIES:
        node = g.nodes.get(_node(node.input[0]))
    return node if _tensor(tensor).endswith(":0") else None


def _copies_between(g: "GraphDefGraph", reader, source) -> set[str]:
    """The copy nodes on the path from ``reader``'s inputs back to ``source``."""
    out = set()
    for i in reader.input[:2]:
        node = g.nodes.get(_node(i))
        while node is not None and node.op in _COPIES and node is not source:
            out.add(node.name)
            node = g.nodes.get(_node(node.input[0]))
    return out


def _orders(g: "GraphDefGraph", node) -> list[tuple]:
    """The two data operands of a binary node as source nodes, in both orders."""
    a, b = (_source(g, i) for i in node.input[:2])
    return [(a, b), (b, a)]
