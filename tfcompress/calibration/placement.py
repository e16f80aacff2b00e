"""Where FakeQuantize goes in an OpenVINO model so that the CPU plugin really runs INT8.

OpenVINO's low-precision transformations turn a layer into an INT8 kernel when its activation input and its
weights come through FakeQuantize. Quantizing only Conv/MatMul inputs gives INT8 convolutions but no speed-up
over BF16 on ResNets: residual ``Add`` s and pooling must see quantized inputs too (both measured on this
machine, see DESIGN.md). Points are identified by the position of their node in ``get_ordered_ops()``, so the
same points can be found again in a clone of the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ActivationPoint", "WeightPoint", "find_points", "OVERFLOW_FIX"]

_WEIGHTED = {"Convolution", "GroupConvolution", "MatMul"}
_POOLING = {"MaxPool", "AvgPool", "ReduceMean"}
# ops that move or select values without computing new ones: a quantized input gives an output on the same
# grid, so a quantizer after them is better placed before them (INT8 runs through them, one FakeQuantize
# instead of a requantization), as NNCF propagates its quantizers
_AGNOSTIC = {"MaxPool", "Pad", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}
# agnostic ops that keep every value in its channel (axis 1): a per-channel quantizer may move above them
_CHANNEL_KEEPING = {"MaxPool", "Pad"}


@dataclasses.dataclass
class ActivationPoint:
    """A tensor (an op output) to quantize per tensor, and the op inputs that must read it quantized."""

    key: tuple[int, int]  # (index of the producing op in get_ordered_ops(), output port)
    output: object  # ov.Output
    targets: list  # ov.Input
    layers: list[str]  # friendly names of the consuming weighted layers (for ignored_layers / reporting)
    concat_group: int | None = None  # points feeding one Concat share one range
    per_channel: bool = False  # one range per channel (axis 1): read only by depthwise convolutions


@dataclasses.dataclass
class WeightPoint:
    """The constant weights of a Convolution, GroupConvolution or MatMul, quantized per output channel."""

    key: int  # index of the weighted op in get_ordered_ops()
    op: object
    constant: object  # the ov Constant node
    channel_axes: tuple[int, ...]  # axes of the weights indexed by output channels (kept in the range shape)
    half_range: bool = False  # 7-bit grid (integers in [-63, 63]): see OVERFLOW_FIX


# ``overflow_fix``: which weights use only half the int8 range. u8 x i8 multiply-adds without VNNI (SSE4,
# AVX2, AVX-512 before VNNI) sum pairs of products into int16, which saturates when the weights use all of
# [-127, 127]; with weights in [-63, 63] it cannot (2 * 255 * 63 < 32767). The IR may be deployed on such a
# CPU, so by default the first layers (convolutions or fully connected, whose inputs, e.g. raw pixels, fill
# the u8 range) get the fix, as NNCF's default does for convolutions; "enable" gives it to every layer,
# "disable" to none. ``cpu_saturates_int8()`` tells whether the CPU running this has the problem.
OVERFLOW_FIX = ("first_layer", "enable", "disable")


def _source(inp):
    return inp.get_source_output()


def _through_convert(output):
    node = output.get_node()
    while node.get_type_name() == "Convert" and node.input(0).get_source_output().get_node().get_type_name() == "Constant":
        node = node.input(0).get_source_output().get_node()
    return node


def _is_const(output) -> bool:
    return _through_convert(output).get_type_name() == "Constant"


def bias_input(op, results_read: bool = False):
    """The input of the ``Add`` right after ``op`` that reads a constant bias (possibly through a Convert:
    FP16-compressed IR), or None. The Add must be ``op``'s only reader; a model output (Result) reading ``op``
    counts as another reader only with ``results_read`` (a tensor the user sees may not be rescaled)."""
    readers = [r for r in op.output(0).get_target_inputs()
               if results_read or r.get_node().get_type_name() != "Result"]
    if len(readers) != 1 or readers[0].get_node().get_type_name() != "Add":
        return None
    other = readers[0].get_node().input(1 - readers[0].get_index())
    return other if _is_const(_source(other)) else None


def unpadded_stride_one(op) -> bool:
    """A convolution with stride 1, dilation 1 and no padding (OpenVINO fills ``pads_begin`` / ``pads_end``
    in for ``auto_pad`` too)."""
    a = op.get_attributes()
    return (set(a["strides"]) == {1} and set(a["dilations"]) == {1} and not any(a["pads_begin"])
            and not any(a["pads_end"]))


def _weight_axes(op, const_shape) -> tuple[int, ...] | None:
    t = op.get_type_name()
    if t == "Convolution":
        return (0,)  # [O, I, kh, kw]
    if t == "GroupConvolution":
        return (0, 1)  # [G, O/G, I/G, kh, kw]
    if len(const_shape) != 2:
        return None
    attrs = op.get_attributes()
    return (0,) if attrs.get("transpose_b", False) else (1,)


def is_depthwise(op) -> bool:
    """A GroupConvolution with one input and one output channel per group (weights [G, 1, 1, ...]).

    Each of its output channels reads one input channel, so the CPU plugin folds a per-channel activation
    scale into that channel's weight scale: its input may be quantized per channel (as NNCF's CPU
    configuration allows for depthwise convolutions only), which keeps a channel of small values from
    losing its resolution to the tensor's largest channel.
    """
    if op.get_type_name() != "GroupConvolution":
        return False
    shape = op.get_input_partial_shape(1)
    return shape.rank.is_static and len(shape) >= 3 and all(
        shape[k].is_static and shape[k].get_length() == 1 for k in (1, 2))


def _quantized_inputs(op) -> list[int]:
    """Which inputs of ``op`` this placement quantizes: the activation of a layer with constant or QAT
    weights, both inputs of a residual Add, the input of a pooling op."""
    t = op.get_type_name()
    if t in _WEIGHTED:
        w_src = _source(op.input(1))
        return [0] if _is_const(w_src) or w_src.get_node().get_type_name() == "FakeQuantize" else []
    if t == "Add":
        return [] if any(_is_const(_source(i)) for i in op.inputs()) else list(range(op.get_input_size()))
    return [0] if t in _POOLING else []


def _first_layers(ops, weighted: set[int], pos: dict) -> set[int]:
    """Positions of the weighted layers (convolutions and fully-connected MatMuls) first reached from the
    model inputs on every path: their inputs are the raw data, which fills the u8 range.

    NNCF's ``first_layer`` looks at convolutions only and walks on through a MatMul; like POT's saturation
    fix we count a fully-connected first layer too (an MLP on raw features saturates the same way: its
    error on a CPU without VNNI is tests/test_calibration.py's overflow test)."""
    first, seen = set(), set()
    stack = [op for op in ops if op.get_type_name() == "Parameter"]
    while stack:
        node = stack.pop()
        for out in node.outputs():
            for reader in out.get_target_inputs():
                nxt = reader.get_node()
                k = pos[nxt.get_name()]
                if k in seen:
                    continue
                seen.add(k)
                if k in weighted:
                    first.add(k)
                else:
                    stack.append(nxt)
    return first


def find_points(model, ignored_layers=(), overflow_fix: str = "disable") -> tuple[list[ActivationPoint], list[WeightPoint]]:
    """The activation and weight quantization points of ``model`` (existing FakeQuantize ops are kept);
    ``overflow_fix`` (see :data:`OVERFLOW_FIX`) marks the weights to put on the 7-bit grid."""
    ops = list(model.get_ordered_ops())
    # ov node objects are re-created on access: identify nodes by their (unique) names
    pos = {op.get_name(): k for k, op in enumerate(ops)}
    ignored = set(ignored_layers)
    acts: dict[tuple[int, int], ActivationPoint] = {}
    weights: list[WeightPoint] = []

    def reads_quantized(inp) -> bool:
        """Whether ``inp`` is an input this placement quantizes anyway (so a quantizer above it is safe)."""
        node = inp.get_node()
        if node.get_friendly_name() in ignored:
            return False
        return inp.get_index() in _quantized_inputs(node) or hoistable(node)

    def hoistable(node) -> bool:
        """An agnostic op with one data input whose every reader reads quantized values anyway."""
        if node.get_type_name() not in _AGNOSTIC:
            return False
        if any(node.output(k).get_target_inputs() for k in range(1, node.get_output_size())):
            return False  # e.g. MaxPool's indices are read
        if any(not _is_const(_source(i)) for i in list(node.inputs())[1:]):
            return False
        if node.get_type_name() == "Pad" and node.get_input_size() > 3:
            value = _through_convert(_source(node.input(3)))
            if np.any(value.get_data() != 0):  # a pad value off the quantization grid
                return False
        readers = list(node.output(0).get_target_inputs())
        return bool(readers) and all(reads_quantized(r) for r in readers)

    def add_act(inp, layer: str, depthwise: bool) -> None:
        src = _source(inp)
        node = src.get_node()
        while hoistable(node):  # place the quantizer before MaxPool / Pad / Reshape ... chains
            depthwise = depthwise and node.get_type_name() in _CHANNEL_KEEPING
            inp = node.input(0)
            src = _source(inp)
            node = src.get_node()
        if node.get_type_name() in ("FakeQuantize", "Constant") or _is_const(src):
            return  # already quantized (QAT) or a constant
        key = (pos[node.get_name()], src.get_index())
        point = acts.get(key)
        if point is None:
            point = acts[key] = ActivationPoint(key, src, [], [], per_channel=True)
        point.per_channel = point.per_channel and depthwise
        if not any(t.get_node().get_name() == inp.get_node().get_name() and t.get_index() == inp.get_index()
                   for t in point.targets):
            point.targets.append(inp)
        point.layers.append(layer)

    for k, op in enumerate(ops):
        t = op.get_type_name()
        name = op.get_friendly_name()
        if name in ignored:
            continue
        for i in _quantized_inputs(op):  # QAT weights: only the missing activation quantizer is added
            add_act(op.input(i), name, i == 0 and is_depthwise(op))
        if t in _WEIGHTED and _is_const(_source(op.input(1))):
            const = _through_convert(_source(op.input(1)))
            axes = _weight_axes(op, tuple(const.get_output_shape(0)))
            if axes is not None and const.get_output_element_type(0).is_real():
                weights.append(WeightPoint(k, op, const, axes))
    half = {wp.key for wp in weights} if overflow_fix == "enable" else (
        _first_layers(ops, {wp.key for wp in weights}, pos) if overflow_fix == "first_layer" else set())
    for wp in weights:
        wp.half_range = wp.key in half
    # unify the ranges of quantized tensors that meet in a Concat
    group = 0
    for op in ops:
        if op.get_type_name() != "Concat":
            continue
        members = []
        for i in op.inputs():
            src = _source(i)
            key = (pos[src.get_node().get_name()], src.get_index())
            if key in acts:
                members.append(acts[key])
        if len(members) > 1:
            for m in members:
                m.concat_group = group
                m.per_channel = False
            group += 1
    return list(acts.values()), weights


def weight_ranges(w: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Symmetric per-output-channel abs-max, shaped to broadcast against ``w``."""
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    m = np.abs(w).max(axis=reduce, keepdims=True)
    return np.maximum(m, np.finfo(np.float32).tiny).astype(np.float32)
