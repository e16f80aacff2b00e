"""The export's argument checks, importable without TensorFlow so the command rejects bad flags at once."""

from __future__ import annotations

import os
from typing import Any, Mapping

from tfcompress.calibration.quantize import RANGE_ESTIMATORS
from tfcompress.errors import ExportError
from tfcompress.int8_policy import OVERFLOW_FIX
from tfcompress.output_dir import check_output_dir
from tfcompress.saved_model_dir import ServingSignatures, check_saved_model_dir, check_signature

__all__ = ["INT8_MODES", "OVERFLOW_FIX", "RANGE_ESTIMATORS", "check_args", "check_data_path", "check_options",
           "check_saved_model_dir"]

INT8_MODES = ("default", "accuracy_aware", "none")


def check_args(saved_model_dir: str, output_dir: str, int8: str = "default", max_drop: float = 0.01,
               opset: int = 17, overwrite: bool = False, max_iterations: int = 50,
               data: Mapping[str, Any] | None = None, calibration_data: bool = True,
               range_estimator: str = "auto", overflow_fix: str = "first_layer", validation_data: bool = True,
               signature_key: str | None = None, prefix: str = "--") -> ServingSignatures | None:
    """Raise :class:`ExportError` for an option out of range, a missing SavedModel or signature, a data path that
    :func:`check_data_path` refuses, or an output directory that may not be written (see
    :func:`tfcompress.output_dir.check_output_dir`: never an input, inside one or around one). The inputs are
    the SavedModel and the paths among ``data`` (what it is called -> calibration / validation file, image
    folder, array or None; arrays are not paths). Only the file system is looked at: the SavedModel's content
    and the data are checked when they are read. ``calibration_data``: whether calibration data was given
    (``int8="accuracy_aware"`` asks for it explicitly: without it no INT8 model would be written).
    ``validation_data``: whether validation data was given (``int8="accuracy_aware"`` measures its drop on it).
    ``signature_key``: the signature to export, checked when ``saved_model.pb`` can be read without TensorFlow.
    ``range_estimator``: how calibration estimates activation ranges (:data:`RANGE_ESTIMATORS`);
    ``overflow_fix``: which layers calibration keeps on 7-bit weights (:data:`OVERFLOW_FIX`).

    ``prefix``: how errors name the options, as :func:`check_options` does (``"--"`` flags, ``""`` parameters).

    Returns the serving signatures read from ``saved_model.pb`` (with ``signature_key``), which
    :func:`tfcompress.export.data.check_data_files` checks the data against without reading the file again.
    """
    check_options(int8, max_drop, opset, max_iterations, range_estimator, overflow_fix, prefix)
    accuracy_aware = "--int8=accuracy_aware" if prefix else "int8='accuracy_aware'"
    if int8 == "accuracy_aware" and not calibration_data:
        raise ExportError(f"{accuracy_aware} needs {prefix}calibration_data (and {prefix}validation_data)")
    if int8 == "accuracy_aware" and not validation_data:
        raise ExportError(f"{accuracy_aware} needs {prefix}validation_data to measure the drop: labelled (accuracy) "
                          "or not (the INT8 outputs' relative RMS error against FP32)")
    check_saved_model_dir(saved_model_dir)
    serving = check_signature(saved_model_dir, signature_key) if signature_key is not None else None
    paths = {what: d for what, d in (data or {}).items() if isinstance(d, (str, os.PathLike))}
    for what, path in paths.items():
        check_data_path(path, what)
    check_output_dir(output_dir, [saved_model_dir, *paths.values()], overwrite)
    return serving


def check_options(int8: str, max_drop: float, opset: int, max_iterations: int, range_estimator: str,
                  overflow_fix: str, prefix: str = "--") -> None:
    """Raise :class:`ExportError` for an option out of range, naming it as its caller's user knows it:
    ``prefix`` ``"--"`` for the command's flags, ``""`` for parameters (a Python function's, a TFX
    component's)."""
    def fail(name: str, should: str, value) -> ExportError:
        return ExportError(f"{prefix}{name} must be {should}, got {value!r}")

    if int8 not in INT8_MODES:
        raise fail("int8", f"one of {list(INT8_MODES)}", int8)
    if range_estimator not in RANGE_ESTIMATORS:
        raise fail("range_estimator", f"one of {list(RANGE_ESTIMATORS)}", range_estimator)
    if overflow_fix not in OVERFLOW_FIX:
        raise fail("overflow_fix", f"one of {list(OVERFLOW_FIX)}", overflow_fix)
    if isinstance(max_drop, bool) or not (isinstance(max_drop, (int, float)) and 0 <= max_drop < 1):
        raise fail("max_drop", "in [0, 1)", max_drop)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 18:
        raise fail("opset", "in 13..18 (tf2onnx 1.17)", opset)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise fail("max_iterations", "a whole number >= 0", max_iterations)


def check_data_path(path: str, what: str) -> None:
    """Raise :class:`ExportError` unless ``path`` is an existing .npy / .npz file or a directory (of images):
    what :func:`tfcompress.export.data.load_data` reads, checked before TensorFlow loads."""
    if not os.path.exists(path):
        raise ExportError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path) and not str(path).endswith((".npy", ".npz")):
        raise ExportError(f"{what} {path!r} must be a .npy or .npz file or a directory of images")
