"""Suggestion rules: from a range-test curve to one learning rate, or to a reason there is none.

Pure math: no torch, no I/O. Every rule has the same signature, ``rule(lrs, losses) ->
Suggestion``, where ``lrs`` is the increasing LR ladder (exponential or linear) and ``losses`` the
smoothed loss at each LR, already cut where the sweep diverged. Before computing anything, every
rule refuses curves that cannot carry a suggestion (too few points, a loss that never fell) and
says why instead of returning a number that means nothing.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 5
"""Fewest usable points a curve needs before any rule will suggest an LR."""

MIN_RELATIVE_DROP = 0.01
"""The lowest loss must sit at least this fraction of ``|first loss|`` below the first loss."""

MIN_ABSOLUTE_DROP = 1e-12
"""Floor on the required drop, so that a curve starting at a loss of exactly 0 is judged too."""

TRIM_START_FRACTION = 0.1
"""``steepest_gradient`` ignores this fraction of the first points (at least one point)."""

MIN_WINDOW_POINTS = 3
"""``steepest_gradient`` needs this many points in its trimmed window to trust a slope."""

MINIMUM_DIVISOR = 10.0
"""``minimum`` suggests the LR of the lowest loss divided by this."""


@dataclass(frozen=True)
class Suggestion:
    """The outcome of one rule: an LR, or the reason there is no sound one.

    Either ``lr`` and ``index`` are set and ``reason`` is None, or ``lr`` and ``index`` are None
    and ``reason`` says what went wrong and what to change.

    Example:
        >>> Suggestion(lr=1e-3, index=42, reason=None).lr
        0.001
    """

    lr: float | None
    """The suggested learning rate, or None when there is no sound suggestion."""
    index: int | None
    """Index into ``lrs`` of the ladder point the suggestion sits on; the nearest one in log10
    space when ``lr`` itself is not on the ladder (``minimum``). None when ``lr`` is None."""
    reason: str | None
    """Why there is no suggestion, in words a user can act on. None when ``lr`` is set."""

    def __post_init__(self) -> None:
        has_lr, has_index, has_reason = self.lr is not None, self.index is not None, self.reason is not None
        if has_lr != has_index or has_lr == has_reason:
            raise ValueError(
                "a Suggestion has either lr and index (and no reason) or a reason (and no lr or index); "
                f"got lr={self.lr!r}, index={self.index!r}, reason={self.reason!r}"
            )


SuggestionRule = Callable[[Sequence[float], Sequence[float]], Suggestion]


def steepest_gradient(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest the LR where the loss falls fastest against log10(lr).

    The slope is ``numpy.gradient(losses, log10(lrs))``, so an exponential and a linear ladder are
    measured on the same axis. It is searched over a trimmed window of point indices
    ``[start, m)``, which must hold at least ``MIN_WINDOW_POINTS`` (3) points:

    - ``start = max(1, int(TRIM_START_FRACTION * n))``: the first smoothed points rest on very few
      raw losses, and their jumps would otherwise win as the "steepest" descent;
    - ``m`` is the (first) index of the lowest loss, excluded: past it the curve climbs towards
      divergence, and the slope at the minimum itself is a difference taken across the turn.

    On equal slopes the first (lowest) LR wins.

    Args:
        lrs: the LR ladder, strictly increasing and positive (list or 1-D array).
        losses: the smoothed loss at each LR, finite, same length.

    Returns:
        The ``Suggestion`` at the most negative slope in the window; no suggestion when the window
        has fewer than ``MIN_WINDOW_POINTS`` points or no negative slope.

    Raises:
        ValueError: for mismatched lengths, non-finite values, or a ladder that is not positive
            and strictly increasing.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> steepest_gradient(lrs, [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]).lr
        0.001
    """
    lr_arr, loss_arr = _as_curve(lrs, losses)
    refusal = _refuse_unusable(lr_arr, loss_arr)
    if refusal is not None:
        return refusal
    n = len(loss_arr)
    start = max(1, int(TRIM_START_FRACTION * n))
    lowest = int(np.argmin(loss_arr))
    if lowest - start < MIN_WINDOW_POINTS:
        return _no_suggestion(
            f"the loss bottomed out at lr={lr_arr[lowest]:.3g} (point {lowest + 1} of {n}), leaving "
            f"{max(lowest - start, 0)} points of descent after skipping the first {start} "
            f"(need {MIN_WINDOW_POINTS}); lower min_lr so the sweep starts before the loss falls, "
            "or raise num_steps"
        )
    slopes = np.gradient(loss_arr, np.log10(lr_arr))[start:lowest]
    steepest = int(np.argmin(slopes))
    if slopes[steepest] >= 0:
        # Only an uneven ladder gets here: on an exponential or linear one, the point just before
        # the first minimum always slopes down, since every earlier loss is higher.
        return _no_suggestion(
            f"the loss never slopes down between lr={lr_arr[start]:.3g} and lr={lr_arr[lowest]:.3g} "
            "once the first noisy points are skipped; lower min_lr or raise num_steps so the descent "
            "is sampled, or try suggestion_method='valley'"
        )
    index = start + steepest
    return Suggestion(lr=float(lr_arr[index]), index=index, reason=None)


def valley(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest the LR in the middle of the longest stretch over which the loss keeps descending.

    For every point, the length of the longest strictly decreasing subsequence of the loss that
    ends there is computed (patience sorting, O(n log n)). The point with the greatest length
    (the first on ties, which reaches the lower loss) is the valley's end, ``end - length + 1`` its
    start; the suggestion is the ladder point nearest, in log10 space, to the midpoint of
    ``log10(lrs[start])`` and ``log10(lrs[end])`` (the lower one on a tie). A subsequence may skip small bumps, so the
    valley is read as "about ``length`` points ending at ``end``", which keeps a long, flat and
    noisy start of the curve from stretching it.

    Args:
        lrs: the LR ladder, strictly increasing and positive (list or 1-D array).
        losses: the smoothed loss at each LR, finite, same length.

    Returns:
        The ``Suggestion`` at the valley's log-midpoint, or no suggestion with a reason.

    Raises:
        ValueError: for mismatched lengths, non-finite values, or a ladder that is not positive
            and strictly increasing.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> valley(lrs, [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]).lr
        0.01
    """
    lr_arr, loss_arr = _as_curve(lrs, losses)
    refusal = _refuse_unusable(lr_arr, loss_arr)
    if refusal is not None:
        return refusal
    lengths = _descent_lengths(loss_arr)
    end = int(np.argmax(lengths))
    start = end - int(lengths[end]) + 1
    log_lrs = np.log10(lr_arr)
    index = _nearest_index(log_lrs, (log_lrs[start] + log_lrs[end]) / 2.0)
    return Suggestion(lr=float(lr_arr[index]), index=index, reason=None)


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Suggest the LR of the lowest loss divided by ``MINIMUM_DIVISOR`` (10).

    At the minimum the loss has stopped improving and divergence is near, so a tenth of it is a
    conservative rule of thumb. The result is usually not on the ladder; ``index`` is the ladder
    point nearest to it in log10 space (the first point when it falls below the ladder).

    Args:
        lrs: the LR ladder, strictly increasing and positive (list or 1-D array).
        losses: the smoothed loss at each LR, finite, same length.

    Returns:
        The ``Suggestion``, or no suggestion with a reason.

    Raises:
        ValueError: for mismatched lengths, non-finite values, or a ladder that is not positive
            and strictly increasing.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> minimum(lrs, [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0])
        Suggestion(lr=0.1, index=4, reason=None)
    """
    lr_arr, loss_arr = _as_curve(lrs, losses)
    refusal = _refuse_unusable(lr_arr, loss_arr)
    if refusal is not None:
        return refusal
    lr = float(lr_arr[int(np.argmin(loss_arr))]) / MINIMUM_DIVISOR
    index = _nearest_index(np.log10(lr_arr), np.log10(lr))
    return Suggestion(lr=lr, index=index, reason=None)


SUGGESTION_RULES: dict[str, SuggestionRule] = {
    "steepest_gradient": steepest_gradient,
    "valley": valley,
    "minimum": minimum,
}
"""Every rule by its ``suggestion_method`` name; the first is the default."""


def suggest(method: str, lrs: Sequence[float], losses: Sequence[float]) -> Suggestion:
    """Apply the rule named ``method`` (a key of ``SUGGESTION_RULES``) to a curve.

    Args:
        method: the rule's name, e.g. ``"steepest_gradient"``.
        lrs: the LR ladder, strictly increasing and positive.
        losses: the smoothed loss at each LR, finite, same length.

    Returns:
        The rule's ``Suggestion``.

    Raises:
        ValueError: for an unknown ``method`` (naming the allowed ones) or a bad curve.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> suggest("minimum", lrs, [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]).lr
        0.1
    """
    rule = SUGGESTION_RULES.get(method)
    if rule is None:
        close = difflib.get_close_matches(str(method), SUGGESTION_RULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"suggestion_method={method!r} is not a known rule{hint}; "
            f"allowed: {', '.join(SUGGESTION_RULES)}"
        )
    return rule(lrs, losses)


def suggest_all(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, Suggestion]:
    """Apply every rule to a curve, in ``SUGGESTION_RULES`` order.

    Args:
        lrs: the LR ladder, strictly increasing and positive.
        losses: the smoothed loss at each LR, finite, same length.

    Returns:
        ``{rule name: Suggestion}``.

    Raises:
        ValueError: for a bad curve.

    Example:
        >>> lrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
        >>> {k: s.lr for k, s in suggest_all(lrs, [2.0, 2.1, 1.2, 0.9, 0.8, 0.7, 3.0]).items()}
        {'steepest_gradient': 0.001, 'valley': 0.01, 'minimum': 0.1}
    """
    return {name: rule(lrs, losses) for name, rule in SUGGESTION_RULES.items()}


def _as_curve(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lr_arr = np.asarray(lrs, dtype=np.float64)
    loss_arr = np.asarray(losses, dtype=np.float64)
    if lr_arr.ndim != 1 or loss_arr.ndim != 1:
        raise ValueError(f"lrs and losses must be 1-D; got shapes {lr_arr.shape} and {loss_arr.shape}")
    if len(lr_arr) != len(loss_arr):
        raise ValueError(f"lrs and losses must have the same length; got {len(lr_arr)} and {len(loss_arr)}")
    for name, arr in (("lrs", lr_arr), ("losses", loss_arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"{name} must be finite; {name}[{bad[0]}]={arr[bad[0]]!r} "
                "(cut the curve where the sweep diverged before suggesting)"
            )
    if lr_arr.size and lr_arr[0] <= 0:
        raise ValueError(f"lrs must be positive; lrs[0]={lr_arr[0]!r}")
    not_rising = np.flatnonzero(np.diff(lr_arr) <= 0)
    if not_rising.size:
        i = int(not_rising[0])
        raise ValueError(
            f"lrs must be strictly increasing; lrs[{i}]={lr_arr[i]!r} is followed by lrs[{i + 1}]={lr_arr[i + 1]!r}"
        )
    return lr_arr, loss_arr


def _refuse_unusable(lrs: np.ndarray, losses: np.ndarray) -> Suggestion | None:
    n = len(losses)
    if n < MIN_POINTS:
        return _no_suggestion(
            f"only {n} usable points (need at least {MIN_POINTS}): the loss probably diverged almost "
            "at once; lower min_lr or raise num_steps"
        )
    first, lowest = float(losses[0]), float(losses.min())
    if first - lowest < max(MIN_RELATIVE_DROP * abs(first), MIN_ABSOLUTE_DROP):
        return _no_suggestion(
            f"the loss never fell by {MIN_RELATIVE_DROP:.0%} below its first value ({first:.4g}; lowest "
            f"{lowest:.4g}) between lr={lrs[0]:.3g} and lr={lrs[-1]:.3g}; raise max_lr or num_steps, "
            "or check that the model and data can learn (labels, loss, frozen parameters)"
        )
    return None


def _no_suggestion(reason: str) -> Suggestion:
    return Suggestion(lr=None, index=None, reason=reason)


def _descent_lengths(losses: np.ndarray) -> np.ndarray:
    # A strictly decreasing run of losses is a strictly increasing run of their negatives, and
    # tails[k] is the smallest last value of any increasing subsequence of length k + 1 seen so far
    # (kept sorted), so bisect_left gives the longest one that a new value can extend.
    tails: list[float] = []
    lengths = np.empty(len(losses), dtype=np.int64)
    for i, value in enumerate(-losses):
        k = bisect.bisect_left(tails, value)
        if k == len(tails):
            tails.append(value)
        else:
            tails[k] = value
        lengths[i] = k + 1
    return lengths


def _nearest_index(log_lrs: np.ndarray, log_target: float) -> int:
    # argmin keeps the first of two equally near points: on a tie the lower, safer LR wins.
    return int(np.argmin(np.abs(log_lrs - log_target)))
