"""Stripping: physically remove zeroed channels (Keras models here, SavedModels in tfcompress.export)."""

from tfcompress.strip.keras_strip import strip

__all__ = ["strip"]
