"""Op value semantics, written once over numpy arrays and shared by the Keras and GraphDef adapters.

One table maps a canonical op name ("conv", "batchnorm", "add", "pad", ...) to what the channel engine needs
to know about the op's values: the per-channel constant its output holds given per-channel constant inputs
(NaN: not constant) and its parameters, and its multiply-accumulates given channel counts. An adapter reads
its layer's or node's parameters, names the canonical op and calls :func:`const_out` / :func:`macs`; it never
re-implements the arithmetic. Kernel arithmetic (constants through a kernel, folding a constant input into a
bias, slicing) is in :mod:`tfcompress.graph.kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tfcompress.graph.kernels import depthwise_consts, producer_consts

__all__ = ["OpSemantics", "OPS", "can_fold", "const_out", "macs", "take_channels"]

Consts = list[np.ndarray]


@dataclass(frozen=True)
class OpSemantics:
    """What one canonical op does to values.

    ``consts(in_consts, **params)``: the output's per-channel constants. ``macs(in_counts, out_count,
    **params)``: multiply-accumulates per example (None: the op's MACs are not counted). ``folds(**params)``:
    whether a removed input channel holding a constant can be replaced exactly by a change of the op's bias
    (:func:`tfcompress.graph.kernels.fold_into_bias`) or, for a normalization, kept in its statistics.
    """

    consts: Callable[..., np.ndarray]
    macs: Callable[..., float] | None = None
    folds: Callable[..., bool] = lambda **params: False


def _product(cs: Consts) -> np.ndarray:
    out = np.prod(cs, axis=0)
    out[np.any([c == 0 for c in cs], axis=0)] = 0.0  # 0 * anything = 0, even an unknown
    return out


def _same_or_nan(cs: Consts) -> np.ndarray:
    """Inputs stacked along a non-channel axis: a channel is constant where every input holds the same value."""
    out = cs[0].copy()
    for c in cs[1:]:
        out[c != out] = np.nan
    return out


def _nonzero_unknown(cs: Consts) -> np.ndarray:
    """A zero stays zero, anything else is no longer constant (zero padding, a sum over positions)."""
    c = cs[0].copy()
    c[c != 0] = np.nan
    return c


def _batchnorm(cs: Consts, gamma, beta, mean, var, epsilon: float) -> np.ndarray:
    out = gamma * (cs[0] - mean) / np.sqrt(var + epsilon) + beta
    return np.where(gamma == 0, beta, out)  # gamma 0 gives beta whatever the input


def _layernorm(cs: Consts, gamma, beta) -> np.ndarray:
    """Statistics over all channels make every output unknown, except where gamma is 0 (the constant beta)."""
    return np.where(gamma == 0, beta, np.nan)


def _producer(cs: Consts, kernel, bias) -> np.ndarray:
    """``kernel`` as (..., in, out): an all-zero column gives the bias, whatever the input."""
    return producer_consts(kernel) + bias


def _depthwise(cs: Consts, kernel, bias, valid_padding: bool) -> np.ndarray:
    return depthwise_consts(kernel, cs[0], valid_padding) + bias


def _conv_macs(in_counts: list[int], out_count: int, positions: float, window: int = 1, groups: int = 1) -> float:
    """Each output position of each output channel reads ``window`` x its group's input channels."""
    return float(positions * window * in_counts[0] * out_count / groups)


def _depthwise_macs(in_counts: list[int], out_count: int, positions: float, window: int) -> float:
    return float(positions * window * out_count)


def _transposed_macs(in_counts: list[int], out_count: int, in_positions: float, window: int) -> float:
    """Every input position scatters a whole kernel window into every output channel."""
    return float(in_positions * window * in_counts[0] * out_count)


def _separable_macs(in_counts: list[int], out_count: int, positions: float, window: int, multiplier: int) -> float:
    """A depthwise pass (window x multiplier per input channel) and a pointwise one, per output position."""
    return float(positions * in_counts[0] * multiplier * (window + out_count))


def _conv_folds(valid_padding: bool, window: int) -> bool:
    """Exact when every output position sees the whole window of the constant: no padding, or a 1x1 kernel."""
    return valid_padding or window == 1


OPS: dict[str, OpSemantics] = {
    "conv": OpSemantics(_producer, _conv_macs, _conv_folds),
    "dense": OpSemantics(_producer, _conv_macs, lambda: True),
    "conv_transpose": OpSemantics(_producer, _transposed_macs),
    "separable_conv": OpSemantics(_producer, _separable_macs),
    "depthwise": OpSemantics(_depthwise, _depthwise_macs),
    "batchnorm": OpSemantics(_batchnorm),
    "layernorm": OpSemantics(_layernorm, folds=lambda: True),
    "add": OpSemantics(lambda cs: np.sum(cs, axis=0)),
    "sub": OpSemantics(lambda cs: cs[0] - cs[1]),
    "mul": OpSemantics(_product),
    "div": OpSemantics(lambda cs: cs[0] / cs[1]),
    "mean": OpSemantics(lambda cs: np.mean(cs, axis=0)),
    "max": OpSemantics(lambda cs: np.max(cs, axis=0)),
    "min": OpSemantics(lambda cs: np.min(cs, axis=0)),
    "squared_difference": OpSemantics(lambda cs: (cs[0] - cs[1]) ** 2),
    "concat": OpSemantics(np.concatenate),
    "stack_spatial": OpSemantics(_same_or_nan),
    "zero_pad": OpSemantics(_nonzero_unknown),
    "sum_positions": OpSemantics(_nonzero_unknown),
    "identity": OpSemantics(lambda cs: cs[0].copy()),
}


def const_out(op: str, in_consts: Consts, **params) -> np.ndarray:
    """The per-channel constants of canonical op ``op``'s output (NaN: not constant)."""
    return OPS[op].consts(in_consts, **params)


def macs(op: str, in_counts: list[int], out_count: int, **params) -> float:
    """Multiply-accumulates per example of canonical op ``op`` with the given channel counts (0 if uncounted)."""
    fn = OPS[op].macs
    return 0.0 if fn is None else fn(in_counts, out_count, **params)


def can_fold(op: str, **params) -> bool:
    """Whether canonical op ``op`` can absorb a removed constant input channel (see :class:`OpSemantics`)."""
    return OPS[op].folds(**params)


def take_channels(w: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    """``w`` without the channels ``keep`` drops along ``axis`` (a per-channel parameter being sliced)."""
    return np.take(w, np.nonzero(keep)[0], axis=axis)


def positions(shape: tuple) -> int:
    """Spatial positions of a channels-last (batch, ..., channels) shape (unknown dimensions count 1)."""
    return math.prod(d for d in shape[1:-1] if d)
