"""Export: strip a SavedModel, convert it to ONNX and OpenVINO IR; ``python -m tfcompress.export``.

Names are imported on first use, so that ``python -m tfcompress.export --help`` and its argument errors do not
wait for TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from tfcompress._lazy import lazy_exports as _lazy_exports

__all__ = [
    "ConversionCheck", "ExportError", "StripResult", "export_saved_model", "restore_weight_quantization", "run_openvino",
    "strip_saved_model", "to_onnx", "to_openvino",
]

__getattr__, __dir__ = _lazy_exports(globals(), {
    **{name: "tfcompress.export.convert"
       for name in ("ConversionCheck", "restore_weight_quantization", "run_openvino", "to_onnx", "to_openvino")},
    "export_saved_model": "tfcompress.export.pipeline",
    "ExportError": "tfcompress.errors",
    "StripResult": "tfcompress.stripping.savedmodel_strip",
    "strip_saved_model": "tfcompress.stripping.savedmodel_strip",
})

if _TYPE_CHECKING:
    from tfcompress.errors import ExportError
    from tfcompress.export.convert import (
        ConversionCheck, restore_weight_quantization, run_openvino, to_onnx, to_openvino,
    )
    from tfcompress.export.pipeline import export_saved_model
    from tfcompress.stripping.savedmodel_strip import StripResult, strip_saved_model
