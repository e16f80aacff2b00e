"""Post-training INT8 calibration of OpenVINO models (our implementation on the OpenVINO Python API)."""

from tfcompress.calibration.accuracy_control import calibrate_with_accuracy_control, layer_macs
from tfcompress.calibration.cpu import cpu_int8_deconvolution_needs_static_shapes, cpu_saturates_int8
from tfcompress.calibration.exact import exact_arithmetic, is_quantized
from tfcompress.calibration.names import layer_names
from tfcompress.calibration.quantize import (
    PRESETS, RANGE_ESTIMATORS, calibrate, compress_weights, int8_layers, range_estimator_for, runs_int8,
)

__all__ = [
    "PRESETS", "RANGE_ESTIMATORS", "calibrate", "calibrate_with_accuracy_control", "compress_weights",
    "cpu_int8_deconvolution_needs_static_shapes", "cpu_saturates_int8", "exact_arithmetic", "int8_layers",
    "is_quantized", "layer_macs", "layer_names", "range_estimator_for", "runs_int8",
]
