"""Where inference time goes, per Keras layer, measured with OpenVINO; what one channel of a group costs in it.

:func:`measure_latency_profile` compiles the model's OpenVINO IR with per-node profiling, runs it and charges
each executed node's time to the convolution or dense layer it computes. The converter renames the ops it moves
layout transposes through (``Transpose_5815``), so layers are found by their weights rather than names: each
OpenVINO Convolution, GroupConvolution or MatMul with constant weights is matched to the Keras layer whose kernel
has the same dimensions (in any order) and the same sum of magnitudes; kernels alike in both (e.g. all zero)
are matched in graph order. Ops OpenVINO fuses into a convolution
(BatchNormalization, activations, residual adds) are in that node, so their time is the convolution's.
Unmatched nodes (layout reorders, pooling, unfused elementwise ops) are not charged to any layer.

:func:`channel_seconds` turns a profile into a per-channel cost: each op's time per multiply-accumulate times
the multiply-accumulates that one channel of the group takes from it, summed over the ops the channel reaches.
"""

from __future__ import annotations

import tempfile
from typing import Iterable, Mapping

import keras
import numpy as np

from tfcompress.graph.engine import ChannelGroup
from tfcompress.graph.flops import FlopsCounter

__all__ = ["measure_latency_profile", "channel_seconds"]

_ENGINE_OPS = ("Convolution", "GroupConvolution", "MatMul")


def _weighted_layers(model: keras.Model, prefix: str = "") -> Iterable[tuple[str, keras.layers.Layer]]:
    """(name, layer) of every layer with a kernel, nested models' layers named ``outer/inner``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _weighted_layers(layer, f"{prefix}{layer.name}/")
        elif _kernels(layer):
            yield f"{prefix}{layer.name}", layer


def _kernels(layer: keras.layers.Layer) -> list:
    """The layer's kernels: one engine op each (a separable convolution has a depthwise and a pointwise one)."""
    return [w for attr in ("kernel", "depthwise_kernel", "pointwise_kernel")
            if (w := getattr(layer, attr, None)) is not None]


def _signature(shape: Iterable[int]) -> tuple[int, ...]:
    """A weight shape up to transposition and unit axes (how the converter lays kernels out differs)."""
    return tuple(sorted(int(d) for d in shape if int(d) != 1))


def _ov_engine_ops(ov_model) -> list:
    ops = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() in _ENGINE_OPS and op.get_input_size() >= 2:
            if op.input_value(1).get_node().get_type_name() in ("Constant", "Convert", "Multiply", "Reshape"):
                ops.append(op)
    return ops


def _magnitude(values) -> float:
    """A kernel's sum of magnitudes to 4 significant digits (float rounding differs between the frameworks)."""
    return float(f"{float(np.abs(np.asarray(values, np.float64)).sum()):.4g}")


def _ov_fingerprint(op) -> tuple:
    weights = op.input_value(1).get_node()
    shape = op.input_value(1).get_partial_shape().to_shape()
    magnitude = _magnitude(weights.get_data()) if weights.get_type_name() == "Constant" else None
    return _signature(shape), magnitude


def _match(model: keras.Model, ov_model) -> dict[str, str]:
    """OpenVINO engine op friendly name -> Keras layer name, matched by kernel shape and magnitude (weights
    that are not a plain constant in the IR: by shape alone), in graph order among equals."""
    by_sig: dict[tuple, list[str]] = {}
    for name, layer in _weighted_layers(model):
        for kernel in _kernels(layer):
            sig = _signature(kernel.shape)
            by_sig.setdefault((sig, _magnitude(keras.ops.convert_to_numpy(kernel))), []).append(name)
            by_sig.setdefault((sig, None), []).append(name)
    used: set[tuple] = set()  # (layer name, kernel signature): a kernel is matched once
    out = {}
    for op in _ov_engine_ops(ov_model):
        key = _ov_fingerprint(op)
        free = [n for n in by_sig.get(key, []) if (n, key[0]) not in used]
        if not free:
            free = [n for n in by_sig.get((key[0], None), []) if (n, key[0]) not in used]
        if free:
            out[op.get_friendly_name()] = free[0]
            used.add((free[0], key[0]))
    return out


def measure_latency_profile(model: keras.Model, batch_size: int = 1, iterations: int = 20,
                            precision: str | None = "f32", device: str = "CPU",
                            calibration_data: np.ndarray | None = None) -> dict[str, float]:
    """Seconds per inference of a ``batch_size`` batch spent in each convolution/dense layer of ``model``.

    The model is exported (``model.export``), converted with ``openvino.convert_model`` and compiled with
    ``PERF_COUNT`` and ``INFERENCE_PRECISION_HINT=precision`` (``"f32"``, ``"bf16"``...; None: the device's
    default); each layer's time is its median over ``iterations`` inferences of random inputs after one warm-up.
    Profile what you deploy: with ``calibration_data`` (input samples) the converted model is first quantized by
    :func:`tfcompress.calibration.calibrate`, so the profile is of the INT8 model, whose convolutions divide
    their time differently from the float model's (memory-bound layers weigh more in INT8).
    Keys are layer names (``outer/inner`` inside nested models); the profile is what
    ``FilterPruning(flops_allocation="global_per_latency", latency_profile=...)`` takes.
    """
    import openvino as ov

    if len(model.inputs) != 1:
        raise ValueError(f"measure_latency_profile supports single-input models; {model.name!r} has "
                         f"{len(model.inputs)} inputs")
    if int(batch_size) < 1 or int(iterations) < 1:
        raise ValueError(f"batch_size and iterations must be >= 1, got {batch_size!r} and {iterations!r}")
    shape = [int(batch_size), *(int(d) for d in model.inputs[0].shape[1:])]
    with tempfile.TemporaryDirectory() as d:
        model.export(d, verbose=False)
        ov_model = ov.convert_model(d)
    layer_of = _match(model, ov_model)
    if calibration_data is not None:
        from tfcompress.calibration import calibrate

        samples = np.asarray(calibration_data, np.float32)
        ov_model = calibrate(ov_model, samples, subset_size=len(samples), verbose=False)
    ov_model.reshape({ov_model.inputs[0]: shape})
    config = {"PERF_COUNT": "YES"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, device, config)
    origin = {}  # runtime node -> Keras layer of the engine op it computes
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else []
        hits = [layer_of[n] for n in names if n in layer_of]
        if hits:
            origin[op.get_friendly_name()] = hits[0]
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request.infer([x])
    runs = []
    for _ in range(int(iterations)):
        request.infer([x])
        seconds = dict.fromkeys(layer_of.values(), 0.0)
        for p in request.profiling_info:
            if p.node_name in origin:
                seconds[origin[p.node_name]] += p.real_time.total_seconds()
        runs.append(seconds)
    # the median run of each layer: a shared machine's interruptions land in a few runs
    return {name: float(np.median([r[name] for r in runs])) for name in runs[0]}


def channel_seconds(counter: FlopsCounter, groups: Iterable[ChannelGroup],
                    profile: Mapping[str, float]) -> dict[int, float]:
    """Per group id: the seconds one of its channels costs, all other channels present.

    Each op of ``counter``'s graph is charged its layer's measured seconds per multiply-accumulate (``profile``
    seconds / the MACs of all the layer's ops at full width: the calls of a shared layer share its seconds);
    an op with MACs whose layer the profile lacks gets the profile's mean seconds per MAC.
    """
    full = counter.op_macs()
    layer_macs: dict[str, float] = {}
    for op, m in zip(counter.ops, full):
        layer_macs[op.layer] = layer_macs.get(op.layer, 0.0) + m
    timed = np.array([op.layer in profile and m > 0 for op, m in zip(counter.ops, full)], bool)
    rate = np.array([profile[op.layer] / layer_macs[op.layer] if t else 0.0 for op, t in zip(counter.ops, timed)])
    spent = sum(profile[layer] for layer in {op.layer for op, t in zip(counter.ops, timed) if t})
    rate = np.where(timed, rate, spent / max(full[timed].sum(), 1e-30))
    out = {}
    for g in groups:
        one = np.zeros(g.size, dtype=bool)
        one[0] = True
        out[g.id] = float(rate @ (full - counter.op_macs({g.id: one})))
    return out
