"""The one check that a path is a SavedModel directory, shared by the stripper and the export's option checks.

Imports nothing beyond the standard library, so a command can reject a wrong path before TensorFlow loads.
"""

from __future__ import annotations

import os

from tfcompress.errors import ExportError

__all__ = ["check_saved_model_dir"]

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")  # what tf.saved_model.contains_saved_model looks for


def check_saved_model_dir(path: str | os.PathLike) -> None:
    """Raise :class:`ExportError` naming ``path`` unless it is a directory holding ``saved_model.pb`` (or
    ``.pbtxt``)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ExportError(f"the SavedModel directory must be a non-empty path, got {path!r}")
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise ExportError(f"SavedModel directory {os.fspath(path)!r} does not exist")
        if os.fspath(path).lower().endswith((".keras", ".h5", ".hdf5")):
            raise ExportError(f"{os.fspath(path)!r} is a Keras model file, not a SavedModel: export it first "
                              "(keras.models.load_model(path).export(DIR)) and give DIR")
        raise ExportError(f"{os.fspath(path)!r} is not a directory (give the SavedModel's directory)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in SAVED_MODEL_FILES):
        raise ExportError(f"{os.fspath(path)!r} is not a SavedModel directory (no saved_model.pb)")
