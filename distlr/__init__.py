"""distlr: a learning-rate range test that runs where training runs.

>>> from distlr import LRFinder, LRFinderResult, find_optimal_lr

The names below are imported on first use, so that the pure modules (``distlr.core.rules``,
``distlr.core.analysis``, ...) can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LRFinder", "LRFinderResult", "NoSuggestionError", "find_optimal_lr"]
__version__ = "0.1.0"

_HOMES = {"LRFinder": "distlr.finder", "NoSuggestionError": "distlr.finder", "find_optimal_lr": "distlr.finder",
          "LRFinderResult": "distlr.core.result"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'distlr' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
