"""Public channel functions on Keras models: list coupled groups, zero channels of a group."""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np

from tfcompress.graph import compensation
from tfcompress.graph.compensation import CompensationReport
from tfcompress.graph import keras_kinds as kinds
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


def _channel_indices(indices: Iterable[int], g: ChannelGroup) -> np.ndarray:
    """``indices`` as sorted unique ints in ``[0, g.size)``; a boolean mask, text or fractions are an error
    (``int`` would turn a mask into channels 0 and 1, and 2.5 into channel 2)."""
    if isinstance(indices, (str, bytes)):
        raise TypeError(f"channel indices must be integers, got the string {indices!r}")
    arr = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
    if arr.dtype == bool:
        raise TypeError(f"channel indices for {g!r} must be integers, got booleans; for a mask pass "
                        "np.flatnonzero(mask)")
    if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.number)
                     or np.issubdtype(arr.dtype, np.complexfloating) or np.any(arr != np.round(arr))):
        raise TypeError(f"channel indices must be a flat list of integers, got {arr.tolist()!r}"[:300])
    idx = np.unique(arr.astype(int))
    if idx.size and (idx.min() < 0 or idx.max() >= g.size):
        raise ValueError(f"channel indices must be in [0, {g.size}) for {g!r}; got {idx.min()}..{idx.max()}")
    return idx


def zero_channels(
    model: keras.Model,
    group: ChannelGroup,
    indices: Iterable[int],
    graph: KerasGraph | None = None,
    compensate: bool = True,
    data: Any = None,
    batch_size: int = 64,
) -> CompensationReport:
    """Zero, in place, every parameter that produces channels ``indices`` of ``group``.

    Kernel slices and biases of the group's producers, BatchNormalization gamma and beta, depthwise
    kernels and biases along the way: with them zero, those channels output exactly 0 (up to an
    activation with f(0) != 0, which :func:`tfcompress.strip` accounts for).

    A trained channel is rarely zero before that: a small filter still emits its BatchNorm shift (after
    ReLU6 often a large constant) that later layers rely on. With ``compensate`` the channels' contribution
    is first handed to their consumers (Conv/Dense reading them): ``W . value`` is added to the consumer's
    bias, or, for a consumer without bias, to the moving mean of the BatchNorm right after it. ``value`` is
    the channel's exact constant where the channel is provably constant, else its mean over ``data``
    (without ``data`` only proven constants are handed over). See :mod:`tfcompress.graph.compensation` for
    where this is exact and how the remaining error is measured.

    Args:
        model: the model (modified in place).
        group: a group from :func:`channel_groups` of this model.
        indices: channel indices in ``[0, group.size)``.
        graph: an already built graph of ``model`` (saves re-analysing it in a loop).
        compensate: hand the removed channels' constant or mean contribution to their consumers.
        data: model inputs (an array, a dict of arrays by input name or a tuple / list of arrays in input order
            for a model with several inputs, ``(x, y)`` of those, or a
            batched ``tf.data.Dataset``; a few hundred samples suffice) to measure channel means and the
            error the removal leaves.
        batch_size: batch size for ``data`` given as an array.

    Returns:
        A :class:`~tfcompress.graph.compensation.CompensationReport`: which consumers absorbed the
        contribution, which did so exactly, which could not, and (with ``data``) the relative RMS change
        of each consumer's output.
    """
    kg = graph if graph is not None else build_graph(model)
    g = kg.find_group(group)
    idx = _channel_indices(indices, g)
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate must be True or False, got {compensate!r}")
    if data is not None and not compensate:
        raise ValueError("data is only used with compensate=True")
    chosen = np.zeros(g.size, dtype=bool)
    chosen[idx] = True
    report, finish = CompensationReport(), (lambda: None)
    consts = compensation.TrackedConstants(kg)
    if compensate and idx.size:
        report, finish = compensation.compensate(kg, g, chosen, data, batch_size, constants=consts)
    done: set[str] = set()
    for rec in kg.records:
        if rec.op.layer in done or not rec.op.outputs:
            continue
        pos, ch = kg.graph.positions(rec.op.outputs[0], g)
        pos = pos[chosen[ch]]
        if pos.size:
            rec.kind.zero_outputs(pos)
            done.add(rec.op.layer)
    for rec in kg.records:  # a QAT layer's rows reading them: its weight ranges must not count them
        if kinds.ranges_read_rows(rec.kind.layer) and kg.row_reader(rec):
            keep = kg.graph.keep_mask(rec.op.inputs[0], {g.id: chosen})
            if not keep.all():
                for p in rec.kind.input_params():
                    p.variable.assign(np.asarray(p.variable) * p.mask(keep))
                done.add(rec.op.layer)
    consts.changed_layers(done)
    finish()
    return report
