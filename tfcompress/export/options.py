"""The export's argument checks, importable without TensorFlow so the command rejects bad flags at once."""

from __future__ import annotations

import os

from tfcompress.errors import ExportError

__all__ = ["INT8_MODES", "check_args"]

INT8_MODES = ("default", "accuracy_aware", "none")


def check_args(saved_model_dir: str, output_dir: str, int8: str = "default", max_drop: float = 0.01,
               opset: int = 17, overwrite: bool = False) -> None:
    """Raise :class:`ExportError` for an option out of range or an output directory that may not be written.

    The SavedModel itself is checked when it is read (:func:`~tfcompress.export.strip_saved_model`).
    """
    if int8 not in INT8_MODES:
        raise ExportError(f"--int8 must be one of {list(INT8_MODES)}, got {int8!r}")
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop < 1):
        raise ExportError(f"--max_drop must be in [0, 1), got {max_drop!r}")
    if not isinstance(opset, int) or not 13 <= opset <= 18:
        raise ExportError(f"--opset must be in 13..18 (tf2onnx 1.17), got {opset!r}")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ExportError(f"output path {output_dir!r} exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"output directory {output_dir!r} exists and is not empty (pass --overwrite)")
    src = os.path.abspath(saved_model_dir)
    if os.path.abspath(output_dir) == src or os.path.abspath(output_dir).startswith(src + os.sep):
        raise ExportError("the output directory must not be the input SavedModel or inside it")
