"""Activation statistics for calibration, all quantization points in one inference pass per batch."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import numpy as np

from tfcompress.calibration.samples import batches, iterate_samples, model_inputs, shape_of

__all__ = ["Statistics", "collect", "iterate_samples"]


@dataclasses.dataclass
class Statistics:
    """Per activation point: per-sample minima and maxima (and 1e-4 / 1 - 1e-4 quantiles), one number per
    sample, or one per sample and channel for a per-channel point; per mean point ``(key, kind)``: the mean
    over samples and positions, each sample weighing the same (``"channel"``), or a list of ``(mean, share)``,
    one per sample shape met (a model with dynamic dimensions, given samples of several sizes, has maps of
    several sizes): the map averaged over the samples of that shape, and their share of all samples
    (``"map"``).

    Ranges come back as floats for per-tensor points and as arrays (one value per channel) for per-channel
    points.
    """

    mins: dict[tuple[int, int], list]
    maxs: dict[tuple[int, int], list]
    q_lo: dict[tuple[int, int], list]
    q_hi: dict[tuple[int, int], list]
    samples: int
    means: dict[tuple, np.ndarray] = dataclasses.field(default_factory=dict)

    def abs_max(self, key, estimator: str = "minmax"):
        """Symmetric range: mean over samples of max |x| (or the max, or quantile-based)."""
        if estimator == "quantile":
            per = np.maximum(np.abs(self.q_lo[key]), np.abs(self.q_hi[key]))
            return _number(per.mean(axis=0))
        per = np.maximum(np.abs(self.mins[key]), np.abs(self.maxs[key]))
        return _number(per.max(axis=0) if estimator == "max" else per.mean(axis=0))

    def range(self, key, estimator: str = "minmax") -> tuple:
        """POT/NNCF's default: min of the per-sample minima, mean of the per-sample maxima (or quantiles)."""
        if estimator == "quantile":
            return _number(np.mean(self.q_lo[key], axis=0)), _number(np.mean(self.q_hi[key], axis=0))
        if estimator == "max":
            return _number(np.min(self.mins[key], axis=0)), _number(np.max(self.maxs[key], axis=0))
        return _number(np.min(self.mins[key], axis=0)), _number(np.mean(self.maxs[key], axis=0))


def _number(value: np.ndarray):
    """A reduced statistic: a float for a per-tensor point, a float64 array for a per-channel one."""
    value = np.asarray(value, np.float64)
    return float(value) if value.ndim == 0 else value


class Progress:
    """A small text progress bar on stderr (calibration must not need Keras or tqdm)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        # redrawn in place on a terminal; a log file or pipe gets the finished bar only
        if self.enabled and (self.done >= self.total or sys.stderr.isatty()):
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} "
                             f"{time.perf_counter() - self.t0:.1f}s")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


# Samples per batch of a statistics pass: up to PASS_BATCH, fewer where one sample's activations are large, so
# that a batch in flight holds about PASS_ACTIVATIONS bytes of them at most (counted as the sum of every op's
# outputs, about twice what the CPU plugin allocates). Batches of a few samples run as fast as larger ones
# (ResNet50 at 224x224: 3 to 16 samples alike); the memory grows with the batch (BENCHMARKS.md 3j).
PASS_BATCH = 16
PASS_ACTIVATIONS = 512 * 2**20


def activation_bytes(model, sample_shapes: list[tuple]) -> int:
    """Bytes of every op's outputs in ``model`` (an ``ov.Model``) for one sample whose inputs have
    ``sample_shapes`` (without the batch axis): what an inference of one sample writes, before the plugin
    reuses buffers. Counted on a clone reshaped to one sample of these shapes, so that dimensions the model
    leaves dynamic take the sample's and an op that moves the batch off its first axis counts whole; where the
    model cannot take that shape, its outputs' static dimensions after the first."""
    try:
        clone = model.clone()
        clone.reshape({k: [1, *shape] for k, shape in enumerate(sample_shapes)})
        model, first = clone, 0  # one sample: every dimension is the sample's
    except RuntimeError:
        first = 1
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Constant", "Parameter", "Result"):
            continue
        for k in range(op.get_output_size()):
            shape = op.get_output_partial_shape(k)
            if shape.rank.is_static and shape.rank.get_length() > 0:
                dims = [d.get_length() for d in shape[first:] if d.is_static]
                total += int(np.prod(dims, dtype=np.int64)) * max(op.get_output_element_type(k).size, 1)
    return total


def samples_per_batch(model, sample) -> int:
    """How many samples of ``sample``'s shape (one sample, an array per input) a statistics pass over ``model``
    batches: :data:`PASS_BATCH`, or fewer to keep a batch's activations near :data:`PASS_ACTIVATIONS`."""
    per_sample = activation_bytes(model, [np.shape(x)[1:] for x in sample])
    return int(max(1, min(PASS_BATCH, PASS_ACTIVATIONS // max(per_sample, 1))))


def run_batches(model, compiled, data, subset_size: int, batch: int | None, label: str, verbose: bool,
                on_result) -> int:
    """Feed up to ``subset_size`` samples to ``compiled`` in batches of samples of one shape
    (:func:`~tfcompress.calibration.samples.batches`: a model with dynamic dimensions may be given sequences or
    images of different sizes); ``on_result(results, n, shape)`` per batch of ``n`` samples of ``shape``
    (:func:`~tfcompress.calibration.samples.shape_of`).

    Batches run on as many infer requests as ``compiled`` has streams, in turn, so that the next batch runs
    while the results of the last one are read. Uses the model's static batch size when it has one, else
    ``batch`` samples, or with ``batch=None`` :func:`samples_per_batch` of ``model`` (the float model, without
    the statistics outputs) for each shape of samples. Returns how many samples were used. ``data``: samples of
    every model input (:func:`iterate_samples`).
    """
    inputs = model_inputs(model)
    samples = iterate_samples(data, inputs, subset_size)
    if inputs[0].dims and inputs[0].dims[0] is not None:
        batch = inputs[0].dims[0]
    elif batch is None:
        batch = functools.partial(samples_per_batch, model)
    progress = Progress(subset_size, label, verbose)
    requests = [compiled.create_infer_request() for _ in range(max(1, compiled.get_property("NUM_STREAMS")))]
    pending: list = [None] * len(requests)  # per request: (samples, shape) it is running, or None
    n = runs = 0

    def finish(slot: int) -> None:
        requests[slot].wait()
        on_result(requests[slot].results, *pending[slot])
        progress.update(pending[slot][0])
        pending[slot] = None

    for _, x in batches(samples, batch):
        slot = runs % len(requests)
        runs += 1
        n += len(x[0])
        if pending[slot] is not None:
            finish(slot)
        requests[slot].start_async({i: part.astype(inp.dtype) for i, (part, inp) in enumerate(zip(x, inputs))})
        pending[slot] = (len(x[0]), shape_of(x))
    for k in range(runs, runs + len(requests)):  # the last batches, oldest first
        if pending[k % len(requests)] is not None:
            finish(k % len(requests))
    if n == 0:
        raise ValueError("calibration_data yielded no samples")
    return n


_NONNEGATIVE = {"Relu", "Sigmoid", "HSigmoid"}  # producers whose minimum is known: never below 0


def _nonnegative(node) -> bool:
    t = node.get_type_name()
    if t == "Clamp":
        return node.get_attributes()["min"] >= 0  # ReLU6
    return t in _NONNEGATIVE


# Streams of a statistics pass: two batches in flight, each on half the cores, keep the cores busier than one
# batch on all of them (the layers' threads wait for each other less) at twice the activation memory.
PASS_STREAMS = 2


def _compile_probe(probe, outputs: list, precision: str | None):
    """Compile ``probe`` (a clone of the model) with ``outputs`` as extra model outputs; returns the compiled
    model and its outputs for them, in order. ``precision``: an inference precision hint, or None (default)."""
    import openvino as ov

    probe.add_outputs(outputs)
    config = {"NUM_STREAMS": PASS_STREAMS}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(probe, "CPU", config)
    return compiled, compiled.outputs[len(compiled.outputs) - len(outputs):]


def collect(model, points, data, subset_size: int, batch: int | None = None, verbose: bool = True,
            quantiles: bool = False, precision: str | None = "f32", mean_points=()) -> Statistics:
    """Run ``model`` once over ``subset_size`` samples with every point as an extra output.

    Reductions run inside the graph, so what leaves it per batch is a few numbers per point, not the whole
    activation; after a ReLU-like op only the maximum is computed (each reduction re-reads the tensor).

    Args:
        model: the float ov.Model (not modified: statistics run on a clone).
        points: :class:`~tfcompress.calibration.placement.ActivationPoint` list.
        data: calibration samples (see :func:`iterate_samples`).
        quantiles: also collect per-sample 1e-4 quantiles (sorting: much slower on large activations).
        precision: OpenVINO inference precision of the pass (``"f32"``, ``"bf16"`` where supported, or None:
            the plugin's default, bf16 on CPUs with AVX512-BF16 or AMX).
        mean_points: ``(key, kind)`` pairs (key: op position, output index) whose means to collect as well,
            for fast bias correction: ``"channel"`` per channel (axis 1), ``"map"`` over the samples only
            (the tensor's shape without its batch axis), per sample shape (:class:`Statistics`).

    Batches hold samples of one shape (:func:`run_batches`), so every per-sample statistic is the one the
    sample gives alone, and each batch's means count as many times as it has samples.
    """
    import openvino.opset13 as ops

    probe = model.clone()
    graph_ops = list(probe.get_ordered_ops())
    outputs: list = []
    slots: dict[tuple[str, tuple], int] = {}  # (statistic, key) -> position in ``outputs``

    def add(name: str, key, output) -> None:
        slots[(name, key)] = len(outputs)
        outputs.append(output)

    zero_min = set()
    for p in points:
        out = graph_ops[p.key[0]].output(p.key[1])
        if quantiles:  # sorting needs the whole tensor
            add("tensor", p.key, out)
            continue
        axes = np.arange(2 if p.per_channel else 1, len(out.get_partial_shape()), dtype=np.int64)
        if _nonnegative(out.get_node()):
            zero_min.add(p.key)
        else:
            add("min", p.key, ops.reduce_min(out, axes, keep_dims=False).output(0))
        add("max", p.key, ops.reduce_max(out, axes, keep_dims=False).output(0))
    for key, kind in mean_points:
        out = graph_ops[key[0]].output(key[1])
        rank = len(out.get_partial_shape())
        axes = [0] if kind == "map" else [a for a in range(rank) if a != 1]
        add("mean", (key, kind), ops.reduce_mean(out, np.array(axes, np.int64), keep_dims=False).output(0))
    compiled, extra = _compile_probe(probe, outputs, precision)
    sums: dict = {mp: 0.0 for mp in mean_points if mp[1] == "channel"}
    maps: dict = {mp: {} for mp in mean_points if mp[1] == "map"}  # per sample shape: [sum, samples]
    mins = {p.key: [] for p in points}
    maxs = {p.key: [] for p in points}
    q_lo = {p.key: [] for p in points}
    q_hi = {p.key: [] for p in points}

    def on_result(res, count, shape):
        def get(name, key):
            return np.asarray(res[extra[slots[(name, key)]]], np.float32)

        for mp in sums:
            sums[mp] = sums[mp] + get("mean", mp).astype(np.float64) * count
        for mp, by_shape in maps.items():
            total = by_shape.setdefault(shape, [0.0, 0])
            total[0] = total[0] + get("mean", mp).astype(np.float64) * count
            total[1] += count
        for p in points:
            if quantiles:
                tensor = get("tensor", p.key)
                flat = tensor.reshape(count, tensor.shape[1], -1) if p.per_channel else tensor.reshape(count, -1)
                lo, hi = flat.min(axis=-1), flat.max(axis=-1)
                q = np.quantile(flat, [1e-4, 1 - 1e-4], axis=-1)
                q_lo[p.key] += list(q[0])
                q_hi[p.key] += list(q[1])
            else:
                hi = get("max", p.key).reshape(count, -1) if p.per_channel else get("max", p.key).reshape(-1)
                lo = np.zeros_like(hi) if p.key in zero_min else get("min", p.key).reshape(hi.shape)
            mins[p.key] += list(lo)
            maxs[p.key] += list(hi)

    n = run_batches(model, compiled, data, subset_size, batch, "statistics", verbose, on_result)
    means = {k: v / n for k, v in sums.items()}
    means.update({k: [(total / m, m / n) for total, m in by_shape.values()] for k, by_shape in maps.items()})
    return Statistics(mins, maxs, q_lo, q_hi, n, means)


def channel_ranges(model, keys, data, subset_size: int, quantile: float, batch: int | None = None,
                   verbose: bool = True) -> dict:
    """Per-channel (axis 1) ``quantile`` / ``1 - quantile`` of the tensors ``keys`` (op position, output
    port): computed per batch (of samples of one shape, :func:`run_batches`), the median over batches (as POT's
    channel alignment). One pass, in f32."""
    probe = model.clone()
    graph_ops = list(probe.get_ordered_ops())
    compiled, extra = _compile_probe(probe, [graph_ops[k].output(i) for k, i in keys], "f32")
    per_batch: dict = {key: [] for key in keys}

    def on_result(res, count, shape):
        for key, out in zip(keys, extra):
            x = np.asarray(res[out], np.float32)
            flat = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
            per_batch[key].append(np.quantile(flat, [quantile, 1 - quantile], axis=1))

    run_batches(model, compiled, data, subset_size, batch, "channel alignment", verbose, on_result)
    return {key: tuple(np.median(np.stack(v), axis=0)) for key, v in per_batch.items()}
