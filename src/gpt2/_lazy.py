"""Names a package exports but imports on first use (PEP 562), so that importing the
package does not import PyTorch (~1.5 s) for commands that never need it."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(namespace: dict, names: dict[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a package whose globals are `namespace`: each name in
    `names` is imported from its module when first asked for, then kept."""
    package = namespace["__name__"]

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
