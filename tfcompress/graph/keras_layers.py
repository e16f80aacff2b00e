"""Keras layers that stripping puts in place of normalizations it cannot express with fewer channels otherwise.

A normalization over the channel axis computes statistics from every channel, so removing a channel from its
input changes every output unless the statistics still count it. A removed channel is a constant (the same
value at every position: 0 for a pruned filter, or a bias), so its part of a sum or a sum of squares is known
in advance: each layer here keeps those parts in its config and adds them to the statistics of the channels it
still reads. The weights and the rest of the config are the original layer's.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

__all__ = ["PartialGroupNormalization", "PartialLayerNormalization", "PartialRMSNormalization",
           "PartialUnitNormalization", "PARTIAL_NORMALIZATIONS"]


def _floats(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values]


def _upcast(x):
    """``x`` in the precision Keras's normalizations compute in: at least float32."""
    return ops.cast(x, keras.backend.result_type(x.dtype, "float32"))


def _weight(w, x):
    return ops.cast(w, x.dtype)


def _moments(x, removed: list[float]):
    """Mean and variance over the last axis of ``x`` extended by the constant channels ``removed``."""
    r = np.asarray(removed, np.float64)
    n = float(x.shape[-1] + r.size)
    mean = (ops.sum(x, axis=-1, keepdims=True) + float(r.sum())) / n
    sq = ops.sum(ops.square(x - mean), axis=-1, keepdims=True)
    return mean, (sq + float(np.square(r).sum()) - 2.0 * mean * float(r.sum()) + r.size * mean * mean) / n


class _RemovedChannels:
    """A normalization with ``removed_values`` in its config: the constants of its removed input channels."""

    def __init__(self, removed_values: Sequence[float] = (), **kwargs):
        super().__init__(**kwargs)
        self.removed_values = _floats(removed_values)

    def get_config(self):
        return {**super().get_config(), "removed_values": list(self.removed_values)}


@keras.saving.register_keras_serializable(package="tfcompress")
class PartialLayerNormalization(_RemovedChannels, keras.layers.LayerNormalization):
    """LayerNormalization over the channel axis of a tensor from which constant channels were removed: the
    kept channels are normalised with the mean and variance of the original vector, kept channels plus
    ``removed_values``.

    Args:
        removed_values: the constant values of the removed input channels.
        **kwargs: as for ``keras.layers.LayerNormalization`` (``axis`` must be -1, no ``rms_scaling``).
    """

    def call(self, inputs):
        x = _upcast(inputs)
        mean, var = _moments(x, self.removed_values)
        out = (x - mean) * ops.rsqrt(var + self.epsilon)
        if self.scale:
            out = out * _weight(self.gamma, x)
        if self.center:
            out = out + _weight(self.beta, x)
        return ops.cast(out, self.compute_dtype)


@keras.saving.register_keras_serializable(package="tfcompress")
class PartialRMSNormalization(_RemovedChannels, keras.layers.RMSNormalization):
    """RMSNormalization over the channel axis whose mean of squares still counts the removed constant
    channels ``removed_values``.

    Args:
        removed_values: the constant values of the removed input channels.
        **kwargs: as for ``keras.layers.RMSNormalization`` (``axis`` must be -1).
    """

    def call(self, x):
        x = _upcast(x)
        r = np.asarray(self.removed_values, np.float64)
        n = float(x.shape[-1] + r.size)
        mean_sq = (ops.sum(ops.square(x), axis=-1, keepdims=True) + float(np.square(r).sum())) / n
        return ops.cast(x * ops.rsqrt(mean_sq + self.epsilon) * _weight(self.scale, x), self.compute_dtype)


@keras.saving.register_keras_serializable(package="tfcompress")
class PartialUnitNormalization(_RemovedChannels, keras.layers.UnitNormalization):
    """UnitNormalization (L2 over the channel axis) whose norm still counts the removed constant channels
    ``removed_values``.

    Args:
        removed_values: the constant values of the removed input channels.
        **kwargs: as for ``keras.layers.UnitNormalization`` (``axis`` must be -1).
    """

    def call(self, inputs):
        x = _upcast(inputs)
        square_sum = ops.sum(ops.square(x), axis=-1, keepdims=True) + float(np.square(self.removed_values).sum())
        return ops.cast(x * ops.minimum(ops.rsqrt(square_sum), 1e12), self.compute_dtype)  # Keras's epsilon


@keras.saving.register_keras_serializable(package="tfcompress")
class PartialGroupNormalization(keras.layers.GroupNormalization):
    """GroupNormalization over the channel axis after channels were removed: groups may then hold different
    numbers of channels, and each group's mean and variance (over its channels and all positions) still count
    its removed constant channels.

    Args:
        channel_groups: for every kept channel, the index of its group (non-decreasing).
        removed_values: per group, the constant values of its removed channels.
        **kwargs: as for ``keras.layers.GroupNormalization`` (``axis`` must be -1; ``groups`` is the original
            number of groups).
    """

    def __init__(self, channel_groups: Sequence[int] = (), removed_values: Sequence[Sequence[float]] = (),
                 **kwargs):
        super().__init__(**kwargs)
        self.channel_groups = [int(g) for g in channel_groups]
        self.removed_values = [_floats(v) for v in removed_values]

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if len(self.channel_groups) != channels:
            raise ValueError(f"channel_groups names {len(self.channel_groups)} channels; the input has {channels}")
        # the one-hot membership matrix (channels, groups): sums per group are one matmul
        member = np.zeros((channels, len(self.removed_values)), np.float32)
        member[np.arange(channels), self.channel_groups] = 1.0
        self._member = member
        self.gamma = self.add_weight(shape=(channels,), name="gamma", initializer=self.gamma_initializer,
                                     regularizer=self.gamma_regularizer, constraint=self.gamma_constraint) \
            if self.scale else None
        self.beta = self.add_weight(shape=(channels,), name="beta", initializer=self.beta_initializer,
                                    regularizer=self.beta_regularizer, constraint=self.beta_constraint) \
            if self.center else None
        self.built = True

    def call(self, inputs):
        x = _upcast(inputs)
        member = ops.cast(self._member, x.dtype)
        axes = list(range(1, len(x.shape) - 1))  # the positions
        positions = float(np.prod([int(d) for d in x.shape[1:-1]]))
        removed = [np.asarray(v, np.float64) for v in self.removed_values]
        r_count = np.array([v.size for v in removed], np.float64)
        # a group left with no channel at all is never read: any count will do
        count = np.maximum(positions * (self._member.sum(axis=0) + r_count), 1.0)
        r_sum, r_sq, r_count, count = (ops.convert_to_tensor(np.asarray(v, np.float64), x.dtype) for v in (
            [v.sum() for v in removed], [np.square(v).sum() for v in removed], r_count, count))

        def per_group(t):  # (batch, positions..., channels) -> (batch, groups)
            return ops.matmul(ops.sum(t, axis=axes) if axes else t, member)

        def per_channel(g):  # (batch, groups) -> (batch, 1..., channels)
            return ops.reshape(ops.matmul(g, ops.transpose(member)), (-1,) + (1,) * len(axes) + (x.shape[-1],))

        mean = (per_group(x) + positions * r_sum) / count
        centred = x - per_channel(mean)
        var = (per_group(ops.square(centred)) + positions * (r_sq - 2.0 * mean * r_sum + r_count * mean * mean)) / count
        out = centred * per_channel(ops.rsqrt(var + self.epsilon))
        if self.scale:
            out = out * _weight(self.gamma, x)
        if self.center:
            out = out + _weight(self.beta, x)
        return ops.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "channel_groups": list(self.channel_groups),
                "removed_values": [list(v) for v in self.removed_values]}


PARTIAL_NORMALIZATIONS = (PartialGroupNormalization, PartialLayerNormalization, PartialRMSNormalization,
                          PartialUnitNormalization)
