"""Physically remove zeroed channels from a Keras model."""

from __future__ import annotations

import warnings

import keras
import numpy as np

from tfcompress.graph.keras_adapter import KerasGraph, build_graph
from tfcompress.graph.keras_rebuild import layer_config, layer_from_config, rebuild

__all__ = ["strip"]


def strip(model: keras.Model) -> keras.Model:
    """A new, physically smaller Functional model without the channels that are zero across their group.

    A channel goes only when removing it cannot change the model's outputs: every consumer sees exactly
    0 there, or a constant (a zero filter with a bias, an activation with f(0) != 0) that the consumer folds
    into its bias exactly (Dense, valid or 1x1 convolutions). Anything else is kept. Consumers' input
    weights are sliced to match. Nested sub-models are inlined. ``model`` is not modified.

    Args:
        model: a Sequential or Functional model, typically trained with
            :class:`tfcompress.pruning.FilterPruning` or edited with :func:`tfcompress.zero_channels`.

    Returns:
        A Functional model with the same inputs and outputs, compiled like ``model`` if it was compiled.

    Raises:
        tfcompress.graph.UnsupportedModelError: for a subclassed model.
    """
    kg = build_graph(model)
    removed, consts = kg.graph.plan_removal()
    removed = {gid: mask for gid, mask in removed.items() if mask.any()}
    return _rebuild(kg, removed, consts)


def _rebuild(kg: KerasGraph, removed: dict[int, np.ndarray], consts: dict[int, np.ndarray]) -> keras.Model:
    graph = kg.graph

    def make_layer(rec):
        op, layer = rec.op, rec.kind.layer
        reads = rec.read_tensors()
        in_keeps = [graph.keep_mask(t, removed) for t in reads]
        out_keep = graph.keep_mask(op.outputs[0], removed) if len(op.outputs) == 1 else None
        folds = [np.where(k, 0.0, np.nan_to_num(consts[t])) for k, t in zip(in_keeps, reads)]
        changed = not all(k.all() for k in in_keeps) or out_keep is not None and not out_keep.all()
        new = _new_layer(layer, op.layer, rec.kind, in_keeps, out_keep, folds, changed)
        if new is layer or not isinstance(layer, keras.layers.Layer):  # a keras.ops node has no weights
            return new, None
        return new, rec.kind.weights(in_keeps, out_keep, folds) if changed else rec.kind.current_weights()

    def rewrite_args(rec, args, kwargs):
        if len(rec.op.outputs) != 1:
            return args, kwargs
        in_keeps = [graph.keep_mask(t, removed) for t in rec.op.inputs]
        return rec.kind.arguments(args, kwargs, graph.keep_mask(rec.op.outputs[0], removed), in_keeps)

    return rebuild(kg, make_layer, rewrite_args)


def _new_layer(layer, path, kind, in_keeps, out_keep, folds, changed) -> keras.layers.Layer:
    cfg = layer_config(layer, path, kind.config(in_keeps, out_keep, folds) if changed else None)
    if changed:  # masks of pruned channels (from quantize_model) refer to the old channel count: the layer's
        for key, value in list(cfg.items()):  # own constraint they wrap stays
            if key.endswith("_constraint") and isinstance(value, dict) and value.get("class_name") == "ChannelMask":
                cfg[key] = value.get("config", {}).get("inner")
    if changed and kind.needs_bias(folds):
        cfg["use_bias"] = True
    try:
        return layer_from_config(kind.rebuilt_class() if changed else type(layer), cfg, layer)
    except Exception as e:
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if changed:
            raise ValueError(f"cannot rebuild layer {path!r} ({type(layer).__name__}) with fewer channels: {why}")
        warnings.warn(
            f"layer {path!r} ({type(layer).__name__}) cannot be re-created from its config ({why}); "
            "the stripped model shares it with the original.",
            stacklevel=4,
        )
        return layer
