"""Export: strip a SavedModel, convert it to ONNX and OpenVINO IR; ``python -m tfcompress.export``."""

from tfcompress.export.convert import ConversionCheck, restore_weight_quantization, run_openvino, to_onnx, to_openvino
from tfcompress.export.pipeline import export_saved_model
from tfcompress.strip.savedmodel_strip import ExportError, StripResult, strip_saved_model

__all__ = [
    "ConversionCheck", "ExportError", "StripResult", "export_saved_model", "restore_weight_quantization", "run_openvino",
    "strip_saved_model", "to_onnx", "to_openvino",
]
