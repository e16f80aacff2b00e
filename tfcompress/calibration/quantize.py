"""Post-training INT8 calibration of an OpenVINO model: default and accuracy-aware modes."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from tfcompress.calibration.alignment import QUANTILE, align, alignment_pairs
from tfcompress.calibration.placement import (
    OVERFLOW_FIX, ActivationPoint, WeightPoint, _through_convert, bias_input, find_points,
    rewrite_for_cpu, unpadded_stride_one, weight_ranges,
)
from tfcompress.calibration.statistics import Statistics, channel_ranges, collect
from tfcompress.int8_policy import WEIGHT_LEVELS, weight_grid

__all__ = ["calibrate", "check_static_ranks", "compress_weights", "int8_layers", "runs_int8", "PRESETS",
           "RANGE_ESTIMATORS", "range_estimator_for"]

PRESETS = ("performance", "mixed")

# How per-tensor activation ranges are estimated from the per-sample extremes: ``"minmax"`` the mean of the
# per-sample maxima (NNCF's and POT's default), ``"max"`` the largest value seen, ``"quantile"`` the mean of the
# per-sample 1e-4 quantiles, ``"auto"`` one of the first two by the model (:func:`range_estimator_for`).
RANGE_ESTIMATORS = ("auto", "minmax", "max", "quantile")

# Ops whose input is a 2-D feature map when it has two or more spatial axes (N, C, H, W ...) longer than 1
_SPATIAL_OPS = frozenset({"Convolution", "GroupConvolution", "AvgPool", "MaxPool"})


def _read(model):
    import openvino as ov

    if isinstance(model, str):
        model = ov.Core().read_model(model)
    if not isinstance(model, ov.Model):
        raise TypeError(f"expected an openvino.Model or an IR path, got {type(model).__name__}")
    check_static_ranks(model)
    return model


def check_static_ranks(model) -> None:
    """Raise ValueError for a tensor of dynamic rank (``[?...]``): an input's samples could not be told from
    batches of samples, calibration reduces every activation over known axes (batch, channel, the rest), and
    OpenVINO's CPU plugin runs no op of dynamic rank (a reshape to a shape computed in the graph)."""
    for port in model.inputs:
        if port.get_partial_shape().rank.is_dynamic:
            names = sorted(port.get_names())
            name = names[0] if names else port.get_node().get_friendly_name()
            raise ValueError(f"the model input {name!r} has a dynamic rank ([?...]): calibration needs its number of "
                             f"dimensions; give it one first, e.g. model.reshape({{{name!r}: [-1, -1, -1, -1]}}) "
                             "for batches of images")
    for op in model.get_ordered_ops():
        if any(op.get_output_partial_shape(k).rank.is_dynamic for k in range(op.get_output_size())):
            raise ValueError(f"the output of {op.get_type_name()} {op.get_friendly_name()!r} has a dynamic rank "
                             "([?...]), which OpenVINO's CPU plugin cannot run: give the shapes it depends on a "
                             "fixed length")


def _check_args(preset, subset_size, channel_alignment, range_estimator, overflow_fix="disable"):
    if overflow_fix not in OVERFLOW_FIX:
        raise ValueError(f"unknown overflow_fix {overflow_fix!r}; choose one of {list(OVERFLOW_FIX)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if not isinstance(subset_size, int) or subset_size < 1:
        raise ValueError(f"subset_size must be a positive integer, got {subset_size!r}")
    if not isinstance(channel_alignment, bool):
        raise TypeError(f"channel_alignment must be True or False, got {channel_alignment!r}")
    if range_estimator not in RANGE_ESTIMATORS:
        raise ValueError(f"unknown range_estimator {range_estimator!r}; choose one of {list(RANGE_ESTIMATORS)}")


def _maps_2d(op) -> bool:
    """Whether ``op`` convolves or pools 2-D (or 3-D) feature maps: a Convolution, GroupConvolution or pooling
    op whose input has two spatial axes longer than 1 (a Conv1D that a converter wrote as a 2-D convolution
    over a height of 1 does not count; unknown lengths do)."""
    if op.get_type_name() not in _SPATIAL_OPS:
        return False
    shape = op.get_input_partial_shape(0)
    if shape.rank.is_dynamic:
        return True
    return len([d for d in list(shape)[2:] if not (d.is_static and d.get_length() == 1)]) >= 2


def _has_feature_maps(model) -> bool:
    """Whether the model convolves or pools 2-D (or 3-D) feature maps (:func:`_maps_2d`)."""
    return any(_maps_2d(op) for op in model.get_ordered_ops())


def _feature_map_ops(model) -> set[int]:
    """Positions (in ``get_ordered_ops()``) of the ops computed from 2-D feature maps or computing what such
    maps are made from: those downstream or upstream of an op of :func:`_maps_2d`. In a CNN that is every op;
    in a model with an image input and a vector one (image + metadata) the ops of the vector branch before it
    joins the image's are not."""
    ops = list(model.get_ordered_ops())
    pos = {op.get_name(): k for k, op in enumerate(ops)}
    producers = [[pos[i.get_source_output().get_node().get_name()] for i in op.inputs()] for op in ops]
    down, up = set(), set()
    for k, op in enumerate(ops):
        if _maps_2d(op) or any(p in down for p in producers[k]):
            down.add(k)
    for k in reversed(range(len(ops))):
        if _maps_2d(ops[k]) or k in up:
            up.update(producers[k])
    return down | up


def range_estimator_for(model, range_estimator: str = "auto") -> str:
    """The estimator ``range_estimator`` stands for on ``model``: itself, or for ``"auto"`` ``"minmax"`` (the
    mean of per-sample maxima) on a model with 2-D feature maps and ``"max"`` on any other.

    The mean of per-sample maxima is NNCF's default for CNNs on images (and spectrograms): each sample's
    maximum over a feature map of thousands of values is a rare outlier, and averaging it over samples clips
    those outliers and keeps a finer grid for the rest. A model of vectors (an MLP, an autoencoder on tabular or
    spectral features) or 1-D sequences (Conv1D on signals, embeddings, attention) has few values per sample
    in each tensor, or samples whose scale varies (a signal's amplitude): there a sample's maximum is one of its
    features, and the mean clips it in about half of the samples. Such models get the largest value seen
    (BENCHMARKS.md, section 3g). Models with 2-D feature maps keep NNCF's default, and their ranges NNCF's.
    """
    if range_estimator != "auto":
        return range_estimator
    return "minmax" if _has_feature_maps(model) else "max"


def point_estimators(model, acts: list[ActivationPoint], range_estimator: str = "auto") -> dict:
    """Each activation point's estimator: ``range_estimator``, or for ``"auto"`` ``"minmax"`` on tensors of 2-D
    feature maps (computed from them, or making them) and ``"max"`` on the others, for the reasons of
    :func:`range_estimator_for`: in a model with several inputs (image + metadata) the vector branch's tensors
    are vectors of a few features whatever the image branch holds."""
    if range_estimator != "auto":
        return {p.key: range_estimator for p in acts}
    maps = _feature_map_ops(model)
    return {p.key: "minmax" if p.key[0] in maps else "max" for p in acts}


# A per-channel activation range is at least this fraction of the tensor's widest channel (NNCF's floor for
# per-channel ranges): a dead or near-constant channel's scale stays within 100x of the others'.
MIN_CHANNEL_WIDTH = 0.01


def _activation_range(lo, hi, preset: str) -> tuple[np.ndarray, np.ndarray]:
    """The FakeQuantize range (levels=256) for observed [lo, hi] (floats, or per-channel arrays): zero is
    always exactly on the grid. A per-channel tensor is signed or unsigned as a whole (one integer type)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    width = hi - lo
    if np.ndim(width):  # per channel: no channel narrower than MIN_CHANNEL_WIDTH of the widest (as NNCF)
        hi = np.where(width < MIN_CHANNEL_WIDTH * width.max(), lo + MIN_CHANNEL_WIDTH * width.max(), hi)
    hi = np.where(hi - lo < 1e-8, lo + 1e-8, hi)
    if preset == "performance":
        if np.all(lo >= 0):
            return np.zeros_like(hi), hi  # unsigned: [0, hi]
        a = np.maximum(-lo, hi)
        return -a * 128.0 / 127.0, a  # signed symmetric on the int8 grid: 127 steps up to a, 128 down
    scale = (hi - lo) / 255.0
    zp = np.round(-lo / scale)
    return -zp * scale, (255 - zp) * scale


def act_ranges(acts: list[ActivationPoint], stats: Statistics, preset: str, estimator: str | dict) -> dict:
    """Final FakeQuantize range of every activation point (Concat inputs share theirs); per-channel points
    get one value per channel, from the extremes seen (``"max"`` where ``estimator`` is ``"minmax"``, as
    NNCF: averaging per-sample maxima clips a single channel far more often than a whole tensor).
    ``estimator``: one for all points, or per point key (:func:`point_estimators`)."""
    ranges = {}
    for p in acts:
        est = estimator if isinstance(estimator, str) else estimator[p.key]
        est = "max" if p.per_channel and est == "minmax" else est
        lo, hi = stats.range(p.key, est)
        if preset == "performance" and np.any(np.asarray(lo) < 0):
            a = stats.abs_max(p.key, est)  # signed symmetric: mean of per-sample |x| maxima
            lo, hi = -a, a
        ranges[p.key] = (lo, hi)
    groups: dict[int, list[ActivationPoint]] = {}
    for p in acts:
        if p.concat_group is not None:
            groups.setdefault(p.concat_group, []).append(p)
    for members in groups.values():
        lo = min(ranges[m.key][0] for m in members)
        hi = max(ranges[m.key][1] for m in members)
        for m in members:
            ranges[m.key] = (lo, hi)
    return {k: _activation_range(lo, hi, preset) for k, (lo, hi) in ranges.items()}


def _act_fq(output, rng):
    """FakeQuantize (256 levels) of an activation over ``rng`` = (low, high): numbers, or per-channel arrays
    (shaped to broadcast over axis 1 of the tensor)."""
    import openvino.opset13 as ops

    lo, hi = (np.asarray(v, np.float32).astype(_dtype(output)) for v in rng)
    if lo.ndim:
        shape = [1, lo.size] + [1] * (len(output.get_partial_shape()) - 2)
        lo, hi = lo.reshape(shape), hi.reshape(shape)
    return ops.fake_quantize(output, lo, hi, lo, hi, 256)


def _dtype(output) -> np.dtype:
    """The numpy type of an IR tensor: FakeQuantize limits and new constants take it (float16 in the IR of a
    Keras mixed_float16 model, whose ops OpenVINO refuses to mix with float32 inputs)."""
    return np.dtype(output.get_element_type().to_dtype())


def _float_weights(wp: WeightPoint) -> np.ndarray:
    return wp.constant.get_data().astype(np.float32)


def _weight_limit(wp: WeightPoint, w: np.ndarray) -> np.ndarray:
    """The FakeQuantize range [-limit, limit] (255 levels, step limit / 127) of the weights: their
    per-output-channel abs-max, or on the overflow fix's 7-bit grid twice that
    (:func:`tfcompress.int8_policy.weight_grid`)."""
    return weight_grid(weight_ranges(w, wp.channel_axes), wp.half_range)[0]


def _grid_weights(wp: WeightPoint) -> np.ndarray:
    """The float weights, clipped at the grid's top level: on the 7-bit grid the abs-max lies half a step above
    level 63, where the FakeQuantize would round it to 64."""
    w = _float_weights(wp)
    if not wp.half_range:
        return w
    clip = weight_grid(weight_ranges(w, wp.channel_axes), True)[1]
    return np.clip(w, -clip, clip).astype(np.float32)


def _weight_fq(wp: WeightPoint):
    """FakeQuantize of a layer's weights: symmetric per output channel on the int8 grid (255 levels), or the
    7-bit grid of the overflow fix. It reads the layer's own weight input, or, on the 7-bit grid, a new constant
    of the weights (clipped at the grid's top level there: :func:`_grid_weights`), in the type of the layer's
    weights."""
    import openvino.opset13 as ops

    dtype = _dtype(wp.op.input(1).get_source_output())
    m = _weight_limit(wp, _float_weights(wp)).astype(dtype)
    if wp.half_range:
        src = ops.constant(_grid_weights(wp).astype(dtype)).output(0)
    else:
        src = wp.op.input(1).get_source_output()
    return ops.fake_quantize(src, -m, m, -m, m, WEIGHT_LEVELS)


def _weighted_like(op, data, weights):
    """A new op of ``op``'s type and attributes on other inputs."""
    import openvino.opset13 as ops

    a = op.get_attributes()
    t = op.get_type_name()
    if t == "MatMul":
        return ops.matmul(data, weights, a["transpose_a"], a["transpose_b"])
    fn = ops.convolution if t == "Convolution" else ops.group_convolution
    return fn(data, weights, a["strides"], a["pads_begin"], a["pads_end"], a["dilations"], a["auto_pad"])


def _bias_value(op) -> np.ndarray | None:
    inp = bias_input(op)
    return None if inp is None else _through_convert(inp.get_source_output()).get_data().astype(np.float32)


def _pointwise(op) -> bool:
    """A MatMul, or a 1x1 convolution without stride or padding: its mean output is the layer applied to its
    per-channel mean input, so that mean is all fast bias correction needs."""
    if op.get_type_name() == "MatMul":
        return True
    return (op.get_type_name() == "Convolution" and list(op.get_input_shape(1))[2:] == [1, 1]
            and unpadded_stride_one(op))


# Op types whose biases fast bias correction shifts: every op whose weights are quantized. Grouped and
# depthwise convolutions are linear in their input like the others, so their shift is as exact. (NNCF's
# OpenVINO backend leaves them alone; its form of the shift holds a padding term that through a 3x3 depthwise
# layer is far larger than the rounding error.)
BIAS_CORRECTED_OPS = frozenset({"Convolution", "GroupConvolution", "MatMul"})


def bias_points(model, weights: list[WeightPoint]) -> list[tuple[WeightPoint, tuple, str]]:
    """Weighted ops that fast bias correction handles: (point, key of its input, the statistic it needs:
    ``"channel"`` means for pointwise layers, a per-position ``"map"`` for others). Ops need a type in
    :data:`BIAS_CORRECTED_OPS`, channels on axis 1 (convolutions, MatMul of a 2-D input) and a constant bias
    with one value per output channel, on that axis."""
    order = {op.get_name(): k for k, op in enumerate(model.get_ordered_ops())}
    found = []
    for wp in weights:
        if wp.op.get_type_name() not in BIAS_CORRECTED_OPS:
            continue
        rank = len(wp.op.get_output_partial_shape(0))
        if wp.op.get_type_name() == "MatMul" and (rank != 2 or wp.op.get_attributes()["transpose_a"]):
            continue
        if bias_input(wp.op) is None or not _bias_per_channel(wp.op):
            continue
        src = wp.op.input(0).get_source_output()
        key = (order[src.get_node().get_name()], src.get_index())
        found.append((wp, key, "channel" if _pointwise(wp.op) else "map"))
    return found


def _bias_per_channel(op) -> bool:
    """Whether ``op``'s bias constant holds one value per output channel along the channel axis (``[C]``,
    ``[1, C, 1, 1]`` ...), into which a shift per channel folds; not a constant as large laid along other axes
    (one per position or per sample), nor one broadcast to all channels."""
    shape = op.get_output_partial_shape(0)
    bias = _bias_value(op).shape
    if len(bias) > len(shape) or not shape[1].is_static:
        return False
    aligned = (1,) * (len(shape) - len(bias)) + bias  # numpy broadcasting aligns the trailing axes
    return aligned[1] == shape[1].get_length() and all(d == 1 for a, d in enumerate(aligned) if a != 1)


def _quantized_weights(wp: WeightPoint) -> np.ndarray:
    """The weights as the FakeQuantize of :func:`_weight_fq` leaves them (int8 grid, per output channel), in
    OpenVINO's own float32 arithmetic: ``(w - low) / (high - low) * (levels - 1)`` rounded half to even.
    ``round(w / step)`` is the same in exact arithmetic, but in float32 a weight at a rounding tie (e.g. 36.5
    steps computed as 36.499996) can land one step away from where the IR puts it, and a bias shift computed
    from it would then correct an error the IR does not make."""
    limit = _weight_limit(wp, _float_weights(wp))
    width, levels = limit + limit, np.float32(WEIGHT_LEVELS - 1)
    q = np.round((_grid_weights(wp) + limit) / width * levels)
    return (q / levels * width - limit).astype(np.float32)


def _lost_weights(wp: WeightPoint) -> np.ndarray:
    """The float weights minus the quantized ones (:func:`_quantized_weights`): what quantization takes from a
    layer's weights. The layer being linear in its weights, the layer run with these on an input is what its
    quantized form misses of its float output there."""
    return _float_weights(wp) - _quantized_weights(wp)


def fast_bias_shifts(points, stats: Statistics) -> dict:
    """Per layer: its mean FP32 output minus its mean output with quantized weights, on the calibration data.

    A fast bias correction from the statistics pass alone. Convolutions and MatMul are linear in their input,
    so the mean output is the layer applied to the mean input, on both sides: a pointwise layer's per-channel
    mean input (numpy), another layer's input averaged over the samples, a per-position map (these layers run
    side by side in one small model: :func:`_map_shifts`). The shift is thus exactly the mean error the
    weights' rounding adds to the layer's output, and nothing else, and every channel gets its own whatever its
    bias: a channel whose bias is 0 or small against its shift is as exactly corrected as the others.

    NNCF's fast bias correction runs the quantized side of a spatial layer on a constant map of the per-channel
    means instead. Its shift then also holds ``conv(mean map) - conv(channel means)``, how the input's spatial
    pattern meets padding and strides, which has nothing to do with quantization and is often ten times the
    rounding error; it therefore skips a layer when any channel's shift exceeds twice that channel's bias, which
    admits that term for some layers and not for others (on a pruned ResNet-8, 9 accuracy points lost;
    BENCHMARKS.md 3k). The exact shift has no such term to keep out, so no channel is skipped.
    """
    raw: dict = {}
    mapped = []
    for wp, in_key, kind in points:
        mean = stats.means.get((in_key, kind))
        if mean is None:
            continue
        if kind == "map":
            mapped.append((wp, mean))
            continue
        m = mean.astype(np.float64).reshape(-1)
        lost = _lost_weights(wp).astype(np.float64)
        if wp.op.get_type_name() == "MatMul":  # y = x @ W, or x @ W.T with transpose_b
            raw[wp.key] = m @ (lost.T if wp.op.get_attributes()["transpose_b"] else lost)
        else:  # 1x1 convolution, weights [O, I, 1, 1]
            raw[wp.key] = lost[:, :, 0, 0] @ m
    if mapped:
        raw.update(_map_shifts(mapped))
    return {k: v.astype(np.float32).reshape(-1) for k, v in raw.items()}


def _map_shifts(mapped: list) -> dict:
    """The shifts of non-pointwise layers (:func:`fast_bias_shifts`): ``mapped`` holds ``(point, maps)`` with
    ``maps`` the layer's mean input per sample shape and that shape's share of the samples
    (:class:`~tfcompress.calibration.statistics.Statistics`). Per shape, the layer's mean output over positions
    on the mean map minus the quantized layer's on the same map: the layer with the weights quantization takes
    away (:func:`_lost_weights`) on that map, averaged over positions; the shift weighs each shape by its
    share, as if every sample had been corrected alone. All layers run side by side in one small f32 model,
    compiled once, with the dimensions that differ between shapes left dynamic, and run once per shape."""
    import openvino as ov
    import openvino.opset13 as ops

    params, results = [], []
    for wp, maps in mapped:
        shapes = [m.shape for m, _ in maps]
        dims = [d if all(s[a] == d for s in shapes) else -1 for a, d in enumerate(shapes[0])]
        axes = np.array([a for a in range(len(dims) + 1) if a != 1], np.int64)
        p = ops.parameter(ov.PartialShape([1, *dims]), ov.Type.f32)
        params.append(p)
        missed = _weighted_like(wp.op, p, ops.constant(_lost_weights(wp)).output(0))
        results.append(ops.reduce_mean(missed, axes, keep_dims=False).output(0))
    compiled = ov.Core().compile_model(ov.Model(results, params), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    raw = {wp.key: 0.0 for wp, _ in mapped}
    for g in range(len(mapped[0][1])):  # every point has one map per sample shape, in the same order
        out = compiled([maps[g][0].astype(np.float32)[None] for _, maps in mapped])  # a batch of 1
        for k, (wp, maps) in enumerate(mapped):
            raw[wp.key] = raw[wp.key] + maps[g][1] * np.asarray(out[compiled.outputs[k]], np.float64)
    return raw


def _build(model, ranges: dict, shifts: dict, skip_ops=frozenset(), ignored_layers=(), overflow_fix="disable"):
    """A quantized clone of ``model``; ops at positions ``skip_ops`` stay float.

    Weights end up as int8 constants (:func:`compress_weights`), in every model accuracy control validates
    too: with some layers reverted, the plugin does not always run the two forms alike.
    """
    import openvino.opset13 as ops

    q = model.clone()
    acts, weights = find_points(q, ignored_layers, overflow_fix)
    order = {op.get_name(): k for k, op in enumerate(q.get_ordered_ops())}
    for p in acts:
        targets = [t for t in p.targets if order[t.get_node().get_name()] not in skip_ops]
        if not targets:
            continue
        fq = _act_fq(p.output, ranges[p.key])
        for t in targets:
            t.replace_source_output(fq.output(0))
    for wp in weights:
        if wp.key in skip_ops:
            continue
        wp.op.input(1).replace_source_output(_weight_fq(wp).output(0))
        if wp.key in shifts:
            _shift_bias(wp, shifts[wp.key], ops)
    rewrite_for_cpu(q)
    q.validate_nodes_and_infer_types()
    compress_weights(q)
    return q


def _shift_bias(wp: WeightPoint, shift: np.ndarray, ops) -> None:
    """Add ``shift`` (per output channel) to the layer's bias constant (:func:`placement.bias_input`)."""
    bias_input(wp.op).replace_source_output(_shifted_bias(wp, shift))


def _shifted_bias(wp: WeightPoint, shift: np.ndarray):
    """A new constant: the layer's bias plus ``shift`` (per output channel), in the bias input's type."""
    import openvino.opset13 as ops

    b = _bias_value(wp.op)
    shifted = (b.reshape(-1) + shift.reshape(-1)).reshape(b.shape)
    return ops.constant(shifted.astype(_dtype(bias_input(wp.op).get_source_output()))).output(0)


def calibrate(
    ov_model,
    calibration_data: Iterable,
    preset: str = "performance",
    subset_size: int = 300,
    bias_correction: bool = True,
    channel_alignment: bool = False,
    ignored_layers: Iterable[str] = (),
    range_estimator: str = "auto",
    overflow_fix: str = "first_layer",
    verbose: bool = True,
):
    """An INT8 version of ``ov_model`` (FakeQuantize placed where OpenVINO's CPU plugin runs INT8).

    Activations feeding Convolution, GroupConvolution and MatMul, both inputs of residual Adds and pooling
    inputs are quantized per tensor (``preset="performance"``: symmetric; ``"mixed"``: asymmetric), with
    ranges from one statistics pass: ``range_estimator="minmax"`` takes the min of per-sample minima and the
    mean of per-sample maxima (for signed symmetric tensors the mean of per-sample absolute maxima, as NNCF),
    ``"max"`` the largest values seen, ``"quantile"`` the 1e-4 quantiles, and ``"auto"`` (the default)
    ``"minmax"`` on models with 2-D feature maps and ``"max"`` on others (:func:`range_estimator_for`), tensor
    by tensor: a vector branch of a model with an image input gets ``"max"`` (:func:`point_estimators`);
    Concat inputs share one range. Weights are quantized symmetrically per output channel on the int8 grid
    (levels=255 over [-m, m]). Bias correction (a fast bias correction, :func:`fast_bias_shifts`)
    shifts each layer's bias by the difference between its mean FP32 output and its quantized output on its
    mean input, both from the same statistics pass. FakeQuantize ops already in the model (from QAT) stay.
    ``channel_alignment`` first equalizes the channels of tensors between two convolutions with nothing
    non-linear in between (:mod:`tfcompress.calibration.alignment`; one more statistics pass, only when the
    model has such pairs, e.g. MobileNetV2's linear bottlenecks).

    Args:
        ov_model: an ``openvino.Model`` or an IR path; not modified.
        calibration_data: samples: an array (N, ...), or an iterable of samples, batches or (x, y) pairs,
            e.g. a ``tf.data.Dataset``. For a model with several inputs, one array per input wherever one
            array goes: a dict from input name (the IR's input tensor names, those of the SavedModel
            signature) to array, or a tuple / list in input order
            (:func:`~tfcompress.calibration.samples.iterate_samples`).
        subset_size: how many samples to use.
        ignored_layers: friendly names of layers to keep in float.
        overflow_fix: ``"first_layer"`` (default, as NNCF), ``"enable"`` or ``"disable"``: which layers'
            weights use only 7 bits, so that CPUs without VNNI cannot saturate
            (:data:`~tfcompress.calibration.placement.OVERFLOW_FIX`).

    Returns:
        A new ``openvino.Model``; quantized weights are stored as int8 constants (as ``nncf.quantize``
        returns them: the saved IR is ~4x smaller than FP32, the compiled model the same).
    """
    _check_args(preset, subset_size, channel_alignment, range_estimator, overflow_fix)
    model = _read(ov_model)
    if channel_alignment:
        model = _aligned(model, calibration_data, subset_size, ignored_layers, verbose)
    ranges, shifts = _calibration_state(model, calibration_data, preset, subset_size, bias_correction,
                                        ignored_layers, range_estimator, overflow_fix, verbose)
    return _build(model, ranges, shifts, ignored_layers=ignored_layers, overflow_fix=overflow_fix)


def _aligned(model, data, subset_size: int, ignored_layers, verbose: bool):
    """A clone of ``model`` with its convolution -> convolution tensors channel-aligned (or ``model``)."""
    pairs = alignment_pairs(model, ignored_layers)
    if not pairs:
        return model
    model = model.clone()
    ranges = channel_ranges(model, sorted({p.tensor for p in pairs}), data, subset_size, QUANTILE, verbose=verbose)
    align(model, pairs, ranges)
    return model


def _calibration_state(model, data, preset, subset_size, bias_correction, ignored_layers, estimator,
                       overflow_fix, verbose):
    """One statistics pass: activation ranges and, with ``bias_correction``, every layer's bias shift."""
    acts, weights = find_points(model, ignored_layers, overflow_fix)
    estimators = point_estimators(model, acts, estimator)
    corrected = bias_points(model, weights) if bias_correction else []
    # in f32, as NNCF's statistics pass: a bf16 pass (the default on CPUs with AVX512-BF16 or AMX) rounds every
    # maximum to 8 mantissa bits, so the ranges and means would be those of a rounded model
    stats = collect(model, acts, data, subset_size, verbose=verbose, quantiles=estimator == "quantile",
                    precision="f32", mean_points=sorted({(key, kind) for _, key, kind in corrected}))
    ranges = act_ranges(acts, stats, preset, estimators)
    shifts = fast_bias_shifts(corrected, stats) if corrected else {}
    return ranges, shifts


def compress_weights(model) -> None:
    """Store FakeQuantized constant weights as int8 (in place): the IR shrinks ~4x vs FP32, same results."""
    from openvino._offline_transformations import compress_quantize_weights_transformation

    compress_quantize_weights_transformation(model)


# the CPU plugin's runtime layer types of the ops whose weights int8_layers counts
_WEIGHTED_RUNTIME_TYPES = ("Convolution", "Deconvolution", "FullyConnected")


def runs_int8(op) -> bool:
    """Whether an op of a compiled model's runtime graph computes on 8-bit data: its data input is u8 or i8.

    Its ``runtimePrecision`` does not say so for every layer type: a Deconvolution reports ``i8`` also when it
    converts its u8 data to f32 and runs an f32 kernel on int8 weights, as the CPU plugin does on CPUs without
    AVX-512 for shapes it cannot run in INT8 (:func:`~tfcompress.calibration.cpu.cpu_int8_deconvolution_needs_static_shapes`)."""
    return op.get_input_element_type(0).get_type_name() in ("u8", "i8")


def int8_layers(compiled) -> dict:
    """How many weighted layers of a compiled model (runtime types Convolution, including grouped and depthwise
    ones, Deconvolution for transposed convolutions, FullyConnected) really run INT8 (:func:`runs_int8`)."""
    total = int8 = 0
    for op in compiled.get_runtime_model().get_ops():
        if op.get_rt_info()["layerType"].astype(str) in _WEIGHTED_RUNTIME_TYPES:
            total += 1
            int8 += runs_int8(op)
    return {"int8": int8, "total": total}
