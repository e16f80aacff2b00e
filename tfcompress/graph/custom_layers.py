"""Custom Keras layers: the public way to declare a layer's channel rule (:func:`register_layer`).

Pruning, both strippers' Keras side and QAT read the declared rule through :func:`registered_rule`; a layer
nobody declared and Keras does not define blocks the channels reaching it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import keras

from tfcompress.graph import ops
from tfcompress.graph.engine import Rule

__all__ = ["LAYER_RULES", "LayerRule", "register_layer", "registered_rule"]

@dataclasses.dataclass(frozen=True)
class LayerRule:
    """The channel rule of a custom layer, as declared with :func:`register_layer`."""

    rule: str
    channel_weights: tuple[str, ...] = ()
    resize_config: Callable[[dict, int], dict] | None = None
    op: str | None = None
    params: Callable[[Any], dict] | None = None


LAYER_RULES = ("elementwise", "blocker")
# class (or "module.QualName", to name a class without importing it) -> its rule
_REGISTRY: dict[Any, LayerRule] = {
    "keras.src.applications.convnext.LayerScale": LayerRule(
        "elementwise", ("gamma",), lambda cfg, n: {**cfg, "projection_dim": n}),
    "keras.src.applications.inception_resnet_v2.CustomScaleLayer": LayerRule("elementwise"),  # x + r * scale
}


def register_layer(
    cls: type,
    rule: str = "elementwise",
    channel_weights: Sequence[str] = (),
    resize_config: Callable[[dict, int], dict] | None = None,
    op: str | None = None,
    params: Callable[[Any], dict] | None = None,
) -> None:
    """Declare how a custom Keras layer maps channels, so that pruning, stripping and QAT go through it.

    Args:
        cls: the layer class (its subclasses inherit the rule unless registered themselves).
        rule: ``"elementwise"``: output channel c depends only on channel c of each input, the same function
            at every position (activations, per-channel scales; with several inputs of the same channels, a
            join like ``Add``); the layer's own ``call`` on per-channel constants tells stripping what a
            constant channel becomes, unless ``op`` names it. ``"blocker"``: channels reaching the layer are
            never removed.
        op: the canonical op the layer computes, from :data:`tfcompress.graph.ops.OPS` (a position-wise one:
            ``"relu6"``, ``"hard_silu"``, ``"gelu"``, ``"leaky_relu"``, ``"clip"``, ``"add"``, ``"mul"``,
            ``"max"``, ``"identity"``, ``"zero_pad"`` ...; ``sorted(tfcompress.graph.ops.UNARY)`` lists the
            activations). Stripping then follows constants through the op's own numpy semantics, as for
            Keras's built-in layers, instead of running the layer.
        params: ``f(layer) -> dict``: the op's parameters read from a layer (``lambda l: {"x_min": 0.0,
            "x_max": l.cap}`` for ``"clip"``); none by default.
        channel_weights: the weights whose last axis is indexed by channels (attribute names, such as
            ``"gamma"`` for ``self.gamma``, or weight names); stripping slices them.
        resize_config: ``f(config, channels) -> config`` for a layer whose config names its channel count
            (e.g. ``lambda c, n: {**c, "units": n}``); stripping calls it with the kept count.

    Example:
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.s = self.add_weight(shape=(shape[-1],), name="s")
        ...     def call(self, x):
        ...         return x * self.s
        >>> tfcompress.register_layer(Scale, "elementwise", channel_weights=["s"])
    """
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise ValueError(f"register_layer needs a keras.layers.Layer subclass, got {cls!r}")
    if rule not in LAYER_RULES:
        raise ValueError(f"unknown rule {rule!r} for {cls.__name__}; choose one of {list(LAYER_RULES)}")
    names = tuple(channel_weights)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"channel_weights must be weight names (strings), got {list(channel_weights)!r}")
    if op is not None and (op not in ops.OPS or ops.OPS[op].rule is not Rule.ELEMENTWISE or rule != "elementwise"):
        position_wise = sorted(k for k, v in ops.OPS.items() if v.rule is Rule.ELEMENTWISE)
        raise ValueError(f"op {op!r} for {cls.__name__} is not a position-wise canonical op (with rule "
                         f"'elementwise'); choose one of {position_wise}")
    if params is not None and not callable(params):
        raise ValueError(f"params must be a function of the layer returning the op's parameters, got {params!r}")
    _REGISTRY[cls] = LayerRule(rule, names, resize_config, op, params)


def registered_rule(layer: Any) -> LayerRule | None:
    """The rule declared for ``layer``'s class or its nearest registered base class, if any."""
    for klass in type(layer).__mro__:
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            if key in _REGISTRY:
                return _REGISTRY[key]
    return None
