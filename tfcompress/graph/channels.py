"""Public channel functions on Keras models: list coupled groups, zero channels of a group."""

from __future__ import annotations

from typing import Iterable

import keras
import numpy as np

from tfcompress.graph.engine import ChannelGroup
from tfcompress.graph.keras_adapter import KerasGraph, build_graph

__all__ = ["channel_groups", "explain", "zero_channels"]


def channel_groups(model: keras.Model) -> list[ChannelGroup]:
    """The groups of layers whose output channels are coupled and must be pruned together.

    Args:
        model: a Sequential or Functional Keras model (nested sub-models are analysed too; their layers
            are named ``"submodel/layer"``).

    Returns:
        The prunable groups, in graph order. Groups whose channels reach a model output or a layer the
        engine does not understand (Reshape that mixes axes, Lambda, custom layers ...) are left out.

    Raises:
        tfcompress.graph.UnsupportedModelError: for a subclassed model.
    """
    return build_graph(model).groups()


def explain(model: keras.Model) -> list[ChannelGroup]:
    """Every channel group of ``model``, prunable or not; a group that cannot be pruned says why in ``reason``.

    Example:
        >>> for g in tfcompress.explain(model):
        ...     print(g.layers, g.size, g.reason or "prunable")

    Raises:
        tfcompress.graph.UnsupportedModelError: for a subclassed model.
    """
    return build_graph(model).graph.all_groups()


def zero_channels(
    model: keras.Model,
    group: ChannelGroup,
    indices: Iterable[int],
    graph: KerasGraph | None = None,
) -> None:
    """Zero, in place, every parameter that produces channels ``indices`` of ``group``.

    Kernel slices and biases of the group's producers, BatchNormalization gamma and beta, depthwise
    kernels and biases along the way: with them zero, those channels output exactly 0 (up to an
    activation with f(0) != 0, which :func:`tfcompress.strip` accounts for).

    Args:
        model: the model (modified in place).
        group: a group from :func:`channel_groups` of this model.
        indices: channel indices in ``[0, group.size)``.
        graph: an already built graph of ``model`` (saves re-analysing it in a loop).
    """
    kg = graph if graph is not None else build_graph(model)
    g = kg.find_group(group)
    idx = np.unique(np.asarray(list(indices), dtype=int))
    if idx.size and (idx.min() < 0 or idx.max() >= g.size):
        raise ValueError(f"channel indices must be in [0, {g.size}) for {g!r}; got {idx.min()}..{idx.max()}")
    chosen = np.zeros(g.size, dtype=bool)
    chosen[idx] = True
    done: set[str] = set()
    for rec in kg.records:
        if rec.op.layer in done or not rec.op.outputs:
            continue
        pos, ch = kg.graph.positions(rec.op.outputs[0], g)
        pos = pos[chosen[ch]]
        if pos.size:
            rec.kind.zero_outputs(pos)
            done.add(rec.op.layer)
