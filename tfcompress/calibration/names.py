"""The user's layer names for the ops of an OpenVINO model converted from a TF SavedModel.

TF names every op of a traced Keras model ``<call wrappers>/<model>/<layer>/<op>``
(``StatefulPartitionedCall/model_1/conv2d_5_1/BiasAdd``), and the converters keep those names on the ops they
translate one to one. Ops that OpenVINO rebuilt while fusing (a convolution with its BatchNormalization
folded in becomes ``Multiply_5130``) lose theirs; the bias ``Add`` after them keeps the name of the layer
that added the bias (the convolution's, or its BatchNormalization's).

TF also makes every name scope unique within the traced graph, so a layer's scope can carry a suffix:
Keras 3's ``model.export`` traces layer ``batch_normalization_1`` as ``batch_normalization_1_2``. Given the
model's layer names (all, or only those of the layers with weights), :func:`layer_names` undoes it.
"""

from __future__ import annotations

import re
from typing import Iterable

from tfcompress.calibration.placement import bias_input

__all__ = ["layer_names", "scope_layer"]

_WRAPPERS = re.compile(r"^(StatefulPartitionedCall|PartitionedCall)(_\d+)?$")


def scope_layer(name: str) -> str | None:
    """The layer component of a TF op name (``.../model_1/conv2d_5_1/BiasAdd`` -> ``conv2d_5_1``), or None
    for a name without one (``Multiply_5130``)."""
    parts = [p for p in name.split("/") if p]
    while parts and _WRAPPERS.match(parts[0]):
        parts = parts[1:]
    return parts[1] if len(parts) >= 3 else None


def _own_scope(op) -> str | None:
    """The layer scope of ``op``, or of its bias Add when ``op`` lost its name in a fusion."""
    scope = scope_layer(op.get_friendly_name())
    if scope is None and op.get_output_size() == 1:
        bias = bias_input(op)
        if bias is not None:
            scope = scope_layer(bias.get_node().get_friendly_name())
    return scope


def _strip_suffix(scope: str) -> str:
    return re.sub(r"_\d+$", "", scope)


def _suffixed(scopes: set[str], known: set[str]) -> bool:
    """Whether the scopes read as layer names plus TF's ``_<n>`` suffix rather than as the names themselves:
    the reading that explains more scopes wins (``conv2d_1`` is layer ``conv2d_1`` in one convention and
    layer ``conv2d`` in the other, so they cannot be mixed)."""
    exact = sum(s in known for s in scopes)
    stripped = sum(s != _strip_suffix(s) and _strip_suffix(s) in known for s in scopes)
    return stripped > exact
def layer_names(model, ops: Iterable, known: Iterable[str] | None = None) -> dict[str, str]:
    """For each op of ``ops`` (nodes of ``model``): the name the user knows it by, keyed by friendly name.

    That is its layer's scope (see the module docstring), without TF's uniqueness suffix when ``known`` (the
    model's layer names, e.g. ``[layer.name for layer in keras_model.layers]``, or those of its weighted
    layers only) shows the scopes carry one; an op with no scope keeps its friendly name. A convolution
    whose BatchNormalization was folded into it goes by the BatchNormalization's name.
    """
    scopes = {op.get_friendly_name(): _own_scope(op) for op in ops}
    every = {_own_scope(op) for op in model.get_ordered_ops()} - {None}
    strip = known is not None and _suffixed(every, set(known))
    return {name: (_strip_suffix(scope) if strip else scope) if scope else name for name, scope in scopes.items()}
