"""The demo's argument checks, importable without TensorFlow so the command rejects bad flags at once."""

from __future__ import annotations

import os

from tfcompress.errors import ExportError
from tfcompress.output_dir import check_output_dir

__all__ = ["MARKER", "MAX_EPOCHS", "MAX_SEED", "check_args"]

MARKER = ".tfcompress-demo"  # a directory holding it was written by the demo and may be replaced by it
MAX_EPOCHS = 10_000  # a bound the training schedules' step counts fit in by far (an epoch takes seconds)
MAX_SEED = 2**32 - 1  # the largest seed numpy, and so keras.utils.set_random_seed, takes


def check_args(output_dir: str, epochs: int, target: float, seed: int = 0) -> bool:
    """Validate before any work; return whether ``output_dir`` is a previous demo output to replace.

    Raises:
        ExportError: ``epochs`` outside 1..:data:`MAX_EPOCHS`, a ``target`` outside (0, 1), a ``seed`` outside
            0..:data:`MAX_SEED`, or an ``output_dir`` that is a file or a non-empty directory the demo did not
            write.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_EPOCHS:
        raise ExportError(f"--epochs must be a whole number in 1..{MAX_EPOCHS}, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ExportError(f"--seed must be a whole number in 0..{MAX_SEED} (2**32 - 1), got {seed!r}")
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        raise ExportError(f"--target must be in (0, 1), got {target!r}")
    replace = (os.path.isdir(output_dir) and not os.path.islink(output_dir)
               and os.path.exists(os.path.join(output_dir, MARKER)))
    if not replace and os.path.isdir(output_dir) and not os.path.islink(output_dir) and os.listdir(output_dir):
        raise ExportError(f"output directory {output_dir!r} is not empty and was not written by the demo; "
                          "choose another --output_dir")
    check_output_dir(output_dir, overwrite=replace)
    return replace
