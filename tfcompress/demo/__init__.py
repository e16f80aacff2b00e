"""``python -m tfcompress.demo``: the whole pipeline on bundled data, with a report and plots.

``run_demo`` is imported on first use, so that the command's ``--help`` and argument errors do not wait for
TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING as _TYPE_CHECKING

from tfcompress._lazy import lazy_exports as _lazy_exports

__all__ = ["run_demo"]

__getattr__, __dir__ = _lazy_exports(globals(), {"run_demo": "tfcompress.demo.run"})

if _TYPE_CHECKING:
    from tfcompress.demo.run import run_demo
