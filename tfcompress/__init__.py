"""tfcompress: make TensorFlow/Keras models small and fast for CPU inference without leaving model.fit.

The pipeline: progressive filter pruning (:mod:`tfcompress.pruning`), quantization-aware training
(:mod:`tfcompress.quantization`), stripping of zeroed channels (:func:`strip`), conversion to ONNX and
OpenVINO IR (:mod:`tfcompress.export`) and post-training INT8 calibration (:mod:`tfcompress.calibration`).
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfcompress.graph import ChannelGroup, UnsupportedModelError, channel_groups, zero_channels  # noqa: E402
from tfcompress.graph.flops import count_flops  # noqa: E402
from tfcompress.strip import strip  # noqa: E402
from tfcompress import pruning  # noqa: E402
from tfcompress.pruning import load_config  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ChannelGroup", "UnsupportedModelError", "channel_groups", "count_flops", "load_config", "pruning", "strip",
    "zero_channels", "__version__",
]
