"""The INT8 placement policy, written once for quantization-aware training and post-training calibration.

OpenVINO's CPU plugin runs an op in INT8 when the right inputs reach it quantized: a convolution or fully
connected layer needs its data input and its weights quantized; a residual ``Add`` and pooling need their
inputs quantized to run INT8 too (that, not the convolutions alone, gives ResNets their speed-up: DESIGN.md).
Ops that only move or select values (zero padding, reshapes, max pooling) keep the grid of a quantized
input, so a quantizer of their output is better placed before them, as NNCF propagates its quantizers.

Each op kind has one :class:`OpPolicy`; :mod:`tfcompress.quantization` (Keras layers and ``keras.ops``
nodes) and :mod:`tfcompress.calibration.placement` (OpenVINO ops) only translate their op types into these
policies, so a QAT model and a calibrated IR of the same float model quantize the same tensors.

Granularity, the same on both sides:

- weights: symmetric, per output channel, 255 levels on [-m, m] (int8 with zero point 0; OpenVINO takes no
  other weight grid for INT8 kernels), 7 bits for the layers the overflow fix picks (:data:`OVERFLOW_FIX`,
  :func:`overflow_fix_layers`, on the grid of :func:`weight_grid`);
- activations: per tensor, 256 levels. Post-training calibration may give the input of a depthwise
  convolution one range per channel (``per_channel_depthwise_inputs``); QAT keeps it per tensor, since
  TensorFlow's per-channel activation FakeQuant does not survive the ONNX conversion.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import numpy as np

__all__ = [
    "OpPolicy", "WEIGHTED", "DEPTHWISE", "JOIN", "GATE", "POOLING", "MAX_POOLING", "PAD", "RESHAPE", "PROJECTIONS",
    "FLOAT", "NORMALIZATION", "STATISTICS_ROLES", "StatisticsOp", "normalizations",
    "OVERFLOW_FIX", "WEIGHT_LEVELS", "on_int8_grid", "overflow_fix_layers", "quantized_inputs",
    "quantizer_moves_above", "weight_grid",
]

_Layer = TypeVar("_Layer", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class OpPolicy:
    """How one kind of op is quantized.

    Attributes:
        inputs: which inputs get an activation quantizer: ``"data"`` (input 0 of a layer with weights, which
            are quantized too), ``"all"`` (every tensor input, e.g. both operands of a residual add),
            ``"first"`` (the pooled input), ``"broadcast"`` (every tensor input, when one is broadcast over
            the other: a gate) or ``"none"``.
        moves_values: the op only moves or selects values (a quantized input gives an output on the same
            grid): a quantizer of its output moves above it when every reader of the output reads it quantized.
        keeps_channels: it keeps every value in its channel, so a per-channel quantizer may move above it too.
        per_channel_input: its data input may have one range per channel (a depthwise convolution: each
            output channel reads one input channel, so the plugin folds the channel's scale into its weights).
        pair_sums: on a CPU without VNNI its INT8 kernel adds pairs of u8 x i8 products in int16, which
            weights on the whole int8 grid can saturate: the layers :data:`OVERFLOW_FIX` applies to.
    """

    inputs: str = "none"
    moves_values: bool = False
    keeps_channels: bool = False
    per_channel_input: bool = False
    pair_sums: bool = True


WEIGHTED = OpPolicy(inputs="data")  # convolution (also transposed, separable's two parts), fully connected
# a depthwise convolution with one output channel per input channel: the CPU plugin's depthwise INT8 kernel
# widens every product to int32 before adding, so it cannot saturate (BENCHMARKS.md 3h; with a channel
# multiplier it runs a GEMM kernel that adds pairs, and is WEIGHTED)
DEPTHWISE = OpPolicy(inputs="data", per_channel_input=True, pair_sums=False)
JOIN = OpPolicy(inputs="all")  # elementwise sum of tensors
# elementwise product of tensors: a gate broadcast over a feature map (squeeze-and-excitation, spatial
# attention) runs INT8 with both operands quantized, as NNCF quantizes it; a product of equal shapes is the
# inside of an activation (x * sigmoid(x), x * hard_sigmoid(x)) that OpenVINO fuses into one op: it stays float
GATE = OpPolicy(inputs="broadcast")
POOLING = OpPolicy(inputs="first")  # average and global pooling
MAX_POOLING = OpPolicy(inputs="first", moves_values=True, keeps_channels=True)
# zero padding only (the pad value must be on the grid). A quantizer moves above it while its tensor's range is
# unknown; in the IR, one of a signed range goes back below it (calibration.placement.quantize_after_signed_pads:
# the CPU plugin runs the convolution after it in INT8 on every CPU only then)
PAD = OpPolicy(moves_values=True, keeps_channels=True)
RESHAPE = OpPolicy(moves_values=True)  # reshape, flatten, transpose, squeeze
# a layer whose every tensor input is read by a projection with weights (MultiHeadAttention's query, value and
# key): each input quantized, as the fully connected layers' data inputs are
PROJECTIONS = OpPolicy(inputs="all")
FLOAT = OpPolicy()  # everything else: computes in float, quantizes nothing
# a normalization by a tensor's own statistics (LayerNormalization, RMSNormalization, UnitNormalization, also
# decomposed into ReduceMean, Subtract, Multiply ... in an IR, or written with keras.ops): float on both sides,
# found by :func:`normalizations`. Its statistics are not pooling nor its scaling a gate: quantizing them (up to
# 6 quantizers per LayerNormalization) ran no weighted layer more in INT8 and measured no faster
NORMALIZATION = FLOAT

# the roles an op plays in computing a normalization; each front end translates its op types into them:
# "reduce" (a mean or sum over axes), "moment" (a second moment of its input over axes: variance, standard
# deviation, L2 norm), "square" (its first input squared), "subtract", "multiply", "divide", "add", and
# "arithmetic" (an elementwise op of one tensor and constants: sqrt, rsqrt, power, clipping; reshapes, casts)
STATISTICS_ROLES = ("reduce", "moment", "square", "subtract", "multiply", "divide", "add", "arithmetic")
_COMBINING = frozenset({"subtract", "multiply", "divide", "add"})
_STATISTICS = frozenset({"reduce", "moment"})


@dataclasses.dataclass(frozen=True)
class StatisticsOp:
    """An op as :func:`normalizations` sees it.

    Attributes:
        key: the op's identity (a node name).
        role: one of :data:`STATISTICS_ROLES`, or ``""`` for any other op (an activation, a layer with weights,
            a matrix product), which no normalization is computed through.
        inputs: per input, the key of the op computing it, or None for a constant.
    """

    key: Hashable
    role: str
    inputs: tuple = ()

    def sources(self) -> list:
        return [k for k in self.inputs if k is not None]


def normalizations(ops: Sequence[StatisticsOp], depth: int = 8) -> set:
    """The keys of the ``ops`` (in topological order) that normalize a tensor by its own statistics: the
    statistics, the squares they reduce, and the ops that combine a tensor with its statistics.

    A statistic of a tensor ``x`` is a reduction of ``x`` or of ``x``'s square (``x * x``), or a second moment of
    ``x``. Below the statistics of one ``x``, through arithmetic only (within ``depth`` ops, no activation, no
    layer with weights), an op that combines is a subtract, product, quotient or sum whose every non-constant
    input is ``x`` or computed there. They are a normalization when one of them centers ``x`` (``x - mean``)
    or a statistic is of a square (a variance, a root mean square, an L2 norm; also that of ``x - mean`` in
    LayerNormalization's decomposition): ``(x - mean) * rsqrt(var + eps)``, ``x / sqrt(mean(x * x) + eps)``,
    ``x / max(||x||, eps)``. A gate ``x * sigmoid(mean(x))`` (an activation on the way), a squeeze-and-excite
    block (layers with weights), attention (softmax, matrix products) and a context ``x + mean(x)`` or scaling
    ``x * mean(x)`` (no centering, no square) are not.
    """
    by_key = {op.key: op for op in ops}
    readers: dict = {}
    for op in ops:
        for k in set(op.sources()):
            readers.setdefault(k, []).append(op)

    def squared(key):  # the tensor the op ``key`` squares, or None
        op = by_key.get(key)
        if op is None:
            return None
        if op.role == "square" and op.inputs and op.inputs[0] is not None:
            return op.inputs[0]
        if op.role == "multiply" and len(op.inputs) == 2 and op.inputs[0] is not None and op.inputs[0] == op.inputs[1]:
            return op.inputs[0]
        return None

    def below(key) -> set:
        seen: set = set()
        frontier = [key]
        for _ in range(depth):
            frontier = [r.key for k in frontier for r in readers.get(k, ())
                        if r.role in STATISTICS_ROLES and r.key not in seen]
            seen.update(frontier)
        return seen

    statistics: dict = {}  # x -> the statistics of x (of x or of its square)
    for op in ops:
        if op.role in _STATISTICS and op.inputs and op.inputs[0] is not None:
            x = squared(op.inputs[0])
            statistics.setdefault(op.inputs[0] if x is None else x, []).append(op.key)
    found: set = set()
    for x, stats in statistics.items():
        walked = set(stats).union(*(below(k) for k in stats))
        combining = {k for k in walked if by_key[k].role in _COMBINING and len(by_key[k].sources()) > 1
                     and all(s == x or s in walked for s in by_key[k].sources())}
        if not combining:
            continue
        reductions = {k for k in walked if by_key[k].role in _STATISTICS and below(k) & combining}
        squares = {by_key[k].inputs[0] for k in reductions if squared(by_key[k].inputs[0]) is not None}
        centered = any(by_key[k].role == "subtract" and by_key[k].inputs[0] == x for k in combining)
        if centered or squares or any(by_key[k].role == "moment" for k in reductions):
            found |= reductions | squares | combining
    return found

# ``overflow_fix``: which weights use only half the int8 range. u8 x i8 multiply-adds without VNNI (SSE4,
# AVX2, AVX-512 before VNNI) sum pairs of products into int16, which saturates when the weights use all of
# [-127, 127]; with weights in [-63, 63] it cannot (2 * 255 * 63 < 32767). The model may be deployed on such
# a CPU, so by default the first layers (convolutions or fully connected, whose inputs, e.g. raw pixels, fill
# the u8 range) get the fix, as NNCF's default does for convolutions; "enable" gives it to every layer,
# "disable" to none. Only layers with ``pair_sums`` count: a depthwise convolution never gets the fix (it
# would only cost it a bit) and the first layers are those after it.
OVERFLOW_FIX = ("first_layer", "enable", "disable")


def overflow_fix_layers(overflow_fix: str, layers: Iterable[_Layer], policy_of: Callable[[_Layer], OpPolicy],
                        first_reached: Callable[[set[_Layer]], set[_Layer]]) -> set[_Layer]:
    """The quantized ``layers`` whose weights go on the 7-bit grid under ``overflow_fix`` (:data:`OVERFLOW_FIX`).

    Only layers whose INT8 kernels add pairs (``policy_of(layer).pair_sums``) count: ``"enable"`` picks all of
    them, ``"first_layer"`` those that ``first_reached`` says a model input reaches without passing through
    another of them (it walks through the others, e.g. a depthwise stem), ``"disable"`` none. Quantization-aware
    training (Keras layers' kernels) and post-training calibration (OpenVINO ops) each pass their own graph
    walk, so both choose the same layers of the same model.
    """
    if overflow_fix not in OVERFLOW_FIX:
        raise ValueError(f"unknown overflow_fix {overflow_fix!r}; choose one of {list(OVERFLOW_FIX)}")
    saturating = {layer for layer in layers if policy_of(layer).pair_sums}
    if overflow_fix == "enable":
        return saturating
    return first_reached(saturating) if overflow_fix == "first_layer" and saturating else set()


WEIGHT_LEVELS = 255  # the weights' quantizer: symmetric over [-limit, limit], 127 steps each way


def weight_grid(abs_max, half_range: bool):
    """The weight grid of output channels whose largest |weight| is ``abs_max`` (a float, NumPy array or
    tensor): ``(limit, clip)``, the range [-limit, limit] of the weights' quantizer (:data:`WEIGHT_LEVELS`
    levels, a step of limit / 127) and the largest |weight| it is given (the weights are clipped there first).

    The whole int8 grid: limit = clip = abs_max. The overflow fix's 7-bit grid: limit = 2 * abs_max, a step of
    abs_max / 63.5, with the weights clipped at level 63 (the abs-max lies half a step above it): the finest
    grid of the integers -63..63 whose error stays within half a step up to the abs-max, as NNCF's post-training
    half range (a 7-bit grid of 128 levels on [-abs_max, abs_max], exported as 255 levels on twice that). (NNCF's
    QAT trains a scale s on the integers -63..63 with a step s / 63; our QAT's range is the abs-max, not
    trained, so the grid of a step abs_max / 63.5 is finer for the same error bound.) Quantization-aware
    training and post-training calibration both use this grid.
    """
    if not half_range:
        return abs_max, abs_max
    limit = abs_max * 2.0
    return limit, limit / 127.0 * 63.0


def quantized_inputs(policy: OpPolicy, constant: Sequence[bool], weights_quantizable: bool = True,
                     broadcast: bool = False) -> list[int]:
    """The inputs of an op that get activation quantizers.

    Args:
        policy: the op's policy.
        constant: per input, whether it is a constant (constants are never activation-quantized; a join with
            a constant operand is a bias or a shift, not a residual add, and stays float).
        weights_quantizable: for a layer with weights, whether they are quantized (constant, or quantized by
            QAT): a matrix product of two activations (attention) stays float.
        broadcast: whether the inputs' shapes differ (one is broadcast over the other).
    """
    if policy.inputs == "data":
        return [0] if weights_quantizable else []
    if policy.inputs == "all" or (policy.inputs == "broadcast" and broadcast):
        return [] if any(constant) else list(range(len(constant)))
    if policy.inputs == "first":
        return [0]
    return []


def quantizer_moves_above(policy: OpPolicy, readers_read_quantized: Sequence[bool]) -> bool:
    """Whether the quantizer of an op's output goes before the op instead: it only moves values and every
    reader of its output reads that output quantized anyway (one quantizer, and INT8 runs through the op)."""
    return policy.moves_values and bool(readers_read_quantized) and all(readers_read_quantized)


def on_int8_grid(w: np.ndarray, axis: int, tolerance: float | None = None):
    """(q, scale) if every slice along ``axis`` is ``q * scale`` with integer q in [-127, 127], within
    ``tolerance`` steps (by default 0.1 for float16 weights, else 1e-3), else (None, None): weights that
    quantization-aware training put on the weight grid, even after a converter folded the fake quantization into
    float constants.

    A slice's largest |q| is 63 where the weights were trained on the overflow fix's 7-bit grid
    (:data:`OVERFLOW_FIX`), or 127 (the full grid). The 7-bit reading is tried first: a slice that fits both
    (only 0 and its abs-max) has the same values either way, and the smaller integers cannot saturate the
    pair sums of CPUs without VNNI. Weights stored as float16 are on the grid only to float16's precision:
    a tolerance of 0.1 steps (127 x 2^-11 = 0.06 at most) still tells them from unquantized weights. The
    scale is the one that fits a slice's integers best (least squares), not its abs-max / 127: that abs-max
    is rounded as much as the other weights, and measured against it they stray twice as far."""
    if tolerance is None:
        tolerance = 0.1 if np.asarray(w).dtype == np.float16 else 1e-3
    w = np.asarray(w, np.float64)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    if not np.all(amax > 0):
        amax = np.where(amax > 0, amax, 1.0)
    found = np.zeros(len(amax), dtype=bool)
    scale = np.zeros_like(amax)
    for top in (63.0, 127.0):
        q = np.round(moved / (amax / top)[:, None])
        squares = (q * q).sum(axis=1)
        fit = np.where(squares > 0, (moved * q).sum(axis=1) / np.maximum(squares, 1.0), amax / top)
        fits = ~found & np.all(np.abs(moved / fit[:, None] - q) < tolerance, axis=1)
        scale[fits] = fit[fits]
        found |= fits
    if not found.all():
        return None, None
    q = np.round(moved / scale[:, None])
    return np.moveaxis(q.reshape(np.moveaxis(w, axis, 0).shape), 0, axis), scale
