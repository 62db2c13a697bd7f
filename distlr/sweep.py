"""The sweep: one optimizer step per ladder LR, one global loss, one stop decision per step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from distlr import distributed as D
from distlr.backend import ITEMS, LOSS_SUM, NON_FINITE, SKIPPED, Backend
from distlr.data import BatchStream
from distlr.tracker import LossTracker

# An fp16 run whose every step overflows never records a point; give up after this many in a row.
MAX_SKIPPED_IN_A_ROW = 25


class StepReporter(Protocol):
    """Where rank 0 shows progress (a log line, a progress bar)."""

    def step(self, index: int, lr: float, loss: float, smoothed: float) -> None: ...
    def close(self) -> None: ...


@dataclass
class SweepHistory:
    """What the loop recorded: one point per optimizer step that ran."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = "completed"
    diverged_at: int | None = None
    skipped_steps: int = 0


def run_sweep(
    backend: Backend,
    stream: BatchStream,
    ladder: Sequence[float],
    tracker: LossTracker,
    ctx: D.DistContext,
    *,
    accumulation_steps: int = 1,
    reporter: StepReporter | None = None,
) -> SweepHistory:
    """Run the range test over ``ladder`` and return the recorded curve.

    Every rank calls this with the same ``ladder``. Each step: the backend trains on this rank's
    micro-batches, one all-reduce gives every rank the global mean loss, rank 0 smooths it and
    decides, and one broadcast carries the decision, so every rank leaves on the same step.

    Raises:
        RuntimeError: fp16 overflowed on ``MAX_SKIPPED_IN_A_ROW`` steps in a row (on every rank).
    """
    history = SweepHistory()
    index, skipped_in_a_row = 0, 0
    while index < len(ladder):
        lr = ladder[index]
        backend.set_lr(lr)
        with D.named_failure(ctx, "training step (its gradient all-reduce)", index):
            local = backend.train_step(stream.take(accumulation_steps))
        stats = D.all_reduce_step_stats(ctx, local, index)
        non_finite = stats[NON_FINITE] > 0
        # A step skipped for overflow is retried, but a non-finite loss is divergence even when
        # the optimizer skipped that step (DeepSpeed skips on NaN gradients).
        if stats[SKIPPED] > 0 and not non_finite:
            history.skipped_steps += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise RuntimeError(
                    f"fp16 gradients overflowed on {skipped_in_a_row} steps in a row at lr {lr:.3e}; "
                    "use amp='bf16', a lower min_lr, or a GradScaler with a lower init_scale"
                )
            continue  # same LR again with the next batch: a skipped step is no point on the curve
        skipped_in_a_row = 0
        loss = math.nan if non_finite else stats[LOSS_SUM] / stats[ITEMS]
        code = D.CONTINUE
        if ctx.is_main:
            diverged = tracker.update(loss)
            if non_finite:
                code = D.STOP_NON_FINITE
            elif diverged:
                code = D.STOP_DIVERGED
            if reporter is not None:
                reporter.step(index, lr, loss, tracker.smoothed[-1])
        code = D.broadcast_stop(ctx, code, index)
        history.lrs.append(lr)
        history.losses.append(loss)
        if code != D.CONTINUE:
            history.stop_reason = "non_finite" if code == D.STOP_NON_FINITE else "diverged"
            history.diverged_at = index
            break
        index += 1
    history.smoothed = list(tracker.smoothed) if ctx.is_main else []
    return history
