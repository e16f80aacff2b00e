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
from tfcompress.graph.keras_adapter import ChannelParam, KerasGraph, LayerKind

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
        self._params: list[tuple[ChannelParam, int]] = []
        self.producers: dict[int, list[LayerKind]] = {g.id: [] for g in self.groups}
        # a BatchNorm right after a producer normalises its channels: the norm of a raw kernel row means
        # nothing there (BN undoes any scaling) and |gamma| is the channel's real gain
        bn_on: dict[int, LayerKind] = {}  # tensor id -> the first BatchNorm reading it
        for rec in kg.records:
            if rec.op.rule is Rule.ELEMENTWISE and isinstance(rec.kind.layer, keras.layers.BatchNormalization):
                bn_on.setdefault(rec.op.inputs[0], rec.kind)
        self._bn_after: dict[int, LayerKind] = {}  # id(producer kind) -> its BatchNorm
        seen: set[str] = set()
        for rec in kg.records:
            if rec.node is None or rec.op.layer in seen:
                continue
            seen.add(rec.op.layer)
            out = rec.op.outputs[0]
            roots, _ = kg.graph._roots(out)
            touched = ids.intersection(int(r) for r in np.unique(roots))
            if not touched:
                continue
            self._params += [(p, out) for p in rec.kind.output_params()]
            if rec.op.rule is Rule.PRODUCER:
                for gid in touched:
                    self.producers[gid].append(rec.kind)
                if out in bn_on:
                    self._bn_after[id(rec.kind)] = bn_on[out]
        self._shadow: dict[int, np.ndarray] = {}
        self._has_shadow: dict[int, np.ndarray] = {}
        self._masks = self._variable_masks()
        self._fn = None
        self._tensors: list | None = None

    # ------------------------------------------------------------------ views
    def removed(self) -> dict[int, np.ndarray]:
        return {gid: ~k for gid, k in self.keep.items()}

    def _variable_masks(self) -> dict[int, tuple[ChannelParam, np.ndarray]]:
        removed = self.removed()
        masks = {}
        for p, out in self._params:
            masks[id(p.variable)] = (p, p.mask(self.kg.graph.keep_mask(out, removed)))
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

        Where a BatchNorm follows the producer, rows are rescaled to norm |gamma| (the channel's gain).
        """
        rows = []
        for kind in self.producers[group.id]:
            r = kind.filters(self._remembered(kind.output_params()[0].variable))
            bn = self._bn_after.get(id(kind))
            if bn is not None and bn.layer.scale:
                gamma = np.abs(self._remembered(bn.layer.gamma))
                norm = np.linalg.norm(r, axis=1)
                r = r * (gamma / np.maximum(norm, 1e-12))[:, None]
            rows.append(r)
        return rows

    def zero_channels(self, group: ChannelGroup) -> np.ndarray:
        """Channels of ``group`` whose filters are exactly zero in every producer (pruned earlier)."""
        zero = np.ones(group.size, dtype=bool)
        for kind in self.producers[group.id]:
            zero &= ~kind.filters().any(axis=1)
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
        for g in self.groups:
            old, new = current[g.id], np.asarray(keep[g.id], dtype=bool)
            if np.array_equal(old, new):
                continue
            changes = compensation.undo(self._changes.get(g.id, []), ~old & new)
            report, finish = None, None
            if (old & ~new).any():
                report, finish = compensation.compensate(self.kg, g, old & ~new, self.data, measure_error=False)
            current[g.id] = new
            self._switch(current)
            if finish is not None:
                finish()
                changes += report.changes
            self._changes[g.id] = changes

    def _switch(self, keep: dict[int, np.ndarray]) -> None:
        old = self._masks
        self.keep = {gid: np.asarray(k, dtype=bool).copy() for gid, k in keep.items()}
        self._masks = self._variable_masks()
        for key, (p, new) in self._masks.items():
            before = old[key][1]
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
        self._tensors = None

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
