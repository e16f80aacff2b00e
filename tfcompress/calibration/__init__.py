"""Post-training INT8 calibration of OpenVINO models (our implementation on the OpenVINO Python API)."""

from tfcompress.calibration.quantize import PRESETS, calibrate, calibrate_with_accuracy_control

__all__ = ["PRESETS", "calibrate", "calibrate_with_accuracy_control"]
