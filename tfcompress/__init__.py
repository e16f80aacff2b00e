"""tfcompress: make TensorFlow/Keras models small and fast for CPU inference without leaving model.fit.

The pipeline: progressive filter pruning (:mod:`tfcompress.pruning`), quantization-aware training
(:mod:`tfcompress.quantization`), stripping of zeroed channels (:func:`strip`), conversion to ONNX and
OpenVINO IR (:mod:`tfcompress.export`) and post-training INT8 calibration (:mod:`tfcompress.calibration`).

Public names and the subpackages above are imported on first use (``tfcompress.quantization.quantize_model``
works after ``import tfcompress``), so ``import tfcompress`` alone does not import TensorFlow.
"""

from __future__ import annotations

import os as _os
import sys as _sys
from typing import TYPE_CHECKING as _TYPE_CHECKING

from tfcompress._lazy import lazy_exports as _lazy_exports

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# OpenVINO's converter sends usage telemetry when `openvino_telemetry` imports; a library must send nothing
# unless its user opted in (TFCOMPRESS_OPENVINO_TELEMETRY=1). OpenVINO falls back to its stub on ImportError.
if _os.environ.get("TFCOMPRESS_OPENVINO_TELEMETRY") != "1":
    _sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup", "UnsupportedModelError", "calibration", "channel_groups", "count_flops", "explain", "export",
    "load_config", "pruning", "quantization", "register_layer", "strip", "zero_channels", "__version__",
]

__getattr__, __dir__ = _lazy_exports(globals(), {
    "ChannelGroup": "tfcompress.graph",
    "UnsupportedModelError": "tfcompress.graph",
    "channel_groups": "tfcompress.graph",
    "zero_channels": "tfcompress.graph",
    "explain": "tfcompress.graph",
    "register_layer": "tfcompress.graph",
    "count_flops": "tfcompress.graph.flops",
    "strip": "tfcompress.stripping",
    "pruning": "tfcompress.pruning",
    "quantization": "tfcompress.quantization",
    "calibration": "tfcompress.calibration",
    "export": "tfcompress.export",
    "load_config": "tfcompress.pruning",
})

if _TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from tfcompress import calibration, export, pruning, quantization
    from tfcompress.graph import (
        ChannelGroup, UnsupportedModelError, channel_groups, explain, register_layer, zero_channels,
    )
    from tfcompress.graph.flops import count_flops
    from tfcompress.pruning import load_config
    from tfcompress.stripping import strip
