"""Stripping: physically remove zeroed channels from a Keras model or from a SavedModel."""

from tfcompress.stripping.keras_strip import strip
from tfcompress.stripping.savedmodel_strip import ExportError, StripResult, strip_saved_model

__all__ = ["ExportError", "StripResult", "strip", "strip_saved_model"]
