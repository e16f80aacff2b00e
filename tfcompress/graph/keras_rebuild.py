"""Re-create a Keras model layer by layer from its analysed graph (used by stripping and by QAT).

Nested sub-models come out inlined; shared layers stay shared; inputs keep their names and the outputs their
structure. The caller decides what each new layer is and may rewrite the tensors each call receives.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import keras
import numpy as np

from tfcompress.graph.keras_adapter import KerasGraph

__all__ = ["layer_config", "layer_from_config", "rebuild"]

MakeLayer = Callable[[Any], "tuple[keras.layers.Layer, list[np.ndarray] | None]"]
RewriteArgs = Callable[[Any, tuple, dict], "tuple[tuple, dict]"]


def layer_config(layer: keras.layers.Layer, path: str, cfg: dict | None = None) -> dict:
    """The config a layer at ``path`` is re-created from (``cfg``: the layer's own by default): a nested
    layer's name flattened (``"sub/conv"`` becomes ``"sub_conv"``, unique in the inlined model), and the
    activation as the function itself, since a lambda's serialized config loads only in Keras's unsafe mode."""
    cfg = layer.get_config() if cfg is None else cfg
    if "/" in path:
        cfg["name"] = path.replace("/", "_")
    if callable(getattr(layer, "activation", None)) and "activation" in cfg:
        cfg["activation"] = layer.activation
    return cfg


def layer_from_config(cls: type, cfg: dict, layer: keras.layers.Layer) -> keras.layers.Layer:
    """``cls.from_config(cfg)``, except that a new ``Lambda`` calls the very function ``layer`` calls: a
    lambda's config holds its byte code, which Keras loads only in unsafe mode and then runs with Keras's
    module globals instead of the user's (a lambda naming ``ops`` or ``tf`` would fail)."""
    if cls is keras.layers.Lambda and isinstance(layer, keras.layers.Lambda):
        return keras.layers.Lambda(layer.function, output_shape=layer._output_shape, mask=layer.mask,
                                   arguments=layer.arguments, name=cfg["name"], dtype=layer.dtype_policy,
                                   trainable=cfg.get("trainable", True))
    return cls.from_config(cfg)


def rebuild(kg: KerasGraph, make_layer: MakeLayer, rewrite_args: RewriteArgs | None = None) -> keras.Model:
    """A new Functional model with ``make_layer(record)`` for every layer of ``kg.model``.

    Args:
        make_layer: called once per layer (shared layers once), returns the new layer and the weights to set
            once it is built (``None``: keep what it has; a shorter list: its first weights). The layer is the
            one the record's kind describes: for a ``TimeDistributed`` call the wrapped layer, which the kind
            then wraps again (``kind.wrap``).
        rewrite_args: called before every layer call with the new input tensors; returns the arguments to use
            (e.g. with quantizers inserted).
    """
    new: dict[int, Any] = {}  # tensor id -> new KerasTensor
    layers: dict[str, keras.layers.Layer] = {}
    pending: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []
    fmodel = kg.model._functional if isinstance(kg.model, keras.Sequential) else kg.model
    inputs = []
    for t, tid in zip(fmodel.inputs, kg.input_ids):
        new[tid] = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history[0].name)
        inputs.append(new[tid])
    for rec in kg.records:
        if rec.node is None or rec.part:
            continue
        if rec.op.layer not in layers:
            layer, weights = make_layer(rec)
            layer = rec.kind.wrap(layer, rec.op.layer)
            layers[rec.op.layer] = layer
            if weights is not None:
                pending.append((layer, weights))
        args, kwargs = rec.node.arguments.fill_in({k: new[tid] for k, tid in rec.scope.items()})
        if rewrite_args is not None:
            args, kwargs = rewrite_args(rec, args, kwargs)
        outs = keras.tree.flatten(layers[rec.op.layer](*args, **kwargs))
        for tid, t in zip(rec.op.outputs, outs):
            new[tid] = t
    model = keras.Model(
        keras.tree.pack_sequence_as(fmodel._inputs_struct, inputs),
        keras.tree.pack_sequence_as(fmodel._outputs_struct, [new[tid] for tid in kg.output_ids]),
        name=kg.model.name,
    )
    for layer, weights in pending:
        _set_leading_weights(layer, weights)
    if kg.model.compiled:
        try:
            model.compile_from_config(kg.model.get_compile_config())
        except Exception as e:  # a custom loss or metric that does not deserialise: leave it to the user
            warnings.warn(f"rebuilt model left uncompiled: {e}", stacklevel=3)
    return model


def _set_leading_weights(layer: keras.layers.Layer, weights: list[np.ndarray]) -> None:
    """Set the layer's first ``len(weights)`` weights (its own come before those of its sub-layers, so a QAT
    twin's extra quantizer ranges keep their initial values), then let the layer derive its state from them
    (``finalize_state``, as Keras's weight loaders do: an adapted ``Normalization`` computes with tensors made
    from its ``mean`` / ``variance`` variables there, not with the variables themselves)."""
    variables = layer.weights
    if len(weights) >= len(variables):  # set_weights checks count and shapes with a clear message
        layer.set_weights([np.asarray(w, dtype=v.dtype) for w, v in zip(weights, variables)] + weights[len(variables):])
    else:
        for v, w in zip(variables, weights):
            v.assign(np.asarray(w, dtype=v.dtype))
    if variables and hasattr(layer, "finalize_state"):
        layer.finalize_state()
