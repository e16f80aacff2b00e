"""The whole export: SavedModel -> stripped SavedModel -> ONNX -> OpenVINO IR, with a report."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from tfcompress.errors import ExportError
from tfcompress.export.convert import _run_onnx, run_openvino, to_onnx, to_openvino
from tfcompress.export.data import load_data
from tfcompress.export.options import check_args
from tfcompress.stripping.savedmodel_strip import (
    atomic_output_dir, commit_dir, freeze_saved_model, run_frozen, strip_saved_model,
)

__all__ = ["export_saved_model"]

# Output checks of a model that holds FakeQuant ops (from QAT). A value that lands on a rounding boundary of a
# quantizer moves by a whole quantization step, and the next layers carry the step on: the stripped graph
# sums in another order (float rounding ~1e-7 is enough to cross a boundary), ONNX's QuantizeLinear rounds
# ties to even where TF's FakeQuant rounds them up, and OpenVINO runs such a model with INT8 kernels even
# with an f32 hint. Deep networks carry more of these steps to the output. Measured: 1.3e-3 (strip), 4e-3
# (ONNX), 2e-2 (OpenVINO) on the demo's 10-layer model; 7e-2 (ONNX) on MobileNetV2 (53 quantized layers,
# softmax output). The check then only catches gross conversion errors; the report's accuracies say more.
FLOAT_TOLERANCE = {"strip": 1e-4, "onnx": 1e-4, "openvino": 1e-4}
QUANTIZED_TOLERANCE = {"strip": 0.15, "onnx": 0.15, "openvino": 0.15}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs.reshape(len(outputs), -1), axis=1) == labels.reshape(-1)))


def _batched(fn, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import keras

    bar = keras.utils.Progbar(len(x), verbose=1 if len(x) > batch and sys.stderr.isatty() else 0)
    parts = []
    for i in range(0, len(x), batch):
        parts.append(fn(x[i:i + batch]))
        bar.update(min(i + batch, len(x)))
    return np.concatenate(parts)


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
) -> dict:
    """Write ``stripped/``, ``model.onnx``, ``model_fp32.xml/.bin``, with calibration data
    ``model_int8.xml/.bin``, and ``report.json/.md`` into ``output_dir``.

    Everything is validated before any work, written into a temporary directory next to ``output_dir`` and
    moved into place at the end: a failure leaves ``output_dir`` as it was. ``saved_model_dir`` is only read.

    Args:
        saved_model_dir: the SavedModel (any TF 2 or TF/Keras 2 SavedModel with a serving signature).
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        calibration_data: samples for INT8 calibration: a .npy/.npz file, an image directory or an array.
        int8: ``"default"``, ``"accuracy_aware"`` or ``"none"``.
        max_drop: largest accuracy drop for ``int8="accuracy_aware"``.
        validation_data: samples with labels (a .npz file, an image directory or ``(x, y)`` arrays); the
            report then gives each artifact's accuracy.
        opset: ONNX opset (13..18).

    Returns:
        The report (also written as ``report.json``).
    """
    check_args(saved_model_dir, output_dir, int8, max_drop, opset, overwrite)

    t0 = time.perf_counter()
    _log(f"[1/5] reading {saved_model_dir}")
    frozen = freeze_saved_model(saved_model_dir, signature_key)
    if len(frozen.specs) != 1 and (calibration_data is not None or validation_data is not None):
        raise ExportError("calibration/validation data files are supported for single-input models only")
    spec = next(iter(frozen.specs.values()))
    name = next(iter(frozen.specs))
    calib = load_data(calibration_data, spec, "calibration data") if calibration_data is not None else None
    valid = load_data(validation_data, spec, "validation data") if validation_data is not None else None
    if int8 == "accuracy_aware" and calib is not None and (valid is None or valid[1] is None):
        raise ExportError("--int8=accuracy_aware needs --validation_data with labels to measure the drop")
    quantized = any(n.op.startswith("FakeQuant") for n in frozen.graph_def.node)
    tol = QUANTIZED_TOLERANCE if quantized else FLOAT_TOLERANCE
    check = None
    for data in (valid, calib):
        if data is not None:
            check = {name: data[0][:8]}
            break

    tmp = atomic_output_dir(output_dir)
    try:
        report: dict = {"source": os.path.abspath(saved_model_dir), "signature": signature_key, "steps": {}}
        t = time.perf_counter()
        _log("[2/5] stripping zeroed channels")
        stripped_dir = os.path.join(tmp, "stripped")
        strip = strip_saved_model(saved_model_dir, stripped_dir, signature_key, check_inputs=check,
                                  tolerance=tol["strip"])
        report["steps"]["strip"] = {"seconds": time.perf_counter() - t, "max_rel_error": strip.max_rel_error}
        report["layers"] = strip.layers
        report["params"] = {"before": strip.params_before, "after": strip.params_after}
        report["flops"] = {"before": strip.flops_before, "after": strip.flops_after}

        t = time.perf_counter()
        _log("[3/5] converting to ONNX (tf2onnx)")
        onnx_path = os.path.join(tmp, "model.onnx")
        c = to_onnx(stripped_dir, onnx_path, opset=opset, check_inputs=check, signature_key=signature_key,
                    tolerance=tol["onnx"])
        report["steps"]["onnx"] = {"seconds": time.perf_counter() - t, **c}

        t = time.perf_counter()
        _log("[4/5] converting to OpenVINO IR")
        xml = os.path.join(tmp, "model_fp32.xml")
        c = to_openvino(onnx_path, xml, check_inputs=check, tolerance=tol["openvino"])
        report["steps"]["openvino"] = {"seconds": time.perf_counter() - t, **c}
        report["quantized"] = quantized

        report["sizes"] = {
            "saved_model": _size(saved_model_dir), "stripped": _size(stripped_dir), "onnx": _size(onnx_path),
            "openvino_fp32": _size(xml) + _size(xml[:-4] + ".bin"),
        }
        xml8 = None
        if calib is not None and int8 != "none":
            t = time.perf_counter()
            _log(f"[4b/5] INT8 calibration ({int8}) on {min(len(calib[0]), 300)} samples")
            xml8 = os.path.join(tmp, "model_int8.xml")
            report["steps"]["int8"] = _int8(xml, xml8, calib[0], int8, max_drop, valid, saved_model_dir)
            report["steps"]["int8"]["seconds"] = time.perf_counter() - t
            report["sizes"]["openvino_int8"] = _size(xml8) + _size(xml8[:-4] + ".bin")
        if valid is not None and valid[1] is not None:
            _log("[5/5] measuring accuracy on the validation data")
            x, y = valid
            out_key = sorted(frozen.outputs)[0]
            report["accuracy"] = {
                "original": _accuracy(_batched(lambda b: run_frozen(frozen, frozen.graph_def, {name: b})[out_key], x), y),
                "stripped": _accuracy(_batched(lambda b: _run_stripped(stripped_dir, signature_key, name, b, out_key), x), y),
                "onnx": _accuracy(_batched(lambda b: _onnx_fn(onnx_path)({name: b})[out_key], x), y),
                "openvino_fp32": _accuracy(_batched(lambda b: list(run_openvino(xml, {name: b}).values())[0], x), y),
                "samples": int(len(x)),
            }
            if xml8 is not None:  # compiled as accuracy control measured it (f32 hint), else the default
                p8 = "f32" if report["steps"]["int8"].get("inference_precision") == "f32" else "default"
                report["accuracy"]["openvino_int8"] = _accuracy(
                    _batched(lambda b: list(run_openvino(xml8, {name: b}, precision=p8).values())[0], x), y)
        else:
            _log("[5/5] no labelled validation data: accuracy not measured")
        report["seconds"] = time.perf_counter() - t0
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_markdown(report))
        commit_dir(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"wrote {output_dir} in {report['seconds']:.1f} s")
    return report


def _int8(xml: str, xml8: str, calib: np.ndarray, mode: str, max_drop: float, valid, saved_model_dir: str) -> dict:
    """Calibrate the FP32 IR, store int8 weights, and say which layers really run INT8.

    With accuracy control, a ``max_drop`` that was not reached is said on stderr and in the returned
    ``max_drop_met`` / ``warning``; the drop holds for the IR compiled with ``inference_precision``.
    """
    import warnings

    import openvino as ov

    from tfcompress import calibration

    fp = ov.Core().read_model(xml)
    info: dict = {}
    if mode == "accuracy_aware":
        def validate(compiled, data):
            x, y = data
            outs = [np.asarray(compiled({0: x[i:i + 256]})[compiled.outputs[0]]) for i in range(0, len(x), 256)]
            return _accuracy(np.concatenate(outs), y)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # said below, once, in the pipeline's own words
            q, acc = calibration.calibrate_with_accuracy_control(
                fp, calib, valid, validate, max_drop=max_drop, subset_size=min(len(calib), 300),
                layer_names=_variable_layers(saved_model_dir))
        info.update({k: acc[k] for k in ("reverted", "reverted_ir", "drop", "fp32_metric", "max_drop_met",
                                         "int8_mac_share", "inference_precision")})
        if not acc["max_drop_met"]:
            info["warning"] = acc["warning"]
            _log(f"WARNING: {acc['warning']}")
    else:
        q = calibration.calibrate(fp, calib, subset_size=min(len(calib), 300))
    ov.save_model(q, xml8, compress_to_fp16=False)
    info["int8_layers"] = calibration.int8_layers(ov.Core().compile_model(xml8, "CPU"))
    return info


def _variable_layers(saved_model_dir: str) -> list[str] | None:
    """The layer names in the SavedModel's variable names (``conv2d/kernel:0`` -> ``conv2d``), which a
    Keras model's export keeps; None when it has none."""
    import tensorflow as tf

    names = {v.name.split("/")[0] for v in getattr(tf.saved_model.load(saved_model_dir), "variables", [])}
    return sorted(names) or None


_STRIPPED_CACHE: dict = {}


def _run_stripped(path, key, name, batch, out_key):
    import tensorflow as tf

    if path not in _STRIPPED_CACHE:
        _STRIPPED_CACHE.clear()
        _STRIPPED_CACHE[path] = tf.saved_model.load(path).signatures[key]
    return _STRIPPED_CACHE[path](**{name: tf.constant(batch)})[out_key].numpy()


def _onnx_fn(path):
    with open(path, "rb") as f:
        data = f.read()
    return lambda feeds: _run_onnx(data, feeds)


def _markdown(r: dict) -> str:
    lines = ["# tfcompress export report", "", f"Source: `{r['source']}` (signature `{r['signature']}`)", ""]
    fb, fa = r["flops"]["before"], r["flops"]["after"]
    lines += ["| | before | after | ratio |", "|---|---|---|---|",
              f"| parameters | {r['params']['before']:,} | {r['params']['after']:,} | "
              f"{r['params']['after'] / max(r['params']['before'], 1):.3f} |",
              f"| FLOPs | {fb:,.0f} | {fa:,.0f} | {fa / max(fb, 1):.3f} |",
              f"| SavedModel bytes | {r['sizes']['saved_model']:,} | {r['sizes']['stripped']:,} | "
              f"{r['sizes']['stripped'] / max(r['sizes']['saved_model'], 1):.3f} |", ""]
    lines += [f"ONNX {r['sizes']['onnx']:,} bytes; OpenVINO FP32 IR {r['sizes']['openvino_fp32']:,} bytes.", ""]
    lines += ["## Numeric checks (relative max error)", "", "| step | error | seconds |", "|---|---|---|"]
    for step, s in r["steps"].items():
        err = f"{s['max_rel_error']:.2e}" if "max_rel_error" in s else "-"
        lines.append(f"| {step} | {err} | {s['seconds']:.1f} |")
    if "int8" in r["steps"]:
        s = r["steps"]["int8"]
        run = s["int8_layers"]
        lines += ["", f"INT8 IR: {run['int8']} of {run['total']} convolution / fully-connected layers run in INT8 "
                  f"({r['sizes']['openvino_int8']:,} bytes)."]
        if "reverted" in s:
            lines.append(f"Accuracy-aware: reverted to float: {s['reverted'] or 'none'}; drop {100 * s['drop']:.2f} pts; "
                         f"{100 * s['int8_mac_share']:.1f} % of the MACs in INT8; measured with the "
                         f"{s['inference_precision']} inference precision hint (compile the IR with it).")
            if not s["max_drop_met"]:
                lines.append(f"**max_drop NOT met**: {s['warning']}.")
    if "accuracy" in r:
        a = r["accuracy"]
        lines += ["", f"## Accuracy ({a['samples']} validation samples)", "", "| artifact | accuracy |", "|---|---|"]
        for k in ("original", "stripped", "onnx", "openvino_fp32", "openvino_int8"):
            if k in a:
                lines.append(f"| {k} | {100 * a[k]:.2f} % |")
    lines += ["", "## Layers", "", "| layer | op | channels before | after |", "|---|---|---|---|"]
    for layer in r["layers"]:
        lines.append(f"| `{layer['name']}` | {layer['op']} | {layer['channels_before']} | {layer['channels_after']} |")
    return "\n".join(lines) + "\n"
