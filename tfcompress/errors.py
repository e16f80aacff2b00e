"""Errors raised for bad user input; importing this module does not import TensorFlow."""

__all__ = ["ExportError"]


class ExportError(ValueError):
    """A problem with the user's input (bad directory, missing signature, mismatched data ...)."""
