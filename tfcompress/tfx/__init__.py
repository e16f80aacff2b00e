"""TFX integration: the ``CompressModel`` component (needs ``pip install "tfcompress[tfx]"``).

The Trainer's ``run_fn`` uses :class:`tfcompress.pruning.FilterPruning` like any training script; this
component takes the Trainer's Model and emits the compressed one. The work itself lives in
:mod:`tfcompress.export.artifacts`, which does not need TFX.
"""

from tfcompress.export.artifacts import compress_model_dir
from tfcompress.tfx.component import CompressModel

__all__ = ["CompressModel", "compress_model_dir"]
