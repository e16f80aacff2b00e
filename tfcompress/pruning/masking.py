"""Keep masks of channel groups, applied to a model's weights.

Pruned channels are zero *in the weights* (not masked in the forward pass) so that a checkpoint, a
SavedModel or :func:`tfcompress.strip` sees them as zero at any time. When a schedule step re-selects the
masks, a channel that comes back gets the values it had when it was pruned (kept in host memory), so a
revived filter is not a dead one.

With ``compensate``, a channel's constant (or, given data, mean) contribution is handed to its consumers' biases
at the moment it is pruned (:mod:`tfcompress.graph.compensation`), and taken back if it is revived.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from typing import Any

from tfcompress.graph import compensation
from tfcompress.graph.engine import ChannelGroup, Rule
from tfcompress.graph.keras_adapter import KerasGraph
from tfcompress.graph.keras_kinds import ChannelParam, LayerKind, ranges_read_rows

__all__ = ["GroupMasks"]


class GroupMasks:
    """One boolean keep mask per group, and the weights (kernels, biases, BN gamma/beta) they control."""

    def __init__(self, kg: KerasGraph, groups: list[ChannelGroup], compensate: bool = False,
                 data: Any = None) -> None:
        self.kg = kg
        self.compensate = compensate
        self.data = data  # model inputs for mean statistics (None: only provable constants are handed over)
        self._changes: dict[int, list] = {}  # group id -> folds made for its pruned channels
        self.groups = list(groups)
        self.keep: dict[int, np.ndarray] = {g.id: np.ones(g.size, dtype=bool) for g in self.groups}
        ids = set(self.keep)
        by_id = {g.id: g for g in self.groups}
        # (weight, the tensor whose channels index it): producers' outputs, and a QAT layer's kernel rows
        # reading its input (its weight ranges must not count rows of removed channels)
        self._params: list[tuple[ChannelParam, int]] = []
        self._params_of: dict[int, list[int]] = {gid: [] for gid in ids}  # group id -> indices into _params
        self._params_of_var: dict[int, list[int]] = {}  # id(variable) -> indices into _params
        # group id -> (producer, its output positions carrying the group's channels 0, 1, ... once or more)
        self.producers: dict[int, list[tuple[LayerKind, np.ndarray]]] = {g.id: [] for g in self.groups}
        readers: dict[int, list] = {}
        for rec in kg.records:
            for t in set(rec.op.inputs):
                readers.setdefault(t, []).append(rec)
        self._readers = readers
        self._outputs: dict[int, list[tuple[LayerKind, int]]] = {g.id: [] for g in self.groups}  # producers'
        self._chain: dict[int, list[LayerKind]] = {}  # id(producer kind) -> per-channel layers after it
        seen: set[str] = set()
        for rec in kg.records:
            if rec.node is None or not rec.op.outputs or rec.op.layer in seen:
                continue
            seen.add(rec.op.layer)
            if ranges_read_rows(rec.kind.layer) and kg.row_reader(rec):
                self._add(rec.kind.input_params(), rec.op.inputs[0], ids)
            out = rec.op.outputs[0]
            touched = self._add(rec.kind.output_params(), out, ids)
            if not touched:
                continue
            if rec.op.rule is Rule.PRODUCER:
                for gid in touched:  # a producer added to a concatenation carries each group in one part
                    pos, ch = kg.graph.positions(out, by_id[gid])
                    self.producers[gid].append((rec.kind, pos[np.argsort(ch, kind="stable")]))
                    self._outputs[gid].append((rec.kind, out))
                self._chain[id(rec.kind)] = _gain_chain(kg, readers, out)
        self._shadow: dict[int, np.ndarray] = {}
        self._has_shadow: dict[int, np.ndarray] = {}
        self._masks = self._variable_masks()
        self._fn = None
        self._tensors: list | None = None

    def _add(self, params: list[ChannelParam], tensor: int, ids: set[int]) -> set[int]:
        """Register ``params`` as indexed by ``tensor``'s channels; returns the groups of ours on it."""
        touched = ids.intersection(int(r) for r in np.unique(self.kg.graph.owners(tensor)[0]))
        for p in params if touched else []:
            for gid in touched:
                self._params_of[gid].append(len(self._params))
            self._params_of_var.setdefault(id(p.variable), []).append(len(self._params))
            self._params.append((p, tensor))
        return touched

    # ------------------------------------------------------------------ views
    def removed(self) -> dict[int, np.ndarray]:
        return {gid: ~k for gid, k in self.keep.items()}

    def layer_keep(self, layer: str) -> np.ndarray:
        """Keep mask of the channels of producer ``layer``'s output, over every group that holds some of them."""
        for rec in self.kg.records:
            if rec.op.layer == layer and rec.op.rule is Rule.PRODUCER:
                return self.kg.graph.keep_mask(rec.op.outputs[0], self.removed())
        raise KeyError(layer)

    def _variable_masks(self, indices: Any = None) -> dict[int, tuple[ChannelParam, np.ndarray]]:
        """The 0/1 mask of the variable of each parameter (of those ``indices`` into ``_params``; all): the product
        of the masks of every parameter on that variable."""
        removed = self.removed()
        masks = {}
        for i in range(len(self._params)) if indices is None else indices:
            p = self._params[i][0]
            if id(p.variable) not in masks:
                mask = np.ones(tuple(p.variable.shape), np.float32)
                for j in self._params_of_var[id(p.variable)]:
                    q, tensor = self._params[j]
                    mask = mask * q.mask(self.kg.graph.keep_mask(tensor, removed))
                masks[id(p.variable)] = (p, mask)
        return masks

    def _remembered(self, var) -> np.ndarray:
        """A variable's value with pruned entries as they were when pruned (what their importance was)."""
        value = var.numpy()
        if id(var) in self._shadow:
            pruned = (self._masks[id(var)][1] == 0) & self._has_shadow[id(var)]
            value = np.where(pruned, self._shadow[id(var)], value)
        return value

    def filters(self, group: ChannelGroup) -> list[np.ndarray]:
        """Filter rows of each producer of ``group``; live weights, and pruned ones as they were when pruned.

        Each row is rescaled to the channel's gain where the next layers read it (:meth:`gains`), so that kernel
        norms compare channels as their consumers see them.
        """
        rows = []
        for kind, pos in self.producers[group.id]:
            r = kind.filters(self._remembered)
            norm = np.linalg.norm(r, axis=1)
            gain = self.gains(kind, norm)
            rows += _group_rows(r * (gain / np.maximum(norm, 1e-12))[:, None], pos, group.size)
        return rows

    def gains(self, producer: LayerKind, norms: np.ndarray) -> np.ndarray:
        """The scale of each output channel of ``producer`` where a layer other than a per-channel one reads it.

        A BatchNorm normalises its input: whatever scale the channel had before (the kernel row's norm
        ``norms``, a depthwise filter's) is undone and |gamma| is the gain (1 without ``scale``). A depthwise
        convolution multiplies the gain by its filter's norm. A MobileNet channel goes conv -> BN -> ReLU6 ->
        depthwise -> BN -> ReLU6 before the next conv reads it: its gain there is the second BatchNorm's
        |gamma|, which can be large for a channel whose first |gamma| is the smallest of its layer.
        """
        gain = np.asarray(norms, np.float64)
        for kind in self._chain.get(id(producer), []):
            if isinstance(kind.layer, keras.layers.BatchNormalization):
                gain = np.abs(self._remembered(kind.layer.gamma)) if kind.layer.scale else np.ones_like(gain)
            else:
                p = kind.output_params()[0]
                w = self._remembered(p.variable).reshape(p.view or tuple(p.variable.shape))
                gain = gain * np.linalg.norm(np.moveaxis(w, p.axis, 0).reshape(w.shape[p.axis], -1), axis=1)
        return gain

    def batchnorms_after(self, group_ids: Any) -> list[keras.layers.BatchNormalization]:
        """The BatchNorms whose inputs change when channels of the groups ``group_ids`` are removed or revived:
        every one a group's producers reach, except those that normalise that group's own channels one to one
        (:meth:`gains`' chain), whose kept channels see what they saw before."""
        found = {}
        for gid in group_ids:
            own = {id(kind.layer) for producer, _ in self._outputs[gid] for kind in self._chain.get(id(producer), [])}
            todo = [out for _, out in self._outputs[gid]]
            seen = set(todo)
            while todo:
                for rec in self._readers.get(todo.pop(), []):
                    layer = rec.kind.layer
                    if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in own:
                        found[id(layer)] = layer
                    for t in rec.op.outputs:
                        if t not in seen:
                            seen.add(t)
                            todo.append(t)
        return list(found.values())

    def zero_channels(self, group: ChannelGroup) -> np.ndarray:
        """Channels of ``group`` whose filters are exactly zero in every producer (pruned earlier)."""
        zero = np.ones(group.size, dtype=bool)
        for kind, pos in self.producers[group.id]:
            for rows in _group_rows(kind.filters(), pos, group.size):
                zero &= ~rows.any(axis=1)
        return zero

    # ------------------------------------------------------------------ updates
    def set(self, keep: dict[int, np.ndarray]) -> None:
        """Switch to new keep masks: newly pruned weights are remembered and zeroed, revived ones restored.

        With ``compensate`` this goes one group at a time, so that each group's channel values are measured
        with the groups before it already pruned and compensated.
        """
        if not self.compensate:
            self._switch(keep)
            return
        current = dict(self.keep)
        consts = compensation.TrackedConstants(self.kg)  # each group's changes update the graph's constants
        for g in self.groups:
            old, new = current[g.id], np.asarray(keep[g.id], dtype=bool)
            if np.array_equal(old, new):
                continue
            before = self._changes.get(g.id, [])
            changes = compensation.undo(before, ~old & new)
            consts.changed(v for v, _, _ in before)
            report, finish = None, None
            if (old & ~new).any():
                report, finish = compensation.compensate(self.kg, g, old & ~new, self.data, measure_error=False,
                                                         constants=consts)
            current[g.id] = new
            consts.changed(self._switch(current))
            if finish is not None:
                finish()
                changes += report.changes
            self._changes[g.id] = changes

    def _switch(self, keep: dict[int, np.ndarray]) -> list[Any]:
        """Apply the keep masks ``keep`` (groups not in it keep theirs); returns the variables assigned.

        Only the parameters of groups whose mask changed are looked at: compensation switches one group at a
        time, and a pass over every parameter per group made that quadratic in the model's size."""
        keep = {gid: np.asarray(k, dtype=bool).copy() for gid, k in keep.items()}
        changed = [gid for gid, k in keep.items() if not np.array_equal(k, self.keep[gid])]
        self.keep = {**self.keep, **keep}
        updated = self._variable_masks(sorted({i for gid in changed for i in self._params_of[gid]}))
        assigned = []
        for key, (p, new) in updated.items():
            before = self._masks[key][1]
            self._masks[key] = (p, new)
            if np.array_equal(before, new):
                continue
            value = p.variable.numpy()
            newly_pruned = (before != 0) & (new == 0)
            shadow = self._shadow.setdefault(key, np.zeros_like(value))
            has = self._has_shadow.setdefault(key, np.zeros(value.shape, dtype=bool))
            shadow[newly_pruned] = value[newly_pruned]
            has |= newly_pruned
            revived = (before == 0) & (new != 0) & has
            value = np.where(revived, shadow, value) * new.astype(value.dtype)
            p.variable.assign(value)
            assigned.append(p.variable)
        self._tensors = None
        return assigned

    def apply(self) -> None:
        """Zero the pruned weights again (after an optimizer step moved them)."""
        if self._fn is None:
            variables = [p.variable for p, _ in self._masks.values()]

            @tf.function(autograph=False)
            def fn(masks):
                for v, m in zip(variables, masks):
                    v.assign(v * m)

            self._fn = fn
        if self._tensors is None:
            self._tensors = [tf.constant(m, dtype=p.variable.dtype) for p, m in self._masks.values()]
        if self._tensors:
            self._fn(self._tensors)


def _group_rows(rows: np.ndarray, pos: np.ndarray, size: int) -> list[np.ndarray]:
    """A producer's filter ``rows`` at the positions ``pos`` of a group's channels (sorted by channel, each
    channel ``k`` times when the producer's output carries the group ``k`` times): ``k`` arrays of ``size`` rows."""
    picked = rows[pos].reshape(size, len(pos) // size, -1)
    return [picked[:, j] for j in range(picked.shape[1])]


def _gain_chain(kg: KerasGraph, readers: dict[int, list], out: int) -> list[LayerKind]:
    """The BatchNorms and depthwise convolutions (one filter per channel) that tensor ``out``'s channels go
    through, in order, while each tensor on the way has a single reader that keeps the channels one to one
    (activations, padding, pooling, dropout in between)."""
    chain = []
    while out not in kg.output_ids and len(readers.get(out, [])) == 1:
        rec = readers[out][0]
        kind = rec.kind
        if len(rec.op.inputs) != 1 or kind.call.in_widths[:1] != [kind.call.out_width]:
            break
        if rec.op.rule is Rule.DEPTHWISE:
            chain.append(kind)
        elif rec.op.rule is not Rule.ELEMENTWISE:
            break
        elif isinstance(kind.layer, keras.layers.BatchNormalization):
            chain.append(kind)
        out = rec.op.outputs[0]
    return chain
