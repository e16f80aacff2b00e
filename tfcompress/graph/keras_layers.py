"""Keras layers that stripping puts in place of layers it cannot express with fewer channels otherwise."""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

__all__ = ["PartialLayerNormalization"]


@keras.saving.register_keras_serializable(package="tfcompress")
class PartialLayerNormalization(keras.layers.LayerNormalization):
    """LayerNormalization over the channel axis of a tensor from which constant channels were removed.

    Normalisation statistics depend on every channel, so removing a channel from a LayerNormalization's
    input changes its output unless the statistics still count it. This layer normalises the kept channels
    with the mean and variance of the original vector: kept channels plus ``removed_values`` (the removed
    channels' constant values, the same at every position).

    Args:
        removed_values: the constant values of the removed input channels.
        **kwargs: as for ``keras.layers.LayerNormalization`` (``axis`` must be -1).
    """

    def __init__(self, removed_values: Sequence[float] = (), **kwargs):
        super().__init__(**kwargs)
        self.removed_values = [float(v) for v in removed_values]

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        r = ops.convert_to_tensor(self.removed_values, dtype=x.dtype)
        n = float(x.shape[-1] + len(self.removed_values))
        mean = (ops.sum(x, axis=-1, keepdims=True) + ops.sum(r)) / n
        sq = ops.sum(ops.square(x - mean), axis=-1, keepdims=True)
        var = (sq + ops.sum(ops.square(r)) - 2.0 * mean * ops.sum(r) + len(self.removed_values) * mean * mean) / n
        out = (x - mean) * ops.rsqrt(var + self.epsilon)
        if self.scale:
            out = out * self.gamma
        if self.center:
            out = out + self.beta
        return ops.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "removed_values": list(self.removed_values)}
