"""TFX integration: the ``CompressModel`` component (needs ``pip install "tfcompress[tfx]"``).

The Trainer's ``run_fn`` uses :class:`tfcompress.pruning.FilterPruning` like any training script; this
component takes the Trainer's Model and emits the compressed one. The work itself lives in
:mod:`tfcompress.export.artifacts` and :mod:`tfcompress.tfx.serving`, which do not need TFX, so
``CompressModel`` is imported on first use: ``from tfcompress.tfx import CompressModel`` without TFX raises an
ImportError that says how to install it, while ``tfcompress.tfx.serving`` works without TFX.
"""

from tfcompress.export.artifacts import compress_model_dir
from tfcompress.tfx.serving import attach_parsing, compress_trainer_model

__all__ = ["CompressModel", "attach_parsing", "compress_model_dir", "compress_trainer_model"]


def __getattr__(name: str):
    if name == "CompressModel":
        from tfcompress.tfx.component import CompressModel

        return CompressModel
    raise AttributeError(f"module 'tfcompress.tfx' has no attribute {name!r}")
