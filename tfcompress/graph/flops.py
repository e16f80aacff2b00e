"""FLOPs of a channel graph as a function of which channels are removed (pruning targets, reports).

Each op's multiply-accumulates for given channel counts come from the op table (:func:`tfcompress.graph.ops.macs`,
called by the Keras :class:`LayerKind` or GraphDef :class:`NodeKind` with the op's shapes and parameters), the
same for both backends; the engine says how many channels each tensor keeps.
"""

from __future__ import annotations

import keras
import numpy as np

from tfcompress.graph.engine import ChannelGraph
from tfcompress.graph.keras_adapter import build_graph

__all__ = ["FlopsCounter", "count_flops"]


class FlopsCounter:
    """Counts FLOPs (2 x multiply-accumulates of convolutions and dense layers, per example) of a graph.

    Built once per graph; :meth:`flops` is then cheap enough to call inside a search over pruning levels.
    """

    def __init__(self, graph: ChannelGraph) -> None:
        self._graph = graph
        self._hits: dict[int, list[tuple[int, np.ndarray]]] = {}
        for tid in graph.maps:
            roots, chans = graph.owners(tid)
            self._hits[tid] = [(int(r), chans[roots == r]) for r in np.unique(roots)]
        self.ops = [op for op in graph.ops if op.semantics is not None and op.outputs]  # the ops with MACs

    def _kept(self, tid: int, removed: dict[int, np.ndarray]) -> int:
        n = self._graph.tensor_width[tid]
        for r, chans in self._hits[tid]:
            if r in removed:
                n -= int(removed[r][chans].sum())
        return n

    def op_macs(self, removed: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """Multiply-accumulates of each op of :attr:`ops` (in that order) when the channels ``removed[group id]``
        (boolean masks) are taken out."""
        removed = removed or {}
        return np.array([op.semantics.macs([self._kept(t, removed) for t in op.inputs],
                                           self._kept(op.outputs[0], removed)) for op in self.ops], np.float64)

    def flops(self, removed: dict[int, np.ndarray] | None = None) -> float:
        """FLOPs when the channels ``removed[group id]`` (boolean masks) are taken out."""
        return 2.0 * float(self.op_macs(removed).sum())


def count_flops(model: keras.Model) -> int:
    """FLOPs of one forward pass of one example (2 x multiply-accumulates of Conv/Dense layers)."""
    return int(FlopsCounter(build_graph(model).graph).flops())
