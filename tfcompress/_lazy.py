"""Lazy package attributes (PEP 562), so that ``import tfcompress`` and ``python -m tfcompress.<command> --help``
do not pay for importing TensorFlow (seconds, and its log lines) until a name that needs it is used."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                             Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package whose ``globals()`` is ``namespace``: ``exports`` maps each
    public name to the module defining it (a name equal to its module's last component is that module itself)."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        value = module if exports[name].rsplit(".", 1)[-1] == name else getattr(module, name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
