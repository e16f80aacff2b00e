"""The whole export: SavedModel -> stripped SavedModel -> ONNX -> OpenVINO IR, with a report."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from tfcompress.errors import ExportError
from tfcompress.export.checks import QuantizedCheck, half_precision_tolerance, quantized_check
from tfcompress.export.convert import (
    freeze_for_export, refuse_random_outputs, saved_model_to_openvino, to_onnx, to_openvino,
)
from tfcompress.export.data import check_labels, load_data, scored_output
from tfcompress.export.options import check_args
from tfcompress.export.ov_run import (
    int8_kernel_check, int8_kernel_warning, ir_rounding_noise, openvino_runner,
)
from tfcompress.output_dir import staged_output
from tfcompress.saved_model_dir import read_saved_model_proto
from tfcompress.stripping.savedmodel_strip import (
    call_signature, max_rel_error, rel_errors, run_frozen, sample_inputs, strip_saved_model, variable_bytes,
)

__all__ = ["export_saved_model"]

# Output checks of a float model. A model that holds FakeQuant ops (from QAT) gets limits scaled by its own
# rounding noise instead (export/checks.py): a fixed limit cannot tell good exports of it from bad ones.
FLOAT_TOLERANCE = {"strip": 1e-4, "onnx": 1e-4, "openvino": 1e-4}


def _logger(verbose: bool):
    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)
    return log


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs.reshape(len(outputs), -1), axis=1) == labels.reshape(-1)))


# Samples are one array per signature input, by name (``{"image": ..., "meta": ...}``), sharing their first axis.


def _count(x: dict[str, np.ndarray]) -> int:
    return len(next(iter(x.values())))


def _slice(x: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: a[start:stop] for k, a in x.items()}


def _rows(x: dict[str, np.ndarray], n: int, fixed: int | None) -> dict[str, np.ndarray]:
    """The first ``n`` samples of ``x``, or, for a signature that takes exactly ``fixed`` samples, ``fixed``
    samples (the data's first ones, repeated when it has fewer)."""
    if fixed is None:
        return _slice(x, 0, n)
    if _count(x) >= fixed:
        return _slice(x, 0, fixed)
    return {k: np.resize(a, (fixed, *a.shape[1:])) for k, a in x.items()}


def _batched(fn, x: dict[str, np.ndarray], batch: int = 256, fixed: int | None = None) -> np.ndarray:
    """``fn`` over ``x`` in batches of ``batch``, or of exactly ``fixed`` samples for a signature with a fixed
    batch size (the last one filled up with repeated samples, whose outputs are dropped)."""
    import keras

    batch, n = fixed or batch, _count(x)
    bar = keras.utils.Progbar(n, verbose=1 if n > batch and sys.stderr.isatty() else 0)
    parts = []
    for i in range(0, n, batch):
        part = _slice(x, i, i + batch)
        parts.append(np.asarray(fn(_rows(part, batch, fixed)))[:_count(part)])
        bar.update(min(i + batch, n))
    return np.concatenate(parts)


# the ops calibration quantizes the inputs of
_WEIGHTED_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
                 "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")


def _computes_in_float64(graph_def) -> bool:
    """Whether a convolution or matrix product of the frozen graph computes in float64 (calibration would
    quantize it in float64)."""
    from tensorflow.core.framework import types_pb2

    return any(n.op in _WEIGHTED_OPS and n.attr["T"].type == types_pb2.DT_DOUBLE for n in graph_def.node)


def _whole_batches(x: dict[str, np.ndarray], fixed: int | None) -> dict[str, np.ndarray]:
    """``x`` cut to whole batches of a fixed batch size (calibration feeds the IR whole batches only)."""
    if fixed is None:
        return x
    n = _count(x)
    return _rows(x, fixed, fixed) if n < fixed else _slice(x, 0, n - n % fixed)


def _fixed_batch(specs: dict) -> int | None:
    """The batch size the signature's inputs take, when they take only one (``TensorSpec([1, 32, 32, 3])``)."""
    for spec in specs.values():
        dims = spec.shape.as_list() if spec.shape.rank else []
        if dims and dims[0] is not None:
            return dims[0]
    return None


def export_saved_model(
    saved_model_dir: str,
    output_dir: str,
    calibration_data=None,
    int8: str = "default",
    max_drop: float = 0.01,
    validation_data=None,
    opset: int = 17,
    overwrite: bool = False,
    signature_key: str = "serving_default",
    verbose: bool = True,
    source_name: str | None = None,
    require_onnx: bool = False,
    max_iterations: int = 50,
    range_estimator: str = "auto",
    overflow_fix: str = "first_layer",
) -> dict:
    """Write ``stripped/``, ``model.onnx`` (unless tf2onnx cannot convert the model), ``model_fp32.xml/.bin``,
    with calibration data ``model_int8.xml/.bin``, and ``report.json/.md`` into ``output_dir``.

    Everything is validated before any work, written into a temporary directory next to ``output_dir`` and
    moved into place at the end: a failure leaves ``output_dir`` as it was. ``saved_model_dir`` is only read.

    Args:
        saved_model_dir: the SavedModel (any TF 2 or TF/Keras 2 SavedModel with a serving signature).
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        calibration_data: samples for INT8 calibration: a .npy/.npz file, an image directory, an array, or
            for a model with several inputs a .npz with one array per input name, a dict from input name to
            array or a tuple of arrays in input order (:func:`tfcompress.export.data.load_data`).
        int8: ``"default"``, ``"accuracy_aware"`` or ``"none"``.
        max_drop: largest accuracy drop for ``int8="accuracy_aware"``.
        validation_data: samples with labels (a .npz file, an image directory or ``(x, y)`` with ``x`` in
            any form ``calibration_data`` takes); the report then gives each artifact's accuracy.
        opset: ONNX opset (13..18).
        verbose: print the stage lines on stderr.
        source_name: how the report names the source (default: its absolute path), for callers that export
            from a temporary directory.
        require_onnx: fail when the model cannot be converted to ONNX. By default the FP32 IR is then built
            from the stripped SavedModel by OpenVINO's TensorFlow reader, and the report says why ONNX is absent.
        max_iterations: the most layers ``int8="accuracy_aware"`` reverts to float.
        range_estimator: how calibration estimates activation ranges
            (:data:`tfcompress.calibration.RANGE_ESTIMATORS`; the report names the one used).
        overflow_fix: which layers calibration keeps on 7-bit weights, so that INT8 kernels of CPUs without
            VNNI cannot saturate (``calibrate``'s ``overflow_fix``; the report names it, and how far this CPU's
            INT8 kernels land from the INT8 IR's exact arithmetic).

    Returns:
        The report (also written as ``report.json``).
    """
    check_args(saved_model_dir, output_dir, int8, max_drop, opset, overwrite, max_iterations,
               {"calibration data": calibration_data, "validation data": validation_data},
               calibration_data=calibration_data is not None, range_estimator=range_estimator,
               overflow_fix=overflow_fix, validation_data=validation_data is not None, signature_key=signature_key,
               prefix="")

    _log = _logger(verbose)
    t0 = time.perf_counter()
    _log(f"[1/5] reading {saved_model_dir}")
    frozen = freeze_for_export(saved_model_dir, signature_key)
    for key, why in sorted(frozen.dropped.items()):
        print(f"warning: output {key!r} is left out of the export: it {why}", file=sys.stderr, flush=True)
    specs = frozen.specs
    if calibration_data is not None and int8 != "none" and _computes_in_float64(frozen.graph_def):
        raise ExportError("this model computes in float64, which OpenVINO's CPU plugin cannot run quantized: "
                          "export it with --int8=none, or save it in float32 for INT8")
    calib = load_data(calibration_data, specs, "calibration data") if calibration_data is not None else None
    valid = load_data(validation_data, specs, "validation data") if validation_data is not None else None
    out_key = sorted(frozen.outputs)[0]  # the output accuracy is measured on
    fixed = _fixed_batch(specs)
    if valid is not None and valid[1] is not None:
        first = run_frozen(frozen, frozen.graph_def, _rows(valid[0], 1, fixed))
        out_key = scored_output({k: (v.dtype, v.shape[1:]) for k, v in first.items()})
        check_labels(valid[1], int(np.prod(first[out_key].shape[1:])), out_key)
    quantized = any(n.op.startswith("FakeQuant") for n in frozen.graph_def.node)
    check = None
    for data in (valid, calib):
        if data is not None:
            check = _rows(data[0], 8, fixed)
            break
    refuse_random_outputs(frozen, check or sample_inputs(frozen.specs), saved_model_dir)
    qcheck = None
    if quantized:
        _log("[1b/5] measuring the quantized graph's rounding noise")
        check = check or sample_inputs(frozen.specs, batch=8)
        qcheck = quantized_check(lambda gd, x: run_frozen(frozen, gd, x), frozen.graph_def, check)
        if qcheck.warning():
            print(f"warning: {qcheck.warning()}", file=sys.stderr, flush=True)
    tol = {k: qcheck.tolerance for k in FLOAT_TOLERANCE} if qcheck else FLOAT_TOLERANCE
    half = None if quantized else half_precision_tolerance(frozen.graph_def)
    if half is not None:
        tol = {k: max(v, half[1]) for k, v in FLOAT_TOLERANCE.items()}

    with staged_output(output_dir, overwrite) as tmp:
        report: dict = {"source": source_name or os.path.abspath(saved_model_dir), "signature": signature_key,
                        "steps": {}}
        if frozen.dropped:
            report["dropped_outputs"] = dict(frozen.dropped)
        left_out = frozen.left_out
        if left_out:
            report["signatures_left_out"] = left_out
            print(f"warning: signatures {left_out} are not exported: they differ from {signature_key!r} in "
                  "inputs or outputs (--signature exports one of them instead)", file=sys.stderr, flush=True)
        if half is not None:  # the checks' limit, as quantized graphs record theirs
            report["half_precision"] = {"dtype": half[0], "tolerance": half[1]}
        t = time.perf_counter()
        _log("[2/5] stripping zeroed channels")
        stripped_dir = os.path.join(tmp, "stripped")
        # a quantized graph's outputs on the check inputs were measured with its noise: not run again
        strip = strip_saved_model(saved_model_dir, stripped_dir, signature_key, check_inputs=check,
                                  tolerance=tol["strip"], frozen=frozen,
                                  reference=qcheck.reference if qcheck is not None else None)
        report["steps"]["strip"] = {"seconds": time.perf_counter() - t, "max_rel_error": strip.max_rel_error}
        report["layers"] = strip.layers
        report["params"] = {"before": strip.params_before, "after": strip.params_after}
        report["flops"] = {"before": strip.flops_before, "after": strip.flops_after}

        # the unstripped graph written as the stripped one is (the like-for-like size before stripping; exporters
        # differ: Keras's model.export stores the weights twice) differs from it only in its weights' bytes, so
        # its size is computed, not written (a weight that stripping cuts below save_graph_def's 16 values moves
        # into the graph: its variable's records, a few KB, are not counted)
        removed_bytes = variable_bytes(frozen.graph_def) - variable_bytes(strip.stripped.graph_def)
        # the written SavedModel as loaded back (its weights in memory) scores accuracy, if there is any to score
        stripped_signature = strip.signature if valid is not None and valid[1] is not None else None
        strip.signature = None
        onnx_path = os.path.join(tmp, "model.onnx")
        xml = os.path.join(tmp, "model_fp32.xml")
        # TensorFlow's outputs of the stripped SavedModel, as loaded back, are the conversions' reference
        steps, fp32_outputs = _convert(stripped_dir, onnx_path, xml, opset, strip.inputs, signature_key, tol,
                                       require_onnx, _log, frozen=strip.stripped, reference=strip.outputs)
        strip = None  # the graph converted: its weights need not stay in memory
        report["steps"].update(steps)
        report["quantized"] = quantized
        if qcheck is not None:
            _record_quantized_checks(report, qcheck, fp32_outputs)
        _warn(int8_kernel_warning(report["steps"]["openvino"].get("int8_kernels"), _QAT_FIX))
        if quantized:
            report["steps"]["openvino"]["int8_layers"] = _int8_layers_of(xml)

        report["sizes"] = {
            "saved_model": _size(saved_model_dir), "unstripped": _size(stripped_dir) + removed_bytes,
            "stripped": _size(stripped_dir),
            "openvino_fp32": _size(xml) + _size(xml[:-4] + ".bin"),
        }
        if os.path.exists(onnx_path):
            report["sizes"]["onnx"] = _size(onnx_path)
        xml8 = None
        if calib is not None and int8 != "none":
            t = time.perf_counter()
            samples = _whole_batches(_slice(calib[0], 0, 300), fixed)
            _log(f"[4b/5] INT8 calibration ({int8}) on {_count(samples)} samples")
            xml8 = os.path.join(tmp, "model_int8.xml")
            step = report["steps"]["int8"] = _int8(xml, xml8, samples, int8, max_drop, valid, saved_model_dir,
                                                   verbose, max_iterations, range_estimator, fixed, out_key,
                                                   overflow_fix)
            step["seconds"] = time.perf_counter() - t
            if check is not None:  # INT8 at OpenVINO's default precision, as deployed, against the FP32 IR
                run8 = openvino_runner(xml8, precision="default")
                got8 = run8(check)
                step["max_rel_error_precision"] = run8.precision  # what "default" is on this CPU
                named = {k: fp32_outputs[k] for k in sorted(frozen.outputs) if k in fp32_outputs} or fp32_outputs
                step["max_rel_error"] = max_rel_error(got8, named)
                if len(named) > 1:
                    step["max_rel_error_by_output"] = rel_errors(got8, named)
                step["int8_kernels"] = _int8_kernels(xml8, check)
                if "int8_kernels" not in report["steps"]["openvino"]:  # else said of the QAT IR already
                    _warn(int8_kernel_warning(step["int8_kernels"], _calibration_fix(overflow_fix, quantized)))
            report["sizes"]["openvino_int8"] = _size(xml8) + _size(xml8[:-4] + ".bin")
        if valid is not None and valid[1] is not None:
            _log("[5/5] measuring accuracy on the validation data")
            x, y = valid

            def score(fn) -> float:  # accuracy of fn over the validation samples
                return _accuracy(_batched(fn, x, fixed=fixed), y)

            report["accuracy"] = {
                "original": score(lambda b: run_frozen(frozen, frozen.graph_def, b)[out_key]),
                "stripped": score(lambda b: call_signature(stripped_signature, b)[out_key]),
                "openvino_fp32": score(lambda b, run=openvino_runner(xml): run(b)[out_key]),
                "samples": _count(x), "output": out_key,
            }
            if os.path.exists(onnx_path):
                onnx_fn = _onnx_fn(onnx_path)
                report["accuracy"]["onnx"] = score(lambda b: onnx_fn(b)[out_key])
            if xml8 is not None:  # compiled as accuracy control measured it (f32 hint), else the default
                p8 = "f32" if report["steps"]["int8"].get("inference_precision") == "f32" else "default"
                report["accuracy"]["openvino_int8"] = score(
                    lambda b, run=openvino_runner(xml8, precision=p8): run(b)[out_key])
        else:
            _log("[5/5] no labelled validation data: accuracy not measured")
        report["seconds"] = time.perf_counter() - t0
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_markdown(report))
    _log(f"wrote {output_dir} in {report['seconds']:.1f} s")
    return report


# what keeps the INT8 kernels of CPUs without VNNI from saturating, for the warning when they do
_QAT_FIX = ("train it with quantize_model(..., overflow_fix='enable'), which keeps every layer's weights on the "
            "7-bit grid those kernels cannot saturate")


def _calibration_fix(overflow_fix: str, quantized: bool) -> str:
    """What to change when the calibrated IR's INT8 kernels saturate on this CPU (calibrated with
    ``overflow_fix``; ``quantized``: the model came with QAT's weights, which calibration keeps)."""
    if overflow_fix == "enable":
        return _QAT_FIX if quantized else "run it on a CPU with VNNI: every layer it quantized is on 7 bits already"
    fix = "export it with --overflow_fix=enable (calibrate(..., overflow_fix='enable')), which keeps every layer's "
    return fix + "weights on 7 bits" + (f"; for the layers QAT quantized, {_QAT_FIX}" if quantized else "")


def _int8_layers_of(xml: str) -> dict:
    """``calibration.int8_layers`` of the IR ``xml`` compiled for this CPU at OpenVINO's default precision."""
    import openvino as ov

    from tfcompress.calibration import int8_layers

    return int8_layers(ov.Core().compile_model(xml, "CPU"))


def _warn(message: str | None) -> None:
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _int8_kernels(xml8: str, check: dict) -> dict:
    """:func:`int8_kernel_check` of the calibrated IR, held to its own rounding noise on ``check``."""
    import openvino as ov

    model = ov.Core().read_model(xml8)
    limits = ir_rounding_noise(model, check)
    record = int8_kernel_check(model, check, limits.reference, limits.tolerance)
    return {**record, "noise_floor": limits.noise}


def _record_quantized_checks(report: dict, qcheck: QuantizedCheck, fp32_outputs: dict) -> None:
    """Say in each checked step the noise and the limit it was held to, and hold the FP32 IR's outputs to the
    original graph's (``qcheck``'s reference, on the same check inputs) by their mean error too (the max error
    of a chaotic model allows almost anything)."""
    steps = report["steps"]
    report["quantized_check"] = {"noise_floor": qcheck.noise, "noise_mean": qcheck.noise_mean,
                                 "tolerance": qcheck.tolerance, "mean_tolerance": qcheck.mean_tolerance,
                                 "verified": qcheck.verified}
    for step in ("strip", "onnx", "openvino"):
        if "max_rel_error" in steps.get(step, {}):
            steps[step].update(qcheck.report())
    ref = qcheck.reference
    steps["openvino"]["mean_rel_error"] = qcheck.check_mean(
        {k: fp32_outputs[k] for k in ref}, ref, "OpenVINO IR outputs differ from the original SavedModel's")
    steps["openvino"]["mean_tolerance"] = qcheck.mean_tolerance


def _convert(stripped_dir: str, onnx_path: str, xml: str, opset: int, check, signature_key: str, tol: dict,
             require_onnx: bool, log=lambda msg: None, frozen=None, reference=None) -> tuple[dict, dict]:
    """Write ``model.onnx`` and the FP32 IR made from it; return the report's ``onnx`` and ``openvino`` steps
    and the FP32 IR's outputs on ``check`` (f32 precision).

    A model tf2onnx cannot convert (or converts wrongly) still gets its IR, from the SavedModel through
    OpenVINO's TensorFlow reader, unless ``require_onnx``; the ``onnx`` step then gives the reason it was skipped.
    ``frozen`` is the stripped signature already frozen (tf2onnx starts from it instead of freezing again);
    ``reference``, TensorFlow's outputs of it on ``check``, is what the first conversion is checked against.
    """
    t = time.perf_counter()
    log("[3/5] converting to ONNX (tf2onnx)")
    try:
        c = to_onnx(stripped_dir, onnx_path, opset=opset, check_inputs=check, signature_key=signature_key,
                    tolerance=tol["onnx"], frozen=frozen, reference=reference)
    except ExportError as e:
        if require_onnx:
            raise
        reason = str(e).splitlines()[0]
        print(f"warning: ONNX skipped ({reason}); the OpenVINO IR is built from the SavedModel "
              "(--require_onnx makes this an error)", file=sys.stderr, flush=True)
        steps = {"onnx": {"seconds": time.perf_counter() - t, "skipped": reason}}
        t = time.perf_counter()
        log("[4/5] converting the SavedModel to OpenVINO IR (OpenVINO's TensorFlow reader)")
        c = saved_model_to_openvino(stripped_dir, xml, check_inputs=check, tolerance=tol["openvino"],
                                    signature_key=signature_key, reference=reference)
        steps["openvino"] = {"seconds": time.perf_counter() - t, "source": "saved_model", **c}
        return steps, c.outputs
    steps = {"onnx": {"seconds": time.perf_counter() - t, **c}}
    t = time.perf_counter()
    log("[4/5] converting to OpenVINO IR")
    c = to_openvino(onnx_path, xml, check_inputs=check, tolerance=tol["openvino"], onnx_check=c)
    steps["openvino"] = {"seconds": time.perf_counter() - t, "source": "onnx", **c}
    return steps, c.outputs


def _int8(xml: str, xml8: str, calib: dict[str, np.ndarray], mode: str, max_drop: float, valid, saved_model_dir: str,
          verbose: bool = True, max_iterations: int = 50, range_estimator: str = "auto", fixed: int | None = None,
          out_key: str = "", overflow_fix: str = "first_layer") -> dict:
    """Calibrate the FP32 IR, store int8 weights, and say which layers really run INT8.

    With accuracy control, a ``max_drop`` that was not reached is said on stderr and in the returned
    ``max_drop_met`` / ``warning``; the drop holds for the IR compiled with ``inference_precision``. It scores
    the output named ``out_key``, on batches of ``fixed`` samples when the model takes only that many.
    """
    import warnings

    import openvino as ov

    from tfcompress import calibration

    fp = ov.Core().read_model(xml)
    info: dict = {"range_estimator": calibration.range_estimator_for(fp, range_estimator),
                  "overflow_fix": overflow_fix, "cpu_saturates_int8": calibration.cpu_saturates_int8()}
    if mode == "accuracy_aware":
        # accuracy control runs its trial models in batches of its own size: give them a free batch dimension
        shapes = {port.get_any_name(): port.get_partial_shape() for port in fp.inputs}
        if fixed is not None:
            _reshape_batch(fp, -1)
        validate, info["drop_metric"] = _drop_metric(fp, valid, out_key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # said below, once, in the pipeline's own words
            q, acc = calibration.calibrate_with_accuracy_control(
                fp, calib, valid, validate, max_drop=max_drop, subset_size=min(_count(calib), 300),
                max_iterations=max_iterations, range_estimator=range_estimator, overflow_fix=overflow_fix,
                layer_names=_variable_layers(saved_model_dir), verbose=verbose)
        if fixed is not None:
            q.reshape(shapes)
        info.update({k: acc[k] for k in ("reverted", "reverted_ir", "restored", "drop", "fp32_metric", "max_drop_met",
                                         "int8_mac_share", "inference_precision")})
        if not acc["max_drop_met"]:
            info["warning"] = acc["warning"]
            print(f"warning: {acc['warning']}", file=sys.stderr, flush=True)
    else:
        q = calibration.calibrate(fp, calib, subset_size=min(_count(calib), 300), range_estimator=range_estimator,
                                  overflow_fix=overflow_fix, verbose=verbose)
    ov.save_model(q, xml8, compress_to_fp16=False)
    info["int8_layers"] = calibration.int8_layers(ov.Core().compile_model(xml8, "CPU"))
    return info


def _outputs(compiled, x: dict[str, np.ndarray], out_key: str) -> np.ndarray:
    """The output named ``out_key`` (the first one if empty) of a compiled IR on ``x``, in batches."""
    port = next((o for o in compiled.outputs if out_key in o.get_names()), compiled.outputs[0])
    return _batched(lambda b: compiled(b)[port], x)


def _all_outputs(compiled, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of a compiled IR on ``x``, in batches."""
    return [_batched(lambda b, port=port: compiled(b)[port], x) for port in compiled.outputs]


def _drop_metric(fp, valid, out_key: str = ""):
    """``(validate_fn, what it measures)`` for accuracy control on the validation data ``valid`` = (x, y).

    With labels: accuracy (the argmax of the output named ``out_key``), after checking that the FP32 model's
    argmax predicts the labels at least as often as a random guess among the label values present (two);
    otherwise the output is not class scores (a regression, an autoencoder's reconstruction) and its argmax
    accuracy would steer the search by noise. Without labels: minus the relative RMS error of the outputs
    against the FP32 IR's (f32), the largest of any output's, so that the drop is that error (0 for FP32).
    """
    import openvino as ov

    x, y = valid
    compiled = ov.Core().compile_model(fp, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    if y is None:
        refs = _all_outputs(compiled, x)
        scales = [float(np.sqrt(np.mean(np.square(r, dtype=np.float64)))) or 1.0 for r in refs]

        def output_error(compiled, data):
            return -max(float(np.sqrt(np.mean(np.square(got - ref, dtype=np.float64)))) / scale
                        for got, ref, scale in zip(_all_outputs(compiled, data[0]), refs, scales))
        what = "relative RMS error against FP32"
        return output_error, what + (f" (the largest of {len(refs)} outputs')" if len(refs) > 1 else "")
    ref = _outputs(compiled, x, out_key)
    values = len(np.unique(y))
    chance = 1.0 / max(2, values)
    if _accuracy(ref, y) < chance:
        raise ExportError(
            f"--int8=accuracy_aware: the FP32 model's argmax matches the labels of --validation_data in "
            f"{100 * _accuracy(ref, y):.1f} % of the samples, less than a random guess among {max(2, values)} "
            f"labels ({100 * chance:.1f} %): its output {out_key!r} does not score these classes (a regression or "
            "autoencoder output?); pass the samples without labels to bound the outputs' relative RMS error instead")
    return (lambda compiled, data: _accuracy(_outputs(compiled, data[0], out_key), data[1])), "accuracy"


def _reshape_batch(model, batch: int) -> None:
    """Give ``model``'s inputs the batch size ``batch`` (-1: any); ExportError when its graph cannot take it (a
    reshape to a constant shape that includes the batch)."""
    shapes = {}
    for port in model.inputs:
        shapes[port.get_any_name()] = shape = port.get_partial_shape()
        shape[0] = batch
    try:
        model.reshape(shapes)
    except Exception as e:
        raise ExportError(
            f"--int8=accuracy_aware needs the model to run on batches of any size, but its input "
            f"{model.inputs[0].get_any_name()!r} takes exactly {model.inputs[0].get_partial_shape()[0]} samples "
            f"and OpenVINO cannot free it ({str(e).splitlines()[0]}); use --int8=default") from None


def _variable_layers(saved_model_dir: str) -> list[str] | None:
    """The layer names in the SavedModel's variable names (``model/conv2d/kernel`` or, from TF/Keras 2,
    ``conv2d/kernel`` -> ``conv2d``), read from ``saved_model.pb``'s (or ``.pbtxt``'s) object graph without
    loading the model; None when it has none."""
    sm = read_saved_model_proto(saved_model_dir)
    names = {node.variable.name.split("/")[-2] for mg in sm.meta_graphs for node in mg.object_graph_def.nodes
             if node.WhichOneof("kind") == "variable" and "/" in node.variable.name}
    return sorted(names) or None


def _onnx_fn(path):
    import openvino as ov

    compiled = ov.Core().compile_model(ov.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feeds: {n: np.asarray(v) for out, v in compiled(feeds).items() for n in out.get_names()}


def _kept(layer: dict) -> str:
    """A layer's zeroed channels that the strip kept, counted by reason (``reason (n); ...``), or ``-``."""
    reasons = layer.get("kept_reasons") or {}
    return "; ".join(f"{why} ({n})" for why, n in sorted(reasons.items())) or "-"


def _kernels_line(k: dict, what: str) -> str:
    """report.md's sentence on an ``int8_kernels`` record: how this CPU's INT8 kernels compute ``what``."""
    cpu = {True: "has no VNNI (its INT8 kernels add u8 x i8 product pairs in int16 and can saturate)",
           False: "accumulates INT8 products in int32 (no saturation)",
           None: "is not one whose INT8 kernels tfcompress can classify"}[k["cpu_saturates_int8"]]
    verdict = ("within" if k["within_tolerance"] else "**beyond**") + f" its rounding noise ({k['tolerance']:.2e})"
    line = (f"This CPU {cpu}: its INT8 kernels compute {what} {k['max_rel_error']:.2e} (max) / "
            f"{k['mean_rel_error']:.2e} (mean relative error) away from its exact arithmetic (f32 hint), {verdict}.")
    if "default_precision" in k:
        d = k["default_precision"]
        line += (f" At OpenVINO's default precision here ({d['precision']}: the layers that do not run INT8 compute "
                 f"in it) {d['max_rel_error']:.2e} / {d['mean_rel_error']:.2e}, "
                 + ("within it." if d["within_tolerance"] else "**beyond** it."))
    return line


def _markdown(r: dict) -> str:
    lines = ["# tfcompress export report", "", f"Source: `{r['source']}` (signature `{r['signature']}`)", ""]
    fb, fa = r["flops"]["before"], r["flops"]["after"]
    lines += ["| | before | after | ratio |", "|---|---|---|---|",
              f"| parameters | {r['params']['before']:,} | {r['params']['after']:,} | "
              f"{r['params']['after'] / max(r['params']['before'], 1):.3f} |",
              f"| FLOPs | {fb:,.0f} | {fa:,.0f} | {fa / max(fb, 1):.3f} |",
              f"| SavedModel bytes (both written the same way) | {r['sizes']['unstripped']:,} | "
              f"{r['sizes']['stripped']:,} | {r['sizes']['stripped'] / max(r['sizes']['unstripped'], 1):.3f} |",
              ""]
    for key, why in sorted(r.get("dropped_outputs", {}).items()):
        lines += [f"Output `{key}` is left out of the export: it {why}.", ""]
    if r.get("signatures_left_out"):
        lines += [f"Signatures not exported (their inputs or outputs differ): "
                  f"{', '.join(f'`{k}`' for k in r['signatures_left_out'])}.", ""]
    written = f"The input SavedModel takes {r['sizes']['saved_model']:,} bytes as its exporter wrote it"
    if "onnx" in r["sizes"]:
        lines += [f"{written}; ONNX {r['sizes']['onnx']:,} bytes; OpenVINO FP32 IR "
                  f"{r['sizes']['openvino_fp32']:,} bytes.", ""]
    else:
        lines += [f"No ONNX model: {r['steps']['onnx']['skipped']}", "",
                  f"{written}; OpenVINO FP32 IR (from the SavedModel) {r['sizes']['openvino_fp32']:,} bytes.", ""]
    default = r["steps"].get("int8", {}).get("max_rel_error_precision")
    lines += ["## Numeric checks (relative max error against the previous step, OpenVINO at the f32 hint; int8: the "
              f"INT8 IR at OpenVINO's default precision{f' ({default} on this CPU)' if default else ''} against the "
              "FP32 IR)", "",
              "| step | error | seconds |", "|---|---|---|"]
    for step, s in r["steps"].items():
        err = f"{s['max_rel_error']:.2e}" if "max_rel_error" in s else ("skipped" if "skipped" in s else "-")
        lines.append(f"| {step} | {err} | {s['seconds']:.1f} |")
    if "quantized_check" in r:
        q = r["quantized_check"]
        lines += ["", f"Quantized graph: its outputs move by {q['noise_floor']:.2e} (max) / {q['noise_mean']:.2e} "
                  f"(mean) under a float rounding of its quantizers' inputs; the steps were held to "
                  f"{q['tolerance']:.2e} (max) and the IR to {q['mean_tolerance']:.2e} (mean). "
                  + ("These limits refuse a broken conversion." if q["verified"] else
                     "**Not verified**: limits this wide cannot tell a broken conversion from a correct one.")]
    if "int8_kernels" in r["steps"]["openvino"]:
        lines += ["", "The IR's quantizers were checked in exact arithmetic (f32). "
                  + _kernels_line(r["steps"]["openvino"]["int8_kernels"], "the IR")]
    if "int8_layers" in r["steps"]["openvino"]:
        run = r["steps"]["openvino"]["int8_layers"]
        lines.append(f"The quantization-aware IR (model_fp32.xml): {run['int8']} of {run['total']} convolution / "
                     "fully-connected layers run in INT8 on this CPU.")
    if "int8" in r["steps"]:
        s = r["steps"]["int8"]
        run = s["int8_layers"]
        lines += ["", f"INT8 IR: {run['int8']} of {run['total']} convolution / fully-connected layers run in INT8 "
                  f"({r['sizes']['openvino_int8']:,} bytes); activation ranges: {s['range_estimator']}; overflow "
                  f"fix: {s['overflow_fix']}."]
        if "int8_kernels" in s:
            lines.append(_kernels_line(s["int8_kernels"], "the INT8 IR"))
        if "reverted" in s:
            drop = (f"drop {100 * s['drop']:.2f} pts" if s["drop_metric"] == "accuracy" else
                    f"{s['drop_metric']} {100 * s['drop']:.2f} %")
            lines.append(f"Accuracy-aware: reverted to float: {s['reverted'] or 'none'}; {drop}; "
                         f"{100 * s['int8_mac_share']:.1f} % of the MACs in INT8; measured with the "
                         f"{s['inference_precision']} inference precision hint (compile the IR with it).")
            if not s["max_drop_met"]:
                lines.append(f"**max_drop NOT met**: {s['warning']}.")
    if "accuracy" in r:
        a = r["accuracy"]
        lines += ["", f"## Accuracy ({a['samples']} validation samples, output `{a['output']}`)", "",
                  "| artifact | accuracy |", "|---|---|"]
        for k in ("original", "stripped", "onnx", "openvino_fp32", "openvino_int8"):
            if k in a:
                lines.append(f"| {k} | {100 * a[k]:.2f} % |")
    lines += ["", "## Layers", "", "| layer | op | channels before | after | zeroed channels kept, and why |",
              "|---|---|---|---|---|"]
    for layer in r["layers"]:
        lines.append(f"| `{layer['name']}` | {layer['op']} | {layer['channels_before']} | {layer['channels_after']} "
                     f"| {_kept(layer)} |")
    return "\n".join(lines) + "\n"
