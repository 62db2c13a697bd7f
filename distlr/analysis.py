"""From the recorded curve to an ``LRFinderResult``: cut at divergence, suggest, recommend.

Pure: no torch.distributed, no I/O. Rank 0 calls it and broadcasts what it returns.
"""

from __future__ import annotations

import math

from distlr.result import LRFinderResult
from distlr.schedule import recommend_schedule
from distlr.suggest import suggest_all
from distlr.sweep import SweepHistory


def usable_points(history: SweepHistory) -> tuple[list[float], list[float]]:
    """The ``(lrs, smoothed losses)`` the suggestion rules may look at.

    The diverging point itself is left out (it is the explosion, not the curve), and so is
    anything non-finite.
    """
    end = history.diverged_at if history.diverged_at is not None else len(history.smoothed)
    pairs = [(lr, s) for lr, s in zip(history.lrs[:end], history.smoothed[:end]) if math.isfinite(s)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def build_result(
    history: SweepHistory,
    *,
    min_lr: float,
    max_lr: float,
    num_steps: int,
    suggestion_method: str,
    step_mode: str,
    world_size: int,
    micro_batch_size: int | None,
    accumulation_steps: int,
    elapsed_s: float,
    total_steps: int | None = None,
    notes: list[str] | None = None,
) -> LRFinderResult:
    """Assemble the result of a sweep: every rule's suggestion, the chosen one, a schedule."""
    lrs, smoothed = usable_points(history)
    suggestions = suggest_all(lrs, smoothed)
    chosen = suggestions[suggestion_method]
    notes = list(notes or [])
    if history.skipped_steps:
        notes.append(f"{history.skipped_steps} fp16 step(s) overflowed and were retried at the same LR")
    best_idx = None
    if chosen.lr is not None:
        # Map the index in the usable points back onto the recorded curve.
        best_idx = history.lrs.index(lrs[chosen.index])
    global_batch = None if micro_batch_size is None else micro_batch_size * world_size * accumulation_steps
    return LRFinderResult(
        optimal_lr=chosen.lr,
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        lrs=list(history.lrs),
        losses=list(history.losses),
        smoothed_losses=list(history.smoothed),
        best_lr_idx=best_idx,
        suggestion_method=suggestion_method,
        stop_reason=history.stop_reason,
        diverged_at=history.diverged_at,
        suggestion_note=chosen.reason,
        suggestions={name: s.lr for name, s in suggestions.items()},
        schedule=None if chosen.lr is None else recommend_schedule(chosen.lr, total_steps=total_steps),
        step_mode=step_mode,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        global_batch_size=global_batch,
        elapsed_s=elapsed_s,
        notes=notes,
    )
