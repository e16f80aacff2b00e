"""The demo's argument checks, importable without TensorFlow so the command rejects bad flags at once."""

from __future__ import annotations

import os

from tfcompress.errors import ExportError
from tfcompress.output_dir import check_output_dir

__all__ = ["MARKER", "check_args"]

MARKER = ".tfcompress-demo"  # a directory holding it was written by the demo and may be replaced by it


def check_args(output_dir: str, epochs: int, target: float) -> bool:
    """Validate before any work; return whether ``output_dir`` is a previous demo output to replace.

    Raises:
        ExportError: a non-positive ``epochs``, a ``target`` outside (0, 1), or an ``output_dir`` that is a
            file or a non-empty directory the demo did not write.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ExportError(f"--epochs must be a positive integer, got {epochs!r}")
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ExportError(f"--target must be in (0, 1), got {target!r}")
    replace = (os.path.isdir(output_dir) and not os.path.islink(output_dir)
               and os.path.exists(os.path.join(output_dir, MARKER)))
    if not replace and os.path.isdir(output_dir) and not os.path.islink(output_dir) and os.listdir(output_dir):
        raise ExportError(f"output directory {output_dir!r} is not empty and was not written by the demo; "
                          "choose another --output_dir")
    check_output_dir(output_dir, overwrite=replace)
    return replace
