"""Export: strip a SavedModel, convert it to ONNX and OpenVINO IR; ``python -m tfcompress.export``.

Names are imported on first use, so that ``python -m tfcompress.export --help`` and its argument errors do not
wait for TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from tfcompress._lazy import lazy_exports as _lazy_exports

_CONVERT = (
    "ConversionCheck", "freeze_for_export", "prepare_for_tf2onnx", "restore_weight_quantization", "run_onnx",
    "run_openvino", "saved_model_to_openvino", "to_onnx", "to_openvino",
)

__all__ = [*_CONVERT, "ExportError", "StripResult", "export_saved_model", "strip_saved_model"]

__getattr__, __dir__ = _lazy_exports(globals(), {
    **{name: "tfcompress.export.convert" for name in _CONVERT},
    "export_saved_model": "tfcompress.export.pipeline",
    "ExportError": "tfcompress.errors",
    "StripResult": "tfcompress.stripping.savedmodel_strip",
    "strip_saved_model": "tfcompress.stripping.savedmodel_strip",
})

if _TYPE_CHECKING:
    from tfcompress.errors import ExportError
    from tfcompress.export.convert import (
        ConversionCheck, freeze_for_export, prepare_for_tf2onnx, restore_weight_quantization, run_onnx,
        run_openvino, saved_model_to_openvino, to_onnx, to_openvino,
    )
    from tfcompress.export.pipeline import export_saved_model
    from tfcompress.stripping.savedmodel_strip import StripResult, strip_saved_model
