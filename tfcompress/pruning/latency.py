"""Where inference time goes, per Keras layer, measured with OpenVINO; what one channel of a group costs in it.

:func:`measure_latency_profile` compiles the model's OpenVINO IR with per-node profiling, runs it and charges
each executed node's time to the Keras layer whose weights it computes with. The converter renames the ops it
moves layout transposes through (``Transpose_5815``), so layers are found by their weights rather than names:
each OpenVINO op that multiplies by, or looks up in, constant weights (Convolution, GroupConvolution and their
transposed forms, MatMul, Einsum, an Embedding's Gather) is matched to the Keras layer holding a weight of the
same number of values and the same sum of magnitudes (its layout, reshaped heads of an attention projection
included, may differ); weights alike in both (e.g. all zero) are matched in graph order, and further ops with a
matched weight are further calls of its layer (a tower shared by two inputs), whose times add up. A recurrent
layer (LSTM, GRU, SimpleRNN, each direction of a Bidirectional) runs as a loop whose body holds its kernels: the
whole loop is charged to the layer. Ops OpenVINO fuses into a convolution (BatchNormalization, activations,
residual adds) are in that node, so their time is the convolution's. Ops on a path between two matched ops of
one layer are that layer's too (a MultiHeadAttention's score products and softmax, between its projections), and
so are the nodes the CPU plugin makes from an op when it compiles (the MatMuls it decomposes an Einsum into,
which carry no IR op's name). Other nodes (layout reorders, pooling, unfused normalizations and elementwise ops)
are not charged to any layer.

:func:`channel_seconds` turns a profile into a per-channel cost: each op's time per multiply-accumulate times
the multiply-accumulates that one channel of the group takes from it, summed over the ops the channel reaches.
"""

from __future__ import annotations

import tempfile
from typing import Iterable, Iterator, Mapping, Sequence

import keras
import numpy as np

from tfcompress.calibration.samples import ModelInput, iterate_samples
from tfcompress.graph.engine import ChannelGroup
from tfcompress.graph.flops import FlopsCounter
from tfcompress.graph.keras_adapter import call_path

__all__ = ["measure_latency_profile", "channel_seconds"]

# OpenVINO ops that compute with weights, and which of their inputs may be the weights (None: any)
_WEIGHTED_OPS = {"Convolution": (1,), "GroupConvolution": (1,), "ConvolutionBackpropData": (1,),
                 "GroupConvolutionBackpropData": (1,), "MatMul": (0, 1), "Einsum": None, "Gather": (0,)}
# ops that run a body graph once per step (a recurrent layer's time loop)
_LOOPS = ("Loop", "TensorIterator")


def _weighted_layers(model: keras.Model, prefix: str = "") -> Iterable[tuple[str, keras.layers.Layer]]:
    """(name, layer) of every layer with weights to find in the IR, nested models' layers named ``outer/inner``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _weighted_layers(layer, f"{prefix}{layer.name}/")
        elif _kernels(layer):
            yield f"{prefix}{layer.name}", layer


def _kernels(layer: keras.layers.Layer) -> list:
    """The weights the layer multiplies or looks up its inputs in, its own and its sublayers' (a recurrent
    layer's cell, attention's projections, a Bidirectional's two layers): those of two or more dimensions (a
    bias, a normalization's scale or a quantizer's range has one)."""
    return [w for w in layer.weights if len(w.shape) >= 2]


def _signature(shape: Iterable[int]) -> tuple[int, ...]:
    """A weight shape up to transposition and unit axes (how the converter lays kernels out differs)."""
    return tuple(sorted(int(d) for d in shape if int(d) != 1))


def _is_constant(output, seen: dict) -> bool:
    """Whether ``output`` is computed from constants alone (a weight, or one decompressed or fake-quantized)."""
    node = output.get_node()
    name = node.get_name()
    if name not in seen:
        seen[name] = node.get_type_name() == "Constant" or (
            node.get_type_name() not in ("Parameter",) + _LOOPS and node.get_input_size() > 0
            and all(_is_constant(i.get_source_output(), seen) for i in node.inputs()))
    return seen[name]


def _ov_weights(ov_model) -> Iterator[tuple[str, object]]:
    """(name of the op to charge, weight output) of every weighted op (:data:`_WEIGHTED_OPS`) with a constant
    weight, in graph order; ops inside a loop's body are charged to the loop."""
    seen: dict = {}
    for op in ov_model.get_ordered_ops():
        t = op.get_type_name()
        if t in _LOOPS:
            yield from ((op.get_friendly_name(), w) for _, w in _ov_weights(op.get_function()))
        elif t in _WEIGHTED_OPS:
            ports = _WEIGHTED_OPS[t] or range(op.get_input_size())
            for k in ports:  # weights have two or more dimensions, as the Keras side's (:func:`_kernels`)
                if k < op.get_input_size() and len(op.input_value(k).get_partial_shape()) >= 2 \
                        and _is_constant(op.input_value(k), seen):
                    yield op.get_friendly_name(), op.input_value(k)


def _magnitude(values) -> float:
    """A kernel's sum of magnitudes to 4 significant digits (float rounding differs between the frameworks)."""
    return float(f"{float(np.abs(np.asarray(values, np.float64)).sum()):.4g}")


def _ov_fingerprint(weight) -> tuple:
    """(size, magnitude) of a weight held in a plain constant (magnitude None otherwise: decompressed or
    fake-quantized weights), and its shape signature."""
    shape = weight.get_partial_shape().to_shape()
    node = weight.get_node()
    magnitude = _magnitude(node.get_data()) if node.get_type_name() == "Constant" else None
    return (int(np.prod(shape)), magnitude), _signature(shape)


def _match(model: keras.Model, ov_model) -> dict[str, str]:
    """OpenVINO op friendly name -> Keras layer name, matched by their weights' size and magnitude, in graph
    order among equals; an op whose weights equal those of a layer matched already is another call of that
    layer (a tower shared by two inputs), before any layer is matched by shape alone (weights that are not a
    plain constant in the IR, or whose rounded magnitude differs)."""
    by_value: dict[tuple, list[tuple[str, int]]] = {}  # (size, magnitude) -> kernels (layer name, index)
    by_shape: dict[tuple, list[tuple[str, int]]] = {}
    for name, layer in _weighted_layers(model):
        for k, kernel in enumerate(_kernels(layer)):
            values = keras.ops.convert_to_numpy(kernel)
            by_value.setdefault((values.size, _magnitude(values)), []).append((name, k))
            by_shape.setdefault(_signature(kernel.shape), []).append((name, k))
    used: set[tuple[str, int]] = set()  # a kernel is matched once per call
    out = {}
    for op_name, weight in _ov_weights(ov_model):
        value, shape = _ov_fingerprint(weight)
        free = [k for k in by_value.get(value, []) if k not in used]
        if not free and value[1] is not None:  # another call of a layer matched already
            free = by_value.get(value, [])
        if not free:
            free = [k for k in by_shape.get(shape, []) if k not in used]
        if free:
            out[op_name] = free[0][0]
            used.add(free[0])
    return {**out, **_between(ov_model, out)}


def _between(ov_model, layer_of: Mapping[str, str]) -> dict[str, str]:
    """Unmatched ops on a path from one matched op of a layer to another of the same layer, charged to it: the
    attention scores and softmax between a MultiHeadAttention's query/key/value projections and its output
    projection (part of its multiply-accumulates, but computed without weights)."""
    ops = list(ov_model.get_ordered_ops())
    readers = {op.get_friendly_name(): [t.get_node().get_friendly_name() for out in op.outputs()
                                        for t in out.get_target_inputs()] for op in ops}
    producers = {op.get_friendly_name(): [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
                 for op in ops}
    out = {}
    for layer in set(layer_of.values()):
        mine = {n for n, owner in layer_of.items() if owner == layer}
        if len(mine) > 1:
            between = _reach(mine, readers) & _reach(mine, producers)
            out.update({n: layer for n in between if n not in layer_of})
    return out


def _reach(start: set[str], edges: Mapping[str, list[str]]) -> set[str]:
    """The ops reached from ``start`` along ``edges`` (``start`` not included unless reached again)."""
    seen, todo = set(), [n for s in start for n in edges.get(s, [])]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges.get(n, [])
    return seen


def measure_latency_profile(model: keras.Model, batch_size: int = 1, iterations: int = 20,
                            precision: str | None = "f32", device: str = "CPU", calibration_data=None,
                            input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
                            ) -> dict[str, float]:
    """Seconds per inference of a ``batch_size`` batch spent in each convolution/dense layer of ``model``.

    The model is exported (``model.export``), converted with ``openvino.convert_model`` and compiled with
    ``PERF_COUNT`` and ``INFERENCE_PRECISION_HINT=precision`` (``"f32"``, ``"bf16"``...; None: the device's
    default); each layer's time is its median over ``iterations`` inferences after one warm-up, every model
    input fed a ``batch_size`` batch (random normal values; zeros for integer inputs, a valid index anywhere).
    Profile what you deploy: with ``calibration_data`` the converted model is first quantized by
    :func:`tfcompress.calibration.calibrate`, so the profile is of the INT8 model, whose convolutions divide
    their time differently from the float model's (memory-bound layers weigh more in INT8).
    Keys are layer names (``outer/inner`` inside nested models); the profile is what
    ``FilterPruning(flops_allocation="global_per_latency", latency_profile=...)`` takes.

    Args:
        model: a Keras model with one or more inputs (Functional, Sequential, nested models).
        calibration_data: input samples in any form ``calibrate`` takes, with the model's inputs by their Keras
            names: an array (one input), a dict from input name to array, a tuple / list of arrays in
            ``model.inputs`` order, ``(x, y)`` pairs, or an iterable of those
            (:func:`~tfcompress.calibration.samples.iterate_samples`). All are used.
        input_shapes: the shape of one sample (no batch axis) of inputs with unknown dimensions (e.g.
            ``(None, None, 3)`` images, variable-length sequences), by input name, or one shape for a
            single-input model: the shape profiled. An input it does not name takes the first calibration
            sample's shape; without calibration data, an unknown dimension is an error.

    Raises:
        ValueError, before any export: bad ``batch_size`` / ``iterations``, calibration samples that do not fit
        the inputs (missing or unknown names, shapes, counts), ``input_shapes`` that do not fit them, an input
        with unknown dimensions that neither ``input_shapes`` nor ``calibration_data`` gives.
    """
    import openvino as ov

    if int(batch_size) < 1 or int(iterations) < 1:
        raise ValueError(f"batch_size and iterations must be >= 1, got {batch_size!r} and {iterations!r}")
    inputs = _keras_inputs(model)
    samples = _samples(calibration_data, inputs) if calibration_data is not None else []
    shapes = _profiled_shapes(model, inputs, input_shapes, samples[0] if samples else None)
    with tempfile.TemporaryDirectory() as d:
        model.export(d, verbose=False)
        ov_model = ov.convert_model(d)
    _check_names(ov_model, inputs)
    layer_of = _match(model, ov_model)
    if samples:
        from tfcompress.calibration import calibrate

        by_name = [{inp.name: part for inp, part in zip(inputs, sample)} for sample in samples]
        ov_model = calibrate(ov_model, by_name, subset_size=len(by_name), verbose=False)
    ov_model.reshape({inp.name: [int(batch_size), *shape] for inp, shape in zip(inputs, shapes)})
    config = {"PERF_COUNT": "YES"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, device, config)
    rng = np.random.default_rng(0)
    feed = {inp.name: _random_batch(rng, inp.dtype, (int(batch_size), *shape)) for inp, shape in zip(inputs, shapes)}
    known = {op.get_friendly_name() for op in ov_model.get_ordered_ops()}
    return _layer_seconds(compiled, layer_of, known, feed, int(iterations))


def _layer_seconds(compiled, layer_of: Mapping[str, str], known: set[str], feed: dict,
                   iterations: int) -> dict[str, float]:
    """Per Keras layer, the median over ``iterations`` inferences (after one warm-up) of the time of the runtime
    nodes that compute its ops (``layer_of``: IR op name -> layer; ``known``: every op name of the compiled IR,
    :func:`_runtime_origins`)."""
    origin = _runtime_origins(compiled.get_runtime_model(), layer_of, known)
    request = compiled.create_infer_request()
    request.infer(feed)
    runs = []
    for _ in range(iterations):
        request.infer(feed)
        seconds = dict.fromkeys(layer_of.values(), 0.0)
        for p in request.profiling_info:
            if p.node_name in origin:
                seconds[origin[p.node_name]] += p.real_time.total_seconds()
        runs.append(seconds)
    # the median run of each layer: a shared machine's interruptions land in a few runs
    return {name: float(np.median([r[name] for r in runs])) for name in runs[0]}


def _runtime_origins(runtime, layer_of: Mapping[str, str], known: set[str]) -> dict[str, str]:
    """Runtime node -> the Keras layer it computes: that of an IR op it was made from (``layer_of``), or, for a
    node the plugin made itself (from none of the IR's ops ``known``, e.g. the MatMul it decomposes an Einsum
    into, whose name only the decomposition's last node keeps), that of the node(s) reading it, when they
    are one layer's."""
    origin: dict[str, str] = {}
    for op in reversed(runtime.get_ordered_ops()):  # readers first
        info = op.get_rt_info()
        names = [n for n in info["originalLayersNames"].astype(str).split(",") if n] \
            if "originalLayersNames" in info else []
        hits = [layer_of[n] for n in names if n in layer_of]
        if not hits and names and not any(n in known for n in names):
            hits = list({origin.get(t.get_node().get_friendly_name()) for out in op.outputs()
                         for t in out.get_target_inputs()})
            hits = hits if len(hits) == 1 and hits[0] is not None else []
        if hits:
            origin[op.get_friendly_name()] = hits[0]
    return origin


def _keras_inputs(model: keras.Model) -> list[ModelInput]:
    """The model's inputs as the sample parser describes them, in ``model.inputs`` order: named as
    ``model.export`` names them in the SavedModel signature, so also in the converted model (the Keras names)."""
    return [ModelInput(frozenset({t.name}), tuple(None if d is None else int(d) for d in t.shape), np.dtype(t.dtype))
            for t in model.inputs]


def _samples(data, inputs: Sequence[ModelInput]) -> list[tuple]:
    """Every calibration sample, one array per input (checked against the inputs: ValueError)."""
    samples = list(iterate_samples(data, inputs))
    if not samples:
        raise ValueError("calibration_data holds no samples")
    return samples


def _given_shapes(inputs: Sequence[ModelInput], input_shapes) -> dict[str, tuple]:
    """``input_shapes`` as input name -> sample shape; ValueError for unknown names or a bare shape given for
    a model with several inputs."""
    if input_shapes is None:
        return {}
    names = [inp.name for inp in inputs]
    if not isinstance(input_shapes, Mapping):
        if len(inputs) > 1:
            raise ValueError(f"input_shapes: the model has {len(inputs)} inputs {names}; give a dict from input "
                             f"name to the shape of one sample, got {input_shapes!r}")
        input_shapes = {names[0]: input_shapes}
    unknown = [k for k in input_shapes if k not in names]
    if unknown:
        raise ValueError(f"input_shapes names unknown input(s) {unknown}; the model's inputs are {names}")
    return {k: tuple(v) for k, v in input_shapes.items()}


def _profiled_shapes(model: keras.Model, inputs: Sequence[ModelInput], input_shapes,
                     first_sample: tuple | None) -> list[tuple[int, ...]]:
    """Each input's sample shape (no batch axis) to profile: ``input_shapes``' where it names the input,
    else the first calibration sample's, else the model's (ValueError where that has unknown dimensions)."""
    given = _given_shapes(inputs, input_shapes)
    shapes = []
    for i, inp in enumerate(inputs):
        dims = inp.dims[1:]
        if inp.name in given:
            shape = given[inp.name]
            fits = len(shape) == len(dims) and all(isinstance(s, (int, np.integer)) and s >= 1 and d in (None, s)
                                                   for d, s in zip(dims, shape))
            if not fits:
                raise ValueError(f"input_shapes[{inp.name!r}] must be the shape of one sample of that input, "
                                 f"{inp.sample_shape()} with positive integers for '?', got {shape!r}")
        elif first_sample is not None:
            shape = first_sample[i].shape[1:]
        elif None in dims:
            raise ValueError(f"input {inp.name!r} of {model.name!r} has unknown dimensions {inp.sample_shape()}: "
                             f"pass input_shapes={{{inp.name!r}: (...)}} (the shape of one sample to profile) "
                             f"or calibration_data")
        else:
            shape = dims
        shapes.append(tuple(int(s) for s in shape))
    return shapes


def _check_names(ov_model, inputs: Sequence[ModelInput]) -> None:
    """The converted model's inputs are the Keras inputs by name (what feeding and reshaping by name needs)."""
    converted = {name for port in ov_model.inputs for name in port.get_names()}
    missing = [inp.name for inp in inputs if inp.name not in converted]
    if missing or len(ov_model.inputs) != len(inputs):
        raise RuntimeError(f"the converted model's inputs {sorted(converted)} are not the Keras model's "
                           f"{[inp.name for inp in inputs]}")


def _random_batch(rng: np.random.Generator, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """Standard normal values for a float input, zeros for others (index 0 is valid in any lookup)."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype)


def channel_seconds(counter: FlopsCounter, groups: Iterable[ChannelGroup],
                    profile: Mapping[str, float]) -> dict[int, float]:
    """Per group id: the seconds one of its channels costs, all other channels present.

    Each op of ``counter``'s graph is charged its layer's measured seconds per multiply-accumulate (``profile``
    seconds / the MACs of all the layer's ops at full width: the calls of a shared layer share its seconds);
    an op with MACs whose layer the profile lacks gets the profile's mean seconds per MAC.
    """
    full = counter.op_macs()
    # the layer whose time each op is: a part of a call (a MultiHeadAttention's heads) is its call's layer's
    layers = [op.layer if op.layer in profile else call_path(op.layer) for op in counter.ops]
    layer_macs: dict[str, float] = {}
    for layer, m in zip(layers, full):
        layer_macs[layer] = layer_macs.get(layer, 0.0) + m
    timed = np.array([layer in profile and m > 0 for layer, m in zip(layers, full)], bool)
    rate = np.array([profile[layer] / layer_macs[layer] if t else 0.0 for layer, t in zip(layers, timed)])
    spent = sum(profile[layer] for layer in {layer for layer, t in zip(layers, timed) if t})
    rate = np.where(timed, rate, spent / max(full[timed].sum(), 1e-30))
    out = {}
    for g in groups:
        one = np.zeros(g.size, dtype=bool)
        one[0] = True
        out[g.id] = float(rate @ (full - counter.op_macs({g.id: one})))
    return out
