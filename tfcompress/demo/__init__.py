"""``python -m tfcompress.demo``: the whole pipeline on bundled data, with a report and plots."""

from tfcompress.demo.run import run_demo

__all__ = ["run_demo"]
