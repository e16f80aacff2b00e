"""Accuracy-aware INT8: quantize, then put the layers that cost the most accuracy back to float."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

import numpy as np

from tfcompress.calibration.names import layer_names as user_layer_names
from tfcompress.calibration.placement import bias_input, find_points, quantized_inputs
from tfcompress.calibration.quantize import (
    _act_fq, _build, _calibration_state, _check_args, _read, _shifted_bias, _weight_fq,
)
from tfcompress.calibration.samples import batches, iterate_samples, model_inputs, shape_of
from tfcompress.calibration.statistics import Progress, samples_per_batch

__all__ = ["calibrate_with_accuracy_control", "layer_macs", "RANKINGS"]

# Accuracy control validates up to this many of the best-ranked layers per step before giving up: the ranking
# (output error on the worst samples) and the metric do not always agree on the next layer to revert.
CANDIDATES_PER_STEP = 8

# ``"speed"``: the output error a revert removes per unit of compute it moves out of INT8 (MACs of a
# convolution / fully-connected layer; output elements for an Add or pooling input); ``"error"``: the error
# it removes, whatever it costs (NNCF's ranking).
RANKINGS = ("speed", "error")


def layer_macs(model) -> dict[int, int]:
    """Multiply-accumulates per sample of every Convolution, GroupConvolution and MatMul with static
    shapes, keyed by position in ``get_ordered_ops()``."""
    macs = {}
    for k, op in enumerate(model.get_ordered_ops()):
        t = op.get_type_name()
        if t not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        dims, w = list(op.get_output_partial_shape(0))[1:], op.get_input_partial_shape(1)
        if not all(d.is_static for d in dims) or not w.is_static:
            continue
        outputs = int(np.prod([d.get_length() for d in dims]))
        w = [d.get_length() for d in w]
        if t == "MatMul":  # weights [K, N], or [N, K] with transpose_b
            per_output = w[-1] if op.get_attributes()["transpose_b"] else w[-2]
        else:  # weights [O, I, k...] or [G, O/G, I/G, k...]: each output reads one group's inputs
            per_output = int(np.prod(w[2:] if t == "GroupConvolution" else w[1:]))
        macs[k] = outputs * per_output
    return macs


def _output_elements(op) -> int:
    shape = op.get_output_partial_shape(0)
    dims = list(shape)[1:]
    return int(np.prod([d.get_length() for d in dims])) if all(d.is_static for d in dims) else 1


@dataclasses.dataclass
class _Search:
    """What every trial model of one accuracy-control run shares."""

    model: object
    ranges: dict
    shifts: dict
    ignored_layers: tuple
    overflow_fix: str
    compile: Callable

    def build(self, skip: set[int]):
        return _build(self.model, self.ranges, self.shifts, skip, self.ignored_layers, self.overflow_fix)


def switchable(model, ranges: dict, shifts: dict, candidates: list[int], ignored_layers=(), overflow_fix="disable"):
    """The quantized model with one boolean scalar input ``revert_<k>`` per candidate op position ``k``: True
    puts that op's quantizers (and bias shift) back to float, as ``_build(..., skip_ops={k, ...})`` does.

    Ranking evaluates every candidate revert; with this model that takes one compiled model for the whole search
    instead of one per candidate (the CPU plugin keeps memory from every compiled and run model). The
    quantizers run as float FakeQuantize here rather than INT8 kernels, which is close enough to order
    candidates; every accepted revert is still validated on a model built by ``_build``.
    """
    import openvino as ov
    import openvino.opset13 as ops

    q = model.clone()
    acts, weights = find_points(q, ignored_layers, overflow_fix)
    order = {op.get_name(): k for k, op in enumerate(q.get_ordered_ops())}
    switch = {k: ops.parameter([], ov.Type.boolean, name=f"revert_{k}") for k in candidates}
    for k, param in switch.items():
        param.output(0).set_names({f"revert_{k}"})

    def chosen(k, quantized, original):
        return quantized if k not in switch else ops.select(switch[k], original, quantized).output(0)

    for p in acts:
        fq = _act_fq(p.output, ranges[p.key]).output(0)
        for t in p.targets:
            t.replace_source_output(chosen(order[t.get_node().get_name()], fq, p.output))
    for wp in weights:
        w = wp.op.input(1).get_source_output()
        wp.op.input(1).replace_source_output(chosen(wp.key, _weight_fq(wp).output(0), w))
        if wp.key in shifts:
            inp = bias_input(wp.op)
            inp.replace_source_output(chosen(wp.key, _shifted_bias(wp, shifts[wp.key]), inp.get_source_output()))
    q.add_parameters(list(switch.values()))
    q.validate_nodes_and_infer_types()
    return q


class _Ranker:
    """One compiled :func:`switchable` model: its outputs for any set of reverted candidates."""

    def __init__(self, search: _Search, candidates: list[int], batch: Callable):
        self.compiled = search.compile(switchable(search.model, search.ranges, search.shifts, candidates,
                                                  search.ignored_layers, search.overflow_fix))
        self.candidates = candidates
        self.batch = batch

    def outputs(self, skip: set[int], samples: list[tuple]) -> list[list[np.ndarray]]:
        flags = {f"revert_{k}": np.array(k in skip) for k in self.candidates}
        return _outputs(self.compiled, samples, self.batch, flags)


def _candidates(model, acts, weights) -> tuple[list[int], dict[int, list[str]]]:
    """Op positions that can be reverted, and the IR layers to report for each: its own name, or for a
    quantizer hoisted above a Transpose / Reshape / Pad (reverted through that op) the layers it fed."""
    ops = list(model.get_ordered_ops())
    order = {op.get_name(): k for k, op in enumerate(ops)}
    candidates = sorted({order[t.get_node().get_name()] for p in acts for t in p.targets} | {wp.key for wp in weights})
    names = {c: [ops[c].get_friendly_name()] for c in candidates}
    for p in acts:
        for t in p.targets:
            k = order[t.get_node().get_name()]
            if not quantized_inputs(ops[k]):
                names[k] = sorted(set(p.layers))
    return candidates, names


def _sample_errors(got: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> np.ndarray:
    """Per sample: the absolute error of every output against ``ref`` (per output, one array per sample:
    :func:`_outputs`), each output's in units of its mean absolute FP32 value over all samples' values (so
    that an output of large numbers does not decide alone), summed."""
    err = 0.0
    for g, r in zip(got, ref):
        scale = sum(float(np.abs(v).sum(dtype=np.float64)) for v in r) / max(1, sum(v.size for v in r)) or 1.0
        err = err + np.array([np.abs(np.asarray(a, np.float64) - b).sum() for a, b in zip(g, r)]) / scale
    return err


def _gains(ranker: "_Ranker", skip: set[int], candidates: list[int], samples: list[tuple],
           fp_out: list[list[np.ndarray]]) -> dict[int, float]:
    """The output error each candidate's revert alone removes, on the samples where INT8 and FP32 disagree
    most (all outputs: :func:`_sample_errors`)."""
    err = _sample_errors(ranker.outputs(skip, samples), fp_out)
    worst = np.argsort(err)[::-1][: max(1, len(err) // 2)]
    base = err[worst].sum()
    ref = [[r[i] for i in worst] for r in fp_out]
    return {c: float(base - _sample_errors(ranker.outputs(skip | {c}, [samples[i] for i in worst]), ref).sum())
            for c in candidates}


def _order(gains: dict[int, float], cost: dict[int, int], ranking: str) -> list[int]:
    """Candidates, most useful revert first: by error removed, or per unit of ``cost`` for ``"speed"``."""
    return sorted(gains, key=lambda c: -(gains[c] / cost[c] if ranking == "speed" else gains[c]))


def _first_lowering(tried: list[int], skip: set[int], metric: float, validate, search: _Search, drop_of):
    """``([c], metric)`` for the first candidate ``c`` whose revert alone lowers the drop, else None."""
    for c in tried:
        m = validate(search.build(skip | {c}))
        if drop_of(m) < drop_of(metric):
            return [c], m
    return None


def _accumulate(ordered: list[int], skip: set[int], metric: float, validate, search: _Search, drop_of):
    """``(group, metric)``: the shortest prefix of ``ordered`` whose reverts together lower the drop, else None.

    A single revert may remove too little error to change the metric (one sample flipped is its resolution)
    while several do; reverting every candidate gives the float model, so a prefix lowers any drop above the
    float model's own."""
    group = []
    for c in ordered:
        group.append(c)
        m = validate(search.build(skip | set(group)))
        if drop_of(m) < drop_of(metric):
            return group, m
    return None


def _int8_mac_share(model, macs: dict[int, int], acts, weights, skip: set[int]) -> float:
    """The fraction of the weighted layers' MACs still in INT8: weights and activation input quantized."""
    order = {op.get_name(): k for k, op in enumerate(model.get_ordered_ops())}
    float_inputs = set()  # layers reading a reverted quantizer: the target itself, or through a hoisted op
    for p in acts:
        for t in p.targets:
            node = t.get_node()
            if order[node.get_name()] in skip:
                float_inputs |= {node.get_friendly_name()} if quantized_inputs(node) else set(p.layers)
    int8 = sum(macs.get(wp.key, 0) for wp in weights
               if wp.key not in skip and wp.op.get_friendly_name() not in float_inputs)
    total = sum(macs.values())
    return int8 / total if total else 0.0


def calibrate_with_accuracy_control(
    ov_model,
    calibration_data: Iterable,
    validation_data,
    validate_fn: Callable,
    max_drop: float = 0.01,
    drop_type: str = "absolute",
    preset: str = "performance",
    subset_size: int = 300,
    ranking_subset_size: int = 100,
    max_iterations: int = 50,
    bias_correction: bool = True,
    ignored_layers: Iterable[str] = (),
    overflow_fix: str = "first_layer",
    range_estimator: str = "auto",
    ranking: str = "error",
    inference_precision: str | None = "f32",
    layer_names: Iterable[str] | None = None,
    verbose: bool = True,
):
    """Quantize like :func:`~tfcompress.calibration.calibrate`, then revert layers to float until the drop
    is within ``max_drop``.

    Each step ranks the layers by how much reverting each one alone reduces the INT8 vs FP32 output error
    on the validation samples where the two disagree most (``ranking="error"``, the default, as NNCF; or
    ``"speed"``: per MAC it takes out of INT8, so that cheap layers go first and the model keeps more INT8
    compute), reverts the best one that lowers the drop (re-validated with ``validate_fn``; up to
    ``CANDIDATES_PER_STEP`` tried, and with ``"speed"`` then as many of the error ranking's best, since cheap
    layers may each remove too little error to flip a sample), and ranks again. When no single revert lowers
    the drop, the step reverts layers in error-ranked order, accumulating them, until the drop falls: the
    metric changes in whole samples, and several reverts can flip one where none does alone. Reverting every
    layer gives the float model, so the search meets ``max_drop`` unless ``max_iterations`` (the most layers
    it reverts) ends it.
    Once it is met, each reverted layer, the most MACs first, is put back to INT8 if the drop stays within
    ``max_drop`` without it, so the model keeps as much INT8 compute as the target allows. Ranking runs on one compiled model in which each candidate's quantizers can be switched
    off by an input (:func:`switchable`), so memory stays that of one model however many candidates there
    are; only the validated trials are built and compiled as INT8 models.

    The FP32 baseline, the ranking and every validation compile the models with ``inference_precision``
    (``"f32"`` by default, the true FP32 baseline; ``None``: OpenVINO's default, BF16 on CPUs with AMX or
    AVX512-BF16). Reverted layers run in that precision too, so the drop holds when the returned model is
    compiled with the same ``INFERENCE_PRECISION_HINT`` (OpenVINO 2026.4 has no per-layer way to keep
    reverted layers in f32 under a BF16 default; compiled without the hint they run BF16).

    When the drop is still above ``max_drop`` after the search (``max_iterations`` reached, or a metric that
    differs between runs of the same model) a ``UserWarning`` says so, and ``info["max_drop_met"]`` is False.

    Args:
        calibration_data: samples, as :func:`~tfcompress.calibration.calibrate` takes them (for a model with
            several inputs, one array per input: a dict by input name or a tuple / list in input order).
        validation_data: what ``validate_fn`` scores; its samples (the ``x`` of ``(x, y)`` pairs, in the
            forms ``calibration_data`` takes) also rank the layers, by the error of all the model's outputs.
        validate_fn: ``validate_fn(compiled_model, validation_data) -> float``, higher is better. For a
            regression output, minus its error (e.g. the relative RMS error against the FP32 model's outputs,
            what the export command measures on unlabelled validation data) with ``drop_type="absolute"``
            makes ``max_drop`` a bound on that error.
        drop_type: ``"absolute"`` (metric points) or ``"relative"`` (fraction of the FP32 metric).
        max_iterations: the most layers the search reverts to float (a step reverts one, or several together).
        range_estimator: how activation ranges are estimated, as for :func:`~tfcompress.calibration.calibrate`.
        layer_names: the model's layer names (e.g. a Keras model's), to report reverted layers by them
            (:func:`tfcompress.calibration.names.layer_names`).

    Returns:
        ``(model, info)``; ``info`` holds ``fp32_metric``, ``int8_metric`` (before reverting), ``metric``,
        ``drop``, ``drops`` (after each step, and after putting layers back), ``max_drop_met``, ``reverted``
        (the user's layer names of the layers left in float, in the order they were reverted), ``reverted_ir``
        (their IR friendly names), ``restored`` / ``restored_ir`` (layers reverted on the way and then put
        back to INT8),
        ``int8_mac_share`` (the fraction of convolution / fully-connected MACs still in INT8),
        ``inference_precision`` and, on a miss, ``warning``.
    """
    import openvino as ov

    _check_args(preset, subset_size, False, range_estimator, overflow_fix)
    if drop_type not in ("absolute", "relative"):
        raise ValueError(f"drop_type must be 'absolute' or 'relative', got {drop_type!r}")
    if not 0 <= max_drop < 1:
        raise ValueError(f"max_drop must be in [0, 1), got {max_drop!r}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {list(RANKINGS)}, got {ranking!r}")
    if inference_precision not in ("f32", "bf16", "f16", None):
        raise ValueError(f"inference_precision must be 'f32', 'bf16', 'f16' or None, got {inference_precision!r}")
    model = _read(ov_model)
    core = ov.Core()
    config = {} if inference_precision is None else {"INFERENCE_PRECISION_HINT": inference_precision}
    acts, weights = find_points(model, ignored_layers, overflow_fix)
    ranges, shifts = _calibration_state(model, calibration_data, preset, subset_size, bias_correction,
                                        ignored_layers, range_estimator, overflow_fix, verbose)
    search = _Search(model, ranges, shifts, tuple(ignored_layers), overflow_fix,
                     lambda m: core.compile_model(m, "CPU", config))

    def validate(m) -> float:
        compiled = search.compile(m)
        metric = validate_fn(compiled, validation_data)
        # a drop from a metric that is not a finite number (nan from an empty batch, text) compares false with
        # max_drop: the search would stop at once, or accept anything
        if isinstance(metric, (bool, str, np.bool_)) or not np.ndim(metric) == 0 or \
                not np.isfinite(np.asarray(metric, dtype=float)):
            raise ValueError(f"validate_fn must return a finite number (higher is better), got {metric!r:.80}")
        return float(metric)

    fp_metric = validate(model)

    def drop_of(metric):
        d = fp_metric - metric
        return d / abs(fp_metric) if drop_type == "relative" and fp_metric else d

    skip: set[int] = set()
    metric = validate(search.build(skip))
    info = {"fp32_metric": fp_metric, "int8_metric": metric, "drops": [drop_of(metric)], "restored_ir": []}
    candidates, names = _candidates(model, acts, weights)
    ops = list(model.get_ordered_ops())
    macs = layer_macs(model)
    cost = {c: max(1, macs.get(c) or _output_elements(ops[c])) for c in candidates}
    rank_x = list(iterate_samples(validation_data, model_inputs(model), ranking_subset_size))
    sizes: dict[tuple, int] = {}

    def batch(sample) -> int:
        """Samples per batch of ``sample``'s shape, as in the statistics pass (bounded activation memory)."""
        shape = shape_of(sample)
        if shape not in sizes:
            sizes[shape] = samples_per_batch(model, sample)
        return sizes[shape]

    fp_out = _outputs(search.compile(model), rank_x, batch)
    ranker = _Ranker(search, candidates, batch)
    reverted: list[int] = []  # in the order they were reverted
    progress = Progress(max_iterations, "accuracy control", verbose)
    while len(reverted) < max_iterations and drop_of(metric) > max_drop and candidates:
        gains = _gains(ranker, skip, candidates, rank_x, fp_out)
        by_error = _order(gains, cost, "error")
        # single reverts: the ranking's best few, then (speed ranking) the error ranking's best few, which
        # move the metric where the cheap candidates each remove too little error to flip a sample
        tried = list(dict.fromkeys(_order(gains, cost, ranking)[:CANDIDATES_PER_STEP] + by_error[:CANDIDATES_PER_STEP]))
        step = _first_lowering(tried, skip, metric, validate, search, drop_of)
        if step is None:  # no single revert lowers the drop: accumulate reverts in error order until one does
            step = _accumulate(by_error[:max_iterations - len(reverted)], skip, metric, validate, search, drop_of)
        progress.update(len(step[0]) if step else 0)
        if step is None:
            break
        group, metric = step
        skip |= set(group)
        reverted += group
        candidates = [c for c in candidates if c not in skip]
        info["drops"].append(drop_of(metric))
    if drop_of(metric) <= max_drop:  # put INT8 back where it was not needed, the most costly layers first
        restored = []
        for c in sorted(reverted, key=lambda c: -cost[c]):
            m = validate(search.build(skip - {c}))
            if drop_of(m) <= max_drop:
                skip.discard(c)
                restored.append(c)
                metric = m
        reverted = [c for c in reverted if c in skip]
        if restored:
            info["drops"].append(drop_of(metric))
        info["restored_ir"] = list(dict.fromkeys(n for c in restored for n in names[c]))
    info["reverted_ir"] = list(dict.fromkeys(n for c in reverted for n in names[c]))
    info["restored_ir"] = [n for n in info["restored_ir"] if n not in info["reverted_ir"]]
    by_name = {op.get_friendly_name(): op for op in ops}
    users = user_layer_names(model, [by_name[n] for n in info["reverted_ir"] + info["restored_ir"]], layer_names)
    info.update(metric=metric, drop=drop_of(metric), max_drop_met=drop_of(metric) <= max_drop,
                reverted=list(dict.fromkeys(users[n] for n in info["reverted_ir"])),
                restored=list(dict.fromkeys(users[n] for n in info["restored_ir"])),
                int8_mac_share=_int8_mac_share(model, macs, acts, weights, skip), inference_precision=inference_precision or "default")
    if not info["max_drop_met"]:
        info["warning"] = (f"accuracy control did not reach max_drop={max_drop}: the drop is {info['drop']:.4f} "
                           f"after reverting {len(info['reverted'])} layer(s) ({drop_type})")
        warnings.warn(info["warning"], UserWarning, stacklevel=2)
    return search.build(skip), info


def _outputs(compiled, samples: list[tuple], batch: int | Callable,
             extra: dict | None = None) -> list[list[np.ndarray]]:
    """Every output for each of ``samples`` (one array per model input with a batch axis of 1, fed to the first
    inputs; ``extra`` feeds others by name): per output, one array per sample, in the samples' order (samples of
    different shapes give outputs of different shapes). Run in batches of samples of one shape, ``batch`` of
    them or ``batch(sample)`` (:func:`~tfcompress.calibration.samples.batches`), small ones
    (:func:`~tfcompress.calibration.statistics.samples_per_batch`): the CPU plugin keeps memory from every
    inference of a newly compiled trial model after it is deleted, more for larger batches."""
    inputs = model_inputs(compiled)[:len(samples[0])]
    rows: list[list] = [[None] * len(samples) for _ in compiled.outputs]
    for positions, x in batches(samples, batch):
        feed = {compiled.inputs[k]: part.astype(inp.dtype) for k, (part, inp) in enumerate(zip(x, inputs))}
        res = compiled({**feed, **(extra or {})})
        for per_sample, out in zip(rows, compiled.outputs):
            values = np.asarray(res[out])
            for j, p in enumerate(positions):
                per_sample[p] = values[j:j + 1]
    return rows
