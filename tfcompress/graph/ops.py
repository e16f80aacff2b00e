"""Op semantics, written once over numpy arrays and shared by the Keras and GraphDef adapters.

One table, :data:`OPS`, maps a canonical op name ("conv", "batchnorm", "add", "zero_pad", "gelu", ...) to all
the channel engine needs to know about it: its channel rule, the per-channel constant its output holds given
per-channel constant inputs (NaN: not constant) and its parameters, whether a removed constant input folds
into it, and its multiply-accumulates given channel counts. :data:`UNARY` holds the position-wise activations.
An adapter only translates: it names the canonical op of a layer or node, reads its parameters and calls
:func:`rule` / :func:`const_out` / :func:`can_fold` / :func:`macs`; it never re-implements the arithmetic.
Kernel arithmetic (constants through a kernel, folding a constant input into a bias, slicing) is in
:mod:`tfcompress.graph.kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tfcompress.graph.engine import Rule, elementwise_consts
from tfcompress.graph.kernels import depthwise_consts, fold_into_bias, producer_consts, slice_kernel

__all__ = ["OpSemantics", "TableOp", "OPS", "UNARY", "can_fold", "const_out", "folds_into_bias", "kept_bounds",
           "macs", "norm_groups", "rule", "shrink_producer", "take_channels"]

Consts = list[np.ndarray]


@dataclass(frozen=True)
class OpSemantics:
    """What one canonical op does to values.

    ``consts(in_consts, **params)``: the output's per-channel constants. ``macs(in_counts, out_count,
    **geometry)``: multiply-accumulates per example (None: the op's MACs are not counted). ``folds(**geometry)``:
    whether a removed input channel holding a constant can be replaced exactly by a change of the op's bias
    (:func:`tfcompress.graph.kernels.fold_into_bias`) or, for a normalization, kept in its statistics.
    ``rule``: how it maps channels (a position-wise op of several tensors joins them: :func:`rule`).
    ``into_bias``: whether the op has one kernel (..., in, out) and a bias that a removed input channel's constant
    (or mean) can be folded into at all, exactly or not (transposed and separable convolutions cannot).

    ``geometry`` is what an adapter knows of an op's shape, as keywords (each function reads the ones it needs):
    ``positions`` (output positions per example), ``in_positions``, ``window`` (kernel positions), ``groups``,
    ``multiplier`` (depth multiplier) and ``valid_padding``; a recurrent layer's ``kernel_columns`` and
    ``recurrent_macs``; an attention layer's heads' ``input_positions``, ``head_columns``, ``query_positions``,
    ``key_positions``, ``key_dim`` and ``value_dim``; a contraction's ``contracted`` inputs and ``key_positions``.
    """

    consts: Callable[..., np.ndarray]
    macs: Callable[..., float] | None = None
    folds: Callable[..., bool] = lambda **geometry: False
    rule: Rule = Rule.ELEMENTWISE
    into_bias: bool = False


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


def _rms_norm(cs: Consts, gamma) -> np.ndarray:
    """``x * rsqrt(statistic over all channels) * gamma``: 0 where the input or gamma is 0, else unknown."""
    return np.where((gamma == 0) | (cs[0] == 0), 0.0, np.nan)


def _producer(cs: Consts, kernel, bias) -> np.ndarray:
    """``kernel`` as (..., in, out): an all-zero column gives the bias, whatever the input."""
    return producer_consts(kernel) + bias


def _depthwise(cs: Consts, kernel, bias, valid_padding: bool) -> np.ndarray:
    return depthwise_consts(kernel, cs[0], valid_padding) + bias


def _conv_macs(in_counts: list[int], out_count: int, positions: float, window: int = 1, groups: int = 1,
               **_) -> float:
    """Each output position of each output channel reads ``window`` x its group's input channels."""
    return float(positions * window * in_counts[0] * out_count / groups)


def _recurrent_macs(in_counts: list[int], out_count: int, in_positions: float, kernel_columns: int,
                    recurrent_macs: int, **_) -> float:
    """Every time step reads the input channels through ``kernel_columns`` (gates x units, summed over the
    directions) and the state through the recurrent kernels."""
    return float(in_positions * (in_counts[0] * kernel_columns + recurrent_macs))


def _head_consts(cs: Consts, value_kernel: np.ndarray, value_bias: np.ndarray) -> np.ndarray:
    """Per attention head, what it outputs as a multiple of its value bias: a head whose value kernel
    (in, heads, dims) is all zero outputs its value bias at every position (the attention weights sum to one), 1;
    0 when that bias is zero too; NaN for any other head."""
    heads = value_kernel.shape[1]
    zero = ~np.moveaxis(value_kernel, 1, 0).reshape(heads, -1).any(axis=1)
    return np.where(zero, value_bias.reshape(heads, -1).any(axis=1).astype(np.float64), np.nan)


def _attention_heads_macs(in_counts: list[int], out_count: int, input_positions: list[float],
                          head_columns: list[int], query_positions: float, key_positions: float, key_dim: int,
                          value_dim: int, **_) -> float:
    """``out_count`` heads: each input is read at each of its positions through ``head_columns`` projection
    columns per head; every head scores each query position against each key position over ``key_dim`` and sums
    ``value_dim`` values over the keys."""
    read = sum(p * c * k for p, c, k in zip(input_positions, in_counts, head_columns))
    return float(out_count * (read + query_positions * key_positions * (key_dim + value_dim)))


def _attention_output_macs(in_counts: list[int], out_count: int, positions: float, value_dim: int,
                           **_) -> float:
    """The output projection writes ``out_count`` channels from ``value_dim`` values of each kept head."""
    return float(positions * in_counts[0] * value_dim * out_count)


def _contracted(cs: Consts, passed: int | None = None, width: int = 0) -> np.ndarray:
    """The first output of a contraction: the passed input's channels, each a sum over positions weighted by
    values of the other input (0 stays 0, a constant does not stay); ``width`` unknown channels if none passes."""
    return _nonzero_unknown([cs[passed]]) if passed is not None else np.full(width, np.nan)


def _matmul_macs(in_counts: list[int], out_count: int, positions: float, contracted: list[int], inner: float,
                 columns: float, passed: int | None = None, **_) -> float:
    """``a @ b`` of two tensors: each of ``positions`` rows of the output's columns (the passed input's kept
    channels, else ``columns``) sums ``inner`` products (the kept channels of the ``contracted`` inputs, when
    the summed axis is theirs)."""
    return float(positions * (in_counts[contracted[0]] if contracted else inner)
                 * (out_count if passed is not None else columns))


def _attention_product_macs(in_counts: list[int], out_count: int, positions: float, key_positions: float,
                            contracted: list[int], dot: bool, **_) -> float:
    """A Keras ``Attention`` / ``AdditiveAttention``: a score per query and key position over the contracted
    channels (multiply-accumulates for a ``dot`` product; ``tanh(q + k)`` summed has none), then each query
    position's weighted sum of the value's ``out_count`` channels over the keys."""
    return float(positions * key_positions * (in_counts[contracted[0]] * dot + out_count))


def _depthwise_macs(in_counts: list[int], out_count: int, positions: float, window: int, **_) -> float:
    return float(positions * window * out_count)


def _transposed_macs(in_counts: list[int], out_count: int, in_positions: float, window: int, **_) -> float:
    """Every input position scatters a whole kernel window into every output channel."""
    return float(in_positions * window * in_counts[0] * out_count)


def _separable_macs(in_counts: list[int], out_count: int, positions: float, window: int, multiplier: int,
                    **_) -> float:
    """A depthwise pass (window x multiplier per input channel) and a pointwise one, per output position."""
    return float(positions * in_counts[0] * multiplier * (window + out_count))


def _conv_folds(valid_padding: bool, window: int, **_) -> bool:
    """Exact when every output position sees the whole window of the constant: no padding, or a 1x1 kernel."""
    return valid_padding or window == 1


def _prelu(cs: Consts, alpha: np.ndarray) -> np.ndarray:
    """PReLU with its learned ``alpha`` (channels last, possibly varying over positions too: then a negative
    constant is no longer constant)."""
    c = cs[0]
    a = alpha.reshape(-1, alpha.shape[-1]) if alpha.ndim else alpha.reshape(1, 1)
    slope = np.broadcast_to(a[0], c.shape) if np.all(a == a[:1]) else np.nan
    return np.where(c >= 0, c, slope * c)


def _compare(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Consts], np.ndarray]:
    """A comparison of two per-channel constants: 1.0 (true) or 0.0 (false), unknown where either is."""
    def consts(cs: Consts) -> np.ndarray:
        a, b = cs
        return np.where(np.isnan(a) | np.isnan(b), np.nan, fn(a, b).astype(np.float64))
    return consts


def _where(cs: Consts) -> np.ndarray:
    """``where(condition, x, y)``: the constant picked by a known condition, or the one both sides hold."""
    cond, x, y = cs
    picked = np.where(cond != 0, x, y)
    return np.where(np.isnan(cond), np.where(x == y, x, np.nan), picked)


def _unknown(cs: Consts, width: int | None = None) -> np.ndarray:
    """No output channel is a known constant (``width`` channels, or as many as the first input)."""
    return np.full(len(cs[0]) if width is None else width, np.nan)


# ----------------------------------------------------------------- unary activations, over numpy (float64)

def _slice(cs: Consts, bounds: list[tuple[int, int]]) -> list[np.ndarray]:
    """One output per ``(start, stop)`` range of the input's channels."""
    return [cs[0][a:b].copy() for a, b in bounds]


def kept_bounds(bounds: list[tuple[int, int]], keep: np.ndarray) -> list[tuple[int, int]]:
    """The channel ranges ``bounds`` of a tensor once the channels ``keep`` drops are gone."""
    before = np.concatenate([[0], np.cumsum(keep)]).astype(int)
    return [(int(before[a]), int(before[b])) for a, b in bounds]


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _erf(v):
    return np.vectorize(math.erf, otypes=[float])(v)


def _relu(v, negative_slope=0.0, max_value=None, threshold=0.0):
    """Keras's relu: ``negative_slope * (v - threshold)`` below the threshold, capped at ``max_value``."""
    out = np.where(v >= threshold, v, negative_slope * (v - threshold))
    return out if max_value is None else np.minimum(out, max_value)


def _hard_sigmoid(v):
    return np.clip(v + 3.0, 0.0, 6.0) / 6.0


def _gelu(v, approximate=False):
    if approximate:
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def _elu(v, alpha=1.0):
    return np.where(v > 0, v, alpha * np.expm1(v))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805
# canonical activation -> f(values, **params); each runs position by position on one channel
UNARY: dict[str, Callable[..., np.ndarray]] = {
    "linear": lambda v: v,
    "relu": _relu,
    "relu6": lambda v: np.clip(v, 0.0, 6.0),
    "leaky_relu": lambda v, negative_slope=0.2: np.where(v >= 0, v, negative_slope * v),
    "elu": _elu,
    "selu": lambda v: _SELU_SCALE * _elu(v, _SELU_ALPHA),
    "celu": lambda v, alpha=1.0: np.maximum(v, 0) + np.minimum(0, alpha * np.expm1(v / alpha)),
    "sigmoid": _sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "silu": lambda v: v * _sigmoid(v),
    "hard_silu": lambda v: v * _hard_sigmoid(v),
    "gelu": _gelu,
    "mish": lambda v: v * np.tanh(np.logaddexp(0.0, v)),
    "tanh": np.tanh,
    "softplus": lambda v: np.logaddexp(0.0, v),
    "softsign": lambda v: v / (1 + np.abs(v)),
    "log_sigmoid": lambda v: -np.logaddexp(0.0, -v),
    "exponential": np.exp,
    "neg": np.negative,
    "abs": np.abs,
    "square": np.square,
    "sqrt": np.sqrt,
    "rsqrt": lambda v: 1.0 / np.sqrt(v),
    "reciprocal": lambda v: 1.0 / v,
    "log": np.log,
    "log1p": np.log1p,
    "expm1": np.expm1,
    "erf": _erf,
    "erfc": lambda v: 1.0 - _erf(v),
    "floor": np.floor,
    "ceil": np.ceil,
    "round": np.round,
    "sign": np.sign,
    "sin": np.sin,
    "cos": np.cos,
    "clip": lambda v, x_min, x_max: np.clip(v, x_min, x_max),
    "rescale": lambda v, scale, offset: v * scale + offset,
}


def _fake_quant(v, lo, hi, num_bits: int = 8, narrow_range: bool = False):
    """TF's FakeQuantWithMinMaxVars: rounding to a grid nudged so that 0 is on it (a 0 stays 0)."""
    qmin, qmax = (1 if narrow_range else 0), 2 ** num_bits - 1
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    nlo, nhi = (qmin - zp) * scale, (qmax - zp) * scale
    return np.round((np.clip(v, nlo, nhi) - nlo) / scale) * scale + nlo


UNARY["fake_quant"] = _fake_quant


def _unary(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def consts(cs: Consts, **params) -> np.ndarray:
        with np.errstate(all="ignore"):
            return elementwise_consts(lambda v: fn(v, **params), cs[0])
    return consts


OPS: dict[str, OpSemantics] = {
    "input": OpSemantics(_unknown, rule=Rule.INPUT),
    "blocker": OpSemantics(_unknown, rule=Rule.BLOCKER),
    "shape": OpSemantics(_unknown, rule=Rule.SHAPE),
    "opaque": OpSemantics(_unknown),  # channels pass through, values are not followed
    "conv": OpSemantics(_producer, _conv_macs, _conv_folds, Rule.PRODUCER, into_bias=True),
    "dense": OpSemantics(_producer, _conv_macs, lambda **_: True, Rule.PRODUCER, into_bias=True),
    "conv_transpose": OpSemantics(_producer, _transposed_macs, rule=Rule.PRODUCER),
    # LSTM/GRU/SimpleRNN: input channels are read like a Dense layer's (a zero one can go); its units are not
    # followed (nothing is known of their values), and a constant input channel stays (no bias folding here)
    "recurrent": OpSemantics(_unknown, _recurrent_macs, rule=Rule.PRODUCER),
    # MultiHeadAttention as two ops. Its heads: the inputs are read through the rows of the query/key/value
    # projections (a constant input channel stays), each head is a channel made of its projection columns. Its
    # output projection, a kernel (heads, dims, out), reads the heads and writes the output channels; a removed
    # head that outputs its value bias is folded into the output bias
    "attention_heads": OpSemantics(_head_consts, _attention_heads_macs, rule=Rule.PRODUCER),
    "attention": OpSemantics(_producer, _attention_output_macs, lambda **_: True, Rule.PRODUCER),
    "separable_conv": OpSemantics(_producer, _separable_macs, rule=Rule.PRODUCER),
    # a product of two tensors summed over an axis: scores q . k^T, weights @ v (Rule.CONTRACT says which
    # inputs' channels are summed and which pass); a removed channel must add nothing: 0 in q or k
    "matmul": OpSemantics(_contracted, _matmul_macs, rule=Rule.CONTRACT),
    # Keras's Attention (q . k^T, or tanh(q + k) summed over the channels) and AdditiveAttention: scores over
    # the query and key channels, softmax over the key positions, the weighted sum of the value's channels
    "attention_product": OpSemantics(_contracted, _attention_product_macs, rule=Rule.CONTRACT),
    "depthwise": OpSemantics(_depthwise, _depthwise_macs, rule=Rule.DEPTHWISE),
    "batchnorm": OpSemantics(_batchnorm),
    "layernorm": OpSemantics(_layernorm, folds=lambda **_: True),
    "rms_norm": OpSemantics(_rms_norm, folds=lambda **_: True),
    "add": OpSemantics(lambda cs: np.sum(cs, axis=0)),
    "sub": OpSemantics(lambda cs: cs[0] - cs[1]),
    "mul": OpSemantics(_product),
    "div": OpSemantics(lambda cs: cs[0] / cs[1]),
    "mean": OpSemantics(lambda cs: np.mean(cs, axis=0)),
    "max": OpSemantics(lambda cs: np.max(cs, axis=0)),
    "min": OpSemantics(lambda cs: np.min(cs, axis=0)),
    "squared_difference": OpSemantics(lambda cs: (cs[0] - cs[1]) ** 2),
    # comparisons give a boolean per position (as 1.0 / 0.0 here); "where" picks between two tensors by one
    **{name: OpSemantics(_compare(fn)) for name, fn in (
        ("greater", np.greater), ("greater_equal", np.greater_equal), ("less", np.less),
        ("less_equal", np.less_equal), ("equal", np.equal), ("not_equal", np.not_equal))},
    "where": OpSemantics(_where),
    "concat": OpSemantics(np.concatenate, rule=Rule.CONCAT),
    "stack_spatial": OpSemantics(_same_or_nan),
    "zero_pad": OpSemantics(_nonzero_unknown),
    "sum_positions": OpSemantics(_nonzero_unknown),
    "scale_positions": OpSemantics(_nonzero_unknown),  # a scale varying over positions, not channels
    # a reduction over the channel axis (a normalization's mean or variance): reads every channel, creates none
    "channel_statistic": OpSemantics(_unknown, rule=Rule.SHAPE),
    "identity": OpSemantics(lambda cs: cs[0].copy()),
    "prelu": OpSemantics(_prelu),
    "flatten": OpSemantics(lambda cs, tile: np.tile(cs[0], tile), rule=Rule.FLATTEN),
    "slice": OpSemantics(_slice, rule=Rule.SLICE),  # several outputs: a list of constant vectors
    **{name: OpSemantics(_unary(fn)) for name, fn in UNARY.items()},
    "function": OpSemantics(_unary(lambda v, fn: fn(v))),  # a position-wise function given as ``fn``
}


def const_out(op: str, in_consts: Consts, **params) -> np.ndarray | list[np.ndarray]:
    """The per-channel constants of canonical op ``op``'s output (NaN: not constant); a list of them for an op
    with several outputs (``"slice"``)."""
    return OPS[op].consts(in_consts, **params)


def flatten_tile(in_shape: tuple, out_shape: tuple) -> int:
    """For a reshape of a static ``(N, d1, ..., dk, C)`` (k >= 1) to ``(N, d1 * ... * dk * C)``, a ``"flatten"``: how
    often the channels repeat along its last axis (``d1 * ... * dk``, row-major order). 0 for any other reshape."""
    if len(in_shape) < 3 or len(out_shape) != 2 or None in in_shape[1:]:
        return 0
    return math.prod(in_shape[1:-1]) if out_shape[-1] == math.prod(in_shape[1:]) else 0


def rule(op: str, n_inputs: int = 1) -> Rule:
    """The channel rule of canonical op ``op`` read by ``n_inputs`` channel-carrying tensors: a position-wise
    op of several tensors of the same channels joins them."""
    r = OPS[op].rule
    return Rule.JOIN if r is Rule.ELEMENTWISE and n_inputs > 1 else r


def macs(op: str, in_counts: list[int], out_count: int, **geometry) -> float:
    """Multiply-accumulates per example of canonical op ``op`` with the given channel counts (0 if uncounted)."""
    fn = OPS[op].macs
    return 0.0 if fn is None else fn(in_counts, out_count, **geometry)


def can_fold(op: str, **geometry) -> bool:
    """Whether canonical op ``op`` can absorb a removed constant input channel (see :class:`OpSemantics`)."""
    return OPS[op].folds(**geometry)


def folds_into_bias(op: str) -> bool:
    """Whether canonical op ``op`` can take a removed input channel's constant into its bias (at all, exactly or
    not: see :class:`OpSemantics`)."""
    return op in OPS and OPS[op].into_bias


def norm_groups(channels: int, groups: int) -> np.ndarray:
    """The group of each channel when GroupNormalization splits ``channels`` into ``groups`` equal consecutive
    groups (``groups == -1``: one per channel)."""
    groups = channels if groups == -1 else groups
    return np.arange(channels) // (channels // groups)


def take_channels(w: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    """``w`` without the channels ``keep`` drops along ``axis`` (a per-channel parameter being sliced)."""
    return np.take(w, np.nonzero(keep)[0], axis=axis)


def shrink_producer(kernel: np.ndarray, bias: np.ndarray, in_keep: np.ndarray, out_keep: np.ndarray,
                    fold: np.ndarray, blocks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A producer's (..., in, out) ``kernel`` and ``bias`` without the removed channels; a removed input channel
    holding the constant ``fold`` (0 elsewhere) is folded into the bias."""
    bias = bias + fold_into_bias(kernel, in_keep, fold, blocks)
    return slice_kernel(kernel, in_keep, out_keep, blocks), bias[out_keep]


def positions(shape: tuple) -> int:
    """Spatial positions of a channels-last (batch, ..., channels) shape (unknown dimensions count 1)."""
    return math.prod(d for d in shape[1:-1] if d)


class TableOp:
    """The engine protocol (constant propagation, bias folding, MACs) answered from the table, for an adapter's
    op kind that names its canonical ``op`` and reads its ``params()`` and ``geometry()``."""

    op: str

    def params(self) -> dict:
        return {}

    def geometry(self) -> dict:
        return {}

    def channel_slices(self) -> tuple[tuple[int, int], ...]:
        """For a ``"slice"`` op, the ``(start, stop)`` input channels of each output."""
        return ()

    def contraction(self) -> tuple[tuple[int, ...], int | None]:
        """For an op of :attr:`Rule.CONTRACT`: the inputs whose channels it sums over together, and the input
        whose channels its first output carries (None: none)."""
        return (), None

    def const_out(self, in_consts: list[np.ndarray]) -> list[np.ndarray]:
        out = const_out(self.op, in_consts, **self.params())
        return out if isinstance(out, list) else [out]

    def can_fold(self, input_index: int) -> bool:
        return can_fold(self.op, **self.geometry())

    def macs(self, in_counts: list[int], out_count: int) -> float:
        """Multiply-accumulates of one call for one example, with these channel counts."""
        return macs(self.op, in_counts, out_count, **self.geometry())
