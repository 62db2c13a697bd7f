"""distlr: a learning-rate range test that runs where training runs.

>>> from distlr import LRFinder, LRFinderResult, find_optimal_lr
"""

from distlr.finder import LRFinder, NoSuggestionError, find_optimal_lr
from distlr.result import LRFinderResult

__all__ = ["LRFinder", "LRFinderResult", "NoSuggestionError", "find_optimal_lr"]
__version__ = "0.1.0"
