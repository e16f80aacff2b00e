"""What the ``CompressModel`` TFX component does, on plain directories (no TFX import needed).

TFX artifacts are directories with conventions: a Trainer's Model artifact keeps its SavedModel under
``Format-Serving/``; an Examples artifact keeps gzipped TFRecords of ``tf.train.Example`` under
``Split-<name>/``. This module reads those, turns examples into model inputs, runs the export pipeline
(:func:`tfcompress.export.export_saved_model`) and lays the results out as a Model artifact whose
``Format-Serving/`` is the stripped SavedModel, so the components after it (Evaluator, Pusher) see a normal
Model. Keeping it free of TFX lets it be tested, and used, without a TFX installation.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
from typing import Callable

import numpy as np

from tfcompress.errors import ExportError
from tfcompress.export.options import check_options
from tfcompress.export.pipeline import export_saved_model
from tfcompress.saved_model_dir import is_saved_model_dir, read_saved_model_proto

__all__ = ["compress_model_dir", "read_examples", "SERVING_DIR", "EXPORT_DIR"]

SERVING_DIR = "Format-Serving"  # tfx.utils.path_utils.serving_model_dir's layout
EXPORT_DIR = "tfcompress"  # ONNX, IRs and the report, next to Format-Serving


def serving_model_path(model_uri: str) -> str:
    """The SavedModel inside a Model artifact (``Format-Serving/``), or the directory itself if it is one."""
    for path in (os.path.join(model_uri, SERVING_DIR), model_uri):
        if is_saved_model_dir(path):
            return path
    raise ExportError(f"no SavedModel in the Model artifact {model_uri!r} (looked for {SERVING_DIR}/saved_model.pb)")


def _signature_input_shapes(saved_model_dir: str, key: str) -> list[list[int | None]] | None:
    """Input shapes of a serving signature, read from ``saved_model.pb`` (the export loads the model itself;
    loading it here too only to learn a shape would double the time and memory)."""
    for mg in read_saved_model_proto(saved_model_dir).meta_graphs:
        if "serve" in mg.meta_info_def.tags and key in mg.signature_def:
            inputs = mg.signature_def[key].inputs
            return [[None if d.size < 0 else d.size for d in inputs[k].tensor_shape.dim] for k in sorted(inputs)]
    return None


def read_examples(examples_uri: str, split: str, limit: int) -> dict[str, np.ndarray]:
    """Up to ``limit`` ``tf.train.Example`` records of one split, as ``{feature: array (n, ...)}``.

    Every feature must have the same length in every record (what ExampleGen writes for fixed-size data).
    """
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(examples_uri, f"Split-{split}", "*")))
    if not files:
        splits = sorted(os.path.basename(p)[6:] for p in glob.glob(os.path.join(examples_uri, "Split-*")))
        raise ExportError(f"the Examples artifact {examples_uri!r} has no split {split!r} (it has {splits})")
    compression = "GZIP" if files[0].endswith(".gz") else ""
    records = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type=compression).take(limit)]
    if not records:
        raise ExportError(f"split {split!r} of {examples_uri!r} holds no examples")
    first = tf.train.Example.FromString(records[0])
    spec = {}
    for name, feature in first.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value
        dtype = {"float_list": tf.float32, "int64_list": tf.int64, "bytes_list": tf.string}[kind]
        spec[name] = tf.io.FixedLenFeature([len(values)], dtype)
    try:
        parsed = tf.io.parse_example(records, spec)
    except tf.errors.InvalidArgumentError as e:
        raise ExportError(f"examples of {examples_uri!r} do not all have the same feature sizes: "
                          f"{str(e).splitlines()[0]}") from None
    return {k: v.numpy() for k, v in parsed.items()}


def load_preprocessing_fn(module_file: str, fn_name: str) -> Callable:
    """``fn_name`` from ``module_file`` (TFX's module-file convention)."""
    if not os.path.isfile(module_file):
        raise ExportError(f"module_file {module_file!r} does not exist")
    spec = importlib.util.spec_from_file_location("tfcompress_user_module", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ExportError(f"module_file {module_file!r} has no function {fn_name!r}")
    return fn


def _model_inputs(features: dict, label_key: str, fn: Callable | None, input_shape) -> np.ndarray:
    if fn is not None:
        x = np.asarray(fn(dict(features)))
    else:
        candidates = [k for k, v in features.items() if k != label_key and v.dtype.kind == "f"]
        if len(candidates) != 1:
            raise ExportError(f"cannot tell which feature is the model input among {sorted(features)}: give a "
                              "module_file with a preprocessing_fn(features) -> array")
        x = features[candidates[0]]
    want = [d for d in input_shape[1:]]
    if x.ndim == 2 and None not in want and x.shape[1] == int(np.prod(want)):
        x = x.reshape((len(x), *want))
    return x.astype(np.float32) if x.dtype.kind == "f" else x


def compress_model_dir(
    model_uri: str,
    output_uri: str,
    examples_uri: str | None = None,
    split: str = "eval",
    int8: str = "default",
    max_drop: float = 0.01,
    opset: int = 17,
    num_calibration_samples: int = 300,
    module_file: str | None = None,
    preprocessing_fn: str = "preprocessing_fn",
    label_key: str = "",
    signature: str = "serving_default",
    range_estimator: str = "auto",
    max_iterations: int = 50,
    allow_drop_miss: bool = False,
    overflow_fix: str = "first_layer",
) -> dict:
    """Compress the SavedModel of a Model artifact into ``output_uri``; return the component's metrics.

    ``output_uri`` gets ``Format-Serving/`` (the stripped SavedModel) and ``tfcompress/`` (``model_fp32.xml/.bin``,
    ``model_int8.xml/.bin`` with examples, ``report.json/.md``, and ``model.onnx`` unless tf2onnx cannot convert
    the model, when the report says why). Examples of ``split`` give the calibration samples (the first
    ``num_calibration_samples``) and, with ``label_key``, labelled validation samples (the rest of the split,
    else the same ones) so the report has every artifact's accuracy.

    ``range_estimator``, ``max_iterations`` and ``overflow_fix`` are :func:`export_saved_model`'s. With ``int8="accuracy_aware"``,
    a ``max_drop`` that is not reached raises :class:`ExportError` after the output is written (so a pipeline
    stops before pushing it, as the command exits non-zero) unless ``allow_drop_miss``; metric
    ``max_drop_met`` says 1 (met), 0 (missed, allowed) or -1 (not accuracy-aware).
    """
    check_options(int8, max_drop, opset, max_iterations, range_estimator, overflow_fix, prefix="")
    if int8 == "accuracy_aware" and not (examples_uri and label_key):
        raise ExportError("int8='accuracy_aware' measures the drop on labelled examples: give examples and "
                          "label_key (the examples' label feature)")
    if not isinstance(num_calibration_samples, int) or num_calibration_samples < 1:
        raise ExportError(f"num_calibration_samples must be a positive integer, got {num_calibration_samples!r}")
    if module_file and not examples_uri:
        raise ExportError("module_file is given but there are no examples to preprocess")
    src = serving_model_path(model_uri)
    calib = valid = None
    if examples_uri:
        fn = load_preprocessing_fn(module_file, preprocessing_fn) if module_file else None
        shapes = _signature_input_shapes(src, signature)
        if shapes is None:
            raise ExportError(f"the SavedModel in {model_uri!r} has no signature {signature!r}")
        if len(shapes) != 1:
            raise ExportError("examples can feed single-input models only")
        features = read_examples(examples_uri, split, limit=max(num_calibration_samples, 2000))
        if label_key and label_key not in features:
            raise ExportError(f"label_key {label_key!r} is not a feature of the examples ({sorted(features)})")
        x = _model_inputs(features, label_key, fn, shapes[0])
        calib = x[:num_calibration_samples]
        if label_key:
            y = features[label_key].reshape(len(x), -1)[:, 0]
            rest = slice(num_calibration_samples, None) if len(x) > num_calibration_samples else slice(None)
            valid = (x[rest], y[rest])
    os.makedirs(output_uri, exist_ok=True)
    export_dir = os.path.join(output_uri, EXPORT_DIR)
    report = export_saved_model(src, export_dir, calibration_data=calib,
                                int8=int8 if calib is not None else "none", max_drop=max_drop,
                                validation_data=valid, opset=opset, signature_key=signature, overwrite=True,
                                range_estimator=range_estimator, max_iterations=max_iterations,
                                overflow_fix=overflow_fix)
    serving = os.path.join(output_uri, SERVING_DIR)
    if os.path.exists(serving):
        shutil.rmtree(serving)
    os.replace(os.path.join(export_dir, "stripped"), serving)
    report["stripped_saved_model"] = serving
    with open(os.path.join(export_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    sizes, acc = report["sizes"], report.get("accuracy", {})
    int8_step = report["steps"].get("int8", {})
    int8_run = int8_step.get("int8_layers", {"int8": 0, "total": 0})
    met = int8_step.get("max_drop_met")
    if met is False and not allow_drop_miss:
        raise ExportError(f"{int8_step['warning']} (the output is written to {output_uri!r}; allow_drop_miss=True "
                          "accepts it)")
    return {
        "flops_ratio": report["flops"]["after"] / max(report["flops"]["before"], 1),
        "params_ratio": report["params"]["after"] / max(report["params"]["before"], 1),
        "saved_model_bytes_ratio": sizes["stripped"] / max(sizes["unstripped"], 1),
        "int8_layers": int(int8_run["int8"]),
        "quantizable_layers": int(int8_run["total"]),
        "accuracy_fp32": float(acc.get("openvino_fp32", -1.0)),
        "accuracy_int8": float(acc.get("openvino_int8", -1.0)),
        "max_drop_met": -1 if met is None else int(met),
    }
