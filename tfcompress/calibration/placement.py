"""Where FakeQuantize goes in an OpenVINO model so that the CPU plugin really runs INT8.

The policy (which inputs of which ops are quantized, where a quantizer moves, per channel or per tensor) is
:mod:`tfcompress.int8_policy`, shared with quantization-aware training; this module translates OpenVINO op
types into it. Points are identified by the position of their node in ``get_ordered_ops()``, so the same
points can be found again in a clone of the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcompress import int8_policy as policy
from tfcompress.int8_policy import OVERFLOW_FIX

__all__ = ["ActivationPoint", "WeightPoint", "find_points", "normalization_ops", "op_policy", "quantize_after_signed_pads",
           "quantized_inputs", "rewrite_for_cpu", "slice_before_strided_pointwise", "OVERFLOW_FIX"]

# OpenVINO op types -> their policy (GroupConvolution: see op_policy)
_POLICIES = {
    "Convolution": policy.WEIGHTED, "GroupConvolution": policy.WEIGHTED, "MatMul": policy.WEIGHTED,
    "ConvolutionBackpropData": policy.WEIGHTED, "Add": policy.JOIN, "Multiply": policy.GATE,
    "AvgPool": policy.POOLING, "ReduceMean": policy.POOLING, "ReduceMax": policy.POOLING,
    "MaxPool": policy.MAX_POOLING, "Pad": policy.PAD,
    "Reshape": policy.RESHAPE, "Transpose": policy.RESHAPE, "Squeeze": policy.RESHAPE, "Unsqueeze": policy.RESHAPE,
}


def op_policy(op) -> policy.OpPolicy:
    """The placement policy of an OpenVINO op."""
    if is_depthwise(op):
        return policy.DEPTHWISE
    return _POLICIES.get(op.get_type_name(), policy.FLOAT)


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
    if t == "ConvolutionBackpropData":
        return (1,)  # [I, O, kh, kw]
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


# ops between stored weights and the layer: decompression (Multiply by the scale, Subtract of the zero point)
# and reshapes
_WEIGHT_PATH = {"Multiply", "Subtract", "Reshape", "Unsqueeze", "Squeeze", "Transpose"}


def _quantized_weights(output, depth: int = 8) -> bool:
    """Weights quantized already: a FakeQuantize (QAT), or integer constants decompressed by Convert ->
    (Subtract) -> Multiply, as OpenVINO's readers store QAT weights and calibration stores its own, possibly
    reshaped, rescaled by constants or cast to another float type on the way to the layer."""
    node = output.get_node()
    t = node.get_type_name()
    if t == "FakeQuantize":
        return True
    if t == "Convert" and not node.get_input_element_type(0).is_real():
        return _is_const(_source(node.input(0)))
    if t not in _WEIGHT_PATH | {"Convert"} or depth == 0:  # a float Convert: a mixed-precision model's cast
        return False
    found = [_quantized_weights(_source(i), depth - 1) for i in node.inputs()]
    return any(found) and all(f or _is_const(_source(i)) for f, i in zip(found, node.inputs()))


def _has_weights(op) -> bool:
    return op_policy(op).inputs == "data" and op.get_input_size() > 1


def quantized_inputs(op, features: set[str] | None = None) -> list[int]:
    """Which inputs of ``op`` the policy quantizes (:func:`tfcompress.int8_policy.quantized_inputs`); the
    weights of a layer count as quantizable when they are constant or already quantized (QAT). Given the
    model's ``features`` (:func:`_features`), an input that is not one counts as a constant: a sum or product
    with a mask stays float, as one with a bias or a scale does."""
    constant = [_is_const(_source(i)) or (features is not None and _source(i).get_node().get_name() not in features)
                for i in op.inputs()]
    weights_ok = False
    if _has_weights(op):
        w_src = _source(op.input(1))
        weights_ok = constant[1] or _quantized_weights(w_src)
    shapes = {str(op.get_input_partial_shape(i)) for i in range(op.get_input_size())}
    return policy.quantized_inputs(op_policy(op), constant, weights_ok, broadcast=len(shapes) > 1)



def _first_layers(ops, weighted: set[int], pos: dict) -> set[int]:
    """Positions of the ``weighted`` layers (convolutions and fully-connected MatMuls whose INT8 kernels add
    product pairs) that the model inputs reach without passing through another of them: their inputs are the
    raw data, or the raw data through layers that cannot saturate (a depthwise convolution), which fills the u8
    range (the walk of :func:`tfcompress.int8_policy.overflow_fix_layers`).

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


def _trained_int8(op) -> bool:
    """A layer whose weights quantization-aware training quantized: FakeQuantize or int8 weights, or constants
    on the int8 weight grid (a converter folded the fake quantization; float16 ones to their precision)."""
    if not _has_weights(op):
        return False
    src = _source(op.input(1))
    if _quantized_weights(src):
        return True
    const = _through_convert(src)
    if const.get_type_name() != "Constant" or not const.get_output_element_type(0).is_real():
        return False
    axes = _weight_axes(op, tuple(const.get_output_shape(0)))
    if axes is None:
        return False
    w = const.get_data()
    return policy.on_int8_grid(w.reshape(w.shape[0] * w.shape[1], *w.shape[2:]) if len(axes) == 2 else w,
                               axes[0])[0] is not None


def _features(ops) -> set[str]:
    """Names of the ops (``ops`` in topological order) whose outputs are features: they depend on the values of
    the model's inputs, and not only through a boolean. The others compute from constants and input shapes (a
    causal attention mask, positions) or from a comparison's result (a padding mask from token ids): such a
    tensor may hold values like float32's minimum where it masks, so a quantizer over its range would round the
    feature map it is added to to zero, as NNCF leaves constant and shape subgraphs unquantized."""
    features: set[str] = set()
    for op in ops:
        if op.get_type_name() == "Parameter":
            features.add(op.get_name())
        elif op.get_type_name() != "ShapeOf" and any(
                op.get_output_element_type(k).get_type_name() != "boolean" for k in range(op.get_output_size())) and any(
                _source(i).get_node().get_name() in features for i in op.inputs()):
            features.add(op.get_name())
    return features


# OpenVINO op types -> their role in a normalization (tfcompress.int8_policy.STATISTICS_ROLES; Power: _role)
_ROLES = {
    "ReduceMean": "reduce", "ReduceSum": "reduce", "ReduceL2": "moment", "SquaredDifference": "square",
    "Subtract": "subtract", "Multiply": "multiply", "Divide": "divide", "Add": "add",
    **dict.fromkeys(("Sqrt", "Negative", "Maximum", "Minimum", "Clamp", "Power", "Convert", "Reshape", "Squeeze",
                     "Unsqueeze", "Broadcast", "Transpose"), "arithmetic"),
}


def _role(op) -> str:
    """The op's role in a normalization: a ``Power`` by a constant 2 squares."""
    role = _ROLES.get(op.get_type_name(), "")
    if op.get_type_name() == "Power" and _is_const(_source(op.input(1))):
        exponent = _through_convert(_source(op.input(1))).get_data()
        return "square" if np.all(exponent == 2) else role
    return role


def normalization_ops(ops) -> set[str]:
    """Names of the ops (``ops`` in topological order) that normalize a tensor by its own statistics
    (:func:`tfcompress.int8_policy.normalizations`), however a converter decomposed the normalization
    (LayerNormalization's ``ReduceMean``, ``Subtract``, ``Multiply`` ...; RMSNormalization's ``ReduceMean`` of
    ``x * x``, ``Sqrt``, ``Divide``; UnitNormalization's ``ReduceSum`` of squares):
    :data:`tfcompress.int8_policy.NORMALIZATION` keeps them float, as quantization-aware training keeps the
    Keras layers and ``keras.ops`` arithmetic that compute them."""
    return policy.normalizations([policy.StatisticsOp(
        op.get_name(), _role(op) if not _has_weights(op) else "",
        tuple(None if _is_const(_source(i)) else _source(i).get_node().get_name() for i in op.inputs()))
        for op in ops])


def find_points(model, ignored_layers=(), overflow_fix: str = "disable") -> tuple[list[ActivationPoint], list[WeightPoint]]:
    """The activation and weight quantization points of ``model`` (existing FakeQuantize ops are kept; in a
    model whose training quantized some layers' weights, only those layers are completed); ``overflow_fix``
    (see :data:`OVERFLOW_FIX`) marks the weights to put on the 7-bit grid."""
    ops = list(model.get_ordered_ops())
    # ov node objects are re-created on access: identify nodes by their (unique) names
    pos = {op.get_name(): k for k, op in enumerate(ops)}
    ignored = set(ignored_layers)
    features = _features(ops)
    normalization = normalization_ops(ops)
    acts: dict[tuple[int, int], ActivationPoint] = {}
    weights: list[WeightPoint] = []

    def reads_quantized(inp) -> bool:
        """Whether ``inp`` is an input this placement quantizes anyway (so a quantizer above it is safe)."""
        node = inp.get_node()
        if node.get_friendly_name() in ignored or node.get_name() in normalization:
            return False
        return inp.get_index() in quantized_inputs(node, features) or hoistable(node)

    def hoistable(node) -> bool:
        """An agnostic op with one data input whose every reader reads quantized values anyway."""
        if not op_policy(node).moves_values:
            return False
        if any(node.output(k).get_target_inputs() for k in range(1, node.get_output_size())):
            return False  # e.g. MaxPool's indices are read
        if any(not _is_const(_source(i)) for i in list(node.inputs())[1:]):
            return False
        if node.get_type_name() == "Pad" and node.get_input_size() > 3:
            value = _through_convert(_source(node.input(3)))
            if np.any(value.get_data() != 0):  # a pad value off the quantization grid
                return False
        return policy.quantizer_moves_above(op_policy(node),
                                            [reads_quantized(r) for r in node.output(0).get_target_inputs()])

    def add_act(inp, layer: str, depthwise: bool) -> None:
        src = _source(inp)
        node = src.get_node()
        while hoistable(node):  # place the quantizer before MaxPool / Pad / Reshape ... chains
            depthwise = depthwise and op_policy(node).keeps_channels
            inp = node.input(0)
            src = _source(inp)
            node = src.get_node()
        if node.get_type_name() in ("FakeQuantize", "Constant") or _is_const(src):
            return  # already quantized (QAT) or a constant
        if node.get_name() not in features:
            return  # computed from constants, shapes or a comparison (an attention mask), not a feature map
        if not src.get_element_type().is_real():
            return  # integers (token ids, indices): FakeQuantize is for float tensors
        key = (pos[node.get_name()], src.get_index())
        point = acts.get(key)
        if point is None:
            point = acts[key] = ActivationPoint(key, src, [], [], per_channel=True)
        point.per_channel = point.per_channel and depthwise
        if not any(t.get_node().get_name() == inp.get_node().get_name() and t.get_index() == inp.get_index()
                   for t in point.targets):
            point.targets.append(inp)
        point.layers.append(layer)

    # a quantization-aware model (weights quantized by training) says itself where it runs INT8: only those
    # layers get what they miss (an activation quantizer); what it left float (attention, ignored layers) stays
    trained = {k for k, op in enumerate(ops) if _trained_int8(op)} if any(
        op.get_type_name() == "FakeQuantize" for op in ops) else set()  # QAT also quantizes activations
    for k, op in enumerate(ops):
        name = op.get_friendly_name()
        if name in ignored or trained and k not in trained or op.get_name() in normalization:
            continue
        for i in quantized_inputs(op, features):  # QAT weights: only the missing activation quantizer is added
            add_act(op.input(i), name, i == 0 and op_policy(op).per_channel_input)
        if _has_weights(op) and _is_const(_source(op.input(1))):
            const = _through_convert(_source(op.input(1)))
            axes = _weight_axes(op, tuple(const.get_output_shape(0)))
            if axes is not None and const.get_output_element_type(0).is_real():
                weights.append(WeightPoint(k, op, const, axes))
    half = policy.overflow_fix_layers(overflow_fix, [wp.key for wp in weights], lambda k: op_policy(ops[k]),
                                      lambda saturating: _first_layers(ops, saturating, pos))
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


def _limits(fq) -> list[np.ndarray] | None:
    """The four range limits of a FakeQuantize, or None when one is not a constant."""
    nodes = [_through_convert(_source(fq.input(k))) for k in range(1, 5)]
    if any(n.get_type_name() != "Constant" for n in nodes):
        return None
    return [np.asarray(n.get_data(), np.float64) for n in nodes]


def _zero_on_grid(fq, limits: list[np.ndarray]) -> bool:
    """Whether the FakeQuantize maps 0 to exactly 0 (a zero pad value is then the same before and after it)."""
    il, ih, ol, oh = limits
    levels = fq.get_attributes()["levels"]
    level = np.round((0.0 - il) / (ih - il) * (levels - 1))
    out = level / (levels - 1) * (oh - ol) + ol
    return bool(np.all(np.abs(out) <= 1e-6 * np.maximum(np.abs(oh - ol), 1e-30)))


def _zero_pad_reader(inp) -> bool:
    """``inp`` is the data input of a constant-mode Pad with a zero pad value."""
    node = inp.get_node()
    if node.get_type_name() != "Pad" or inp.get_index() != 0 or node.get_attributes()["pad_mode"] != "constant":
        return False
    if node.get_input_size() > 3:
        value = _through_convert(_source(node.input(3)))
        return value.get_type_name() == "Constant" and not np.any(value.get_data())
    return True


def _broadcasts_over_padding(pad, limits: list[np.ndarray]) -> bool:
    """The limits do not vary along an axis the Pad grows (they still broadcast against its output)."""
    begins, ends = (_through_convert(_source(pad.input(k))) for k in (1, 2))
    if begins.get_type_name() != "Constant" or ends.get_type_name() != "Constant":
        return False
    grown = np.flatnonzero(np.asarray(begins.get_data()) + np.asarray(ends.get_data()))
    rank = len(pad.get_output_partial_shape(0))
    for lim in limits:
        shape = (1,) * (rank - lim.ndim) + lim.shape
        if any(shape[a] != 1 for a in grown):
            return False
    return True


def _pad_below(reader):
    """Follow a tensor's ``reader`` down through ops that only lay its values out (reshapes, transposes: each the
    only reader of the one before) to a zero Pad: (those ops, the Pad), or None."""
    chain = []
    for _ in range(8):
        node = reader.get_node()
        if _zero_pad_reader(reader):
            return chain, node
        if (op_policy(node) is not policy.RESHAPE or reader.get_index() != 0
                or any(not _is_const(_source(i)) for i in list(node.inputs())[1:])):
            return None
        readers = list(node.output(0).get_target_inputs())
        if node.get_output_size() != 1 or len(readers) != 1:
            return None
        chain.append(node)
        reader = readers[0]
    return None


def quantize_after_signed_pads(model) -> int:
    """Move each activation FakeQuantize of a signed range (its lowest level below zero) that feeds a zero
    Pad, directly or through reshapes and transposes, below the Pad, in place; returns the number of moves.

    Padding zeros and quantizing commute when 0 is on the grid (and a per-tensor quantizer commutes with any
    layout change), so the outputs do not change. What changes is what OpenVINO's CPU plugin can run INT8: a
    convolution's data input must be u8 on CPUs without AMX (or AVX2-VNNI-INT8), so a signed quantizer
    becomes u8 with a zero point, whose dequantization must then pass the Pad and the layout change OpenVINO's
    TensorFlow and ONNX readers put before every convolution (NHWC -> NCHW Transpose, 1-D convolutions'
    Reshape). It cannot: the convolution runs in float behind a float FakeQuantize (MobileNetV3's stride-2
    depthwise convolutions after hard-swish, a causal Conv1D reading a signed signal; BENCHMARKS.md 11).
    Quantized after the Pad, the u8 tensor reaches the convolution on every CPU; the Pad then moves float
    values, which costs little next to the convolution. Unsigned tensors (zero point 0) keep their quantizer
    above the Pad (:data:`tfcompress.int8_policy.PAD`), which then runs in INT8.
    """
    import openvino.opset13 as ops

    moves = 0
    pending = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    while pending:
        fq = pending.pop()
        limits = _limits(fq)
        if limits is None or _is_const(_source(fq.input(0))) or not np.any(limits[2] < 0):
            continue
        if not _zero_on_grid(fq, limits):
            continue
        for reader in list(fq.output(0).get_target_inputs()):
            found = _pad_below(reader)
            if found is None:
                continue
            chain, pad = found
            if chain and any(lim.size != 1 for lim in limits):
                continue  # a per-channel range would have to follow the layout change
            if not _broadcasts_over_padding(pad, limits):
                continue
            if chain:  # per tensor: scalar limits, whatever the rank after the reshapes
                dtype = fq.get_output_element_type(0).to_dtype()
                bounds = [ops.constant(np.asarray(lim.reshape(()), dtype)).output(0) for lim in limits]
            else:
                bounds = [_source(fq.input(k)) for k in range(1, 5)]
            readers = list(pad.output(0).get_target_inputs())
            reader.replace_source_output(_source(fq.input(0)))
            below = ops.fake_quantize(pad.output(0), *bounds, fq.get_attributes()["levels"])
            below.set_friendly_name(f"{fq.get_friendly_name()}/after_{pad.get_friendly_name()}")
            for r in readers:
                r.replace_source_output(below.output(0))
            pending.append(below)
            moves += 1
    return moves


def _odd_multiple_of_8_channels(op) -> bool:
    shape = op.get_input_partial_shape(0)
    return shape.rank.is_static and len(shape) >= 3 and shape[1].is_static and shape[1].get_length() % 16 == 8


def _a_stride_leaves_a_remainder(op) -> bool:
    """Whether a static spatial input size of ``op`` is not a multiple of its stride."""
    sizes = list(op.get_input_partial_shape(0))[2:]
    return any(d.is_static and d.get_length() % s for d, s in zip(sizes, op.get_attributes()["strides"]))


def slice_before_strided_pointwise(model) -> int:
    """Give each quantized 1x1 convolution with a stride above 1, no padding and an odd multiple of 8 input
    channels (8, 24, 40, ...) stride 1 behind a StridedSlice that takes every stride-th row and column, in place;
    returns the number of rewrites.

    The outputs are the same numbers. What changes is the kernel: on CPUs without AVX-512, OpenVINO's CPU plugin
    (2026.4) runs such a convolution in INT8 with a 1x1 kernel that, on more than one thread, writes wrong values
    into some of its outputs, different ones from call to call (BENCHMARKS.md 15 and 16: every stride, any
    dilation). The plugin takes that kernel only when each stride divides its input size, so a layer whose
    static sizes show otherwise is left alone; with sizes unknown until run time it is rewritten. The
    StridedSlice copies the u8 rows and columns the convolution reads, and the convolution runs in INT8 with
    stride 1, whose kernel computes right. Pruning leaves such channel counts in narrow layers
    (``round_to="auto"`` rounds wide groups only).
    """
    import openvino.opset13 as ops

    rewrites = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution" or not _quantized_weights(_source(op.input(1))):
            continue
        a = op.get_attributes()
        kernel = op.get_input_partial_shape(1)
        if (kernel.rank.is_dynamic or any(d.is_dynamic or d.get_length() != 1 for d in list(kernel)[2:])
                or set(a["strides"]) == {1} or any(a["pads_begin"]) or any(a["pads_end"])
                or not _odd_multiple_of_8_channels(op) or _a_stride_leaves_a_remainder(op)):
            continue
        rank = len(kernel)
        step = np.array([1, 1, *a["strides"]], np.int64)
        zeros = ops.constant(np.zeros(rank, np.int64))
        sliced = ops.strided_slice(_source(op.input(0)), zeros, zeros, ops.constant(step),
                                   [1] * rank, [1] * rank)
        sliced.set_friendly_name(f"{op.get_friendly_name()}/stride")
        unit = ops.convolution(sliced, _source(op.input(1)), [1] * (rank - 2), [0] * (rank - 2),
                               [0] * (rank - 2), a["dilations"])
        unit.set_friendly_name(op.get_friendly_name())
        for reader in list(op.output(0).get_target_inputs()):
            reader.replace_source_output(unit.output(0))
        unit.output(0).get_tensor().set_names(op.output(0).get_names())
        rewrites += 1
    return rewrites


def rewrite_for_cpu(model) -> None:
    """The rewrites every INT8 IR gets before it is saved, in place: quantizers below signed zero pads
    (:func:`quantize_after_signed_pads`) and strided pointwise convolutions the CPU plugin computes wrong
    (:func:`slice_before_strided_pointwise`). Both leave the outputs unchanged."""
    quantize_after_signed_pads(model)
    slice_before_strided_pointwise(model)
