"""The one check that a path is a SavedModel directory, shared by the stripper and the export's option checks.

Imports nothing beyond the standard library, so a command can reject a wrong path before TensorFlow loads.
"""

from __future__ import annotations

import os

from tfcompress.errors import ExportError

__all__ = ["SAVED_MODEL_FILES", "check_saved_model_dir", "is_saved_model_dir", "read_saved_model_proto"]

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
    if not is_saved_model_dir(path):
        raise ExportError(f"{os.fspath(path)!r} is not a SavedModel directory (no saved_model.pb)")


def is_saved_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds ``saved_model.pb`` or ``saved_model.pbtxt``."""
    return any(os.path.isfile(os.path.join(path, f)) for f in SAVED_MODEL_FILES)


def read_saved_model_proto(src_dir: str | os.PathLike):
    """``src_dir``'s ``saved_model.pb`` (or, written as text, ``saved_model.pbtxt``) as a ``SavedModel``
    protocol buffer, without loading the model (TensorFlow's protobuf modules are imported here, on first use)."""
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    binary = os.path.join(src_dir, "saved_model.pb")
    if os.path.isfile(binary):
        with open(binary, "rb") as f:
            sm.ParseFromString(f.read())
    else:
        with open(os.path.join(src_dir, "saved_model.pbtxt"), encoding="utf-8") as f:
            text_format.Parse(f.read(), sm)
    return sm
