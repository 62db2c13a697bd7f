"""The sweep: one optimizer step per ladder LR, one global loss, one stop decision per step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from distlr import distributed as D
from distlr.backend import ITEMS, LOSS_SUM, SKIPPED, Backend
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
    skipped_in_a_row: int = 0


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
    micro-batches, one all-reduce sums the packed statistics, rank 0 reads them, smooths the loss
    and decides, and one broadcast carries the decision, so every rank leaves on the same step.
    Each rank moves one thing from the device to the host per step: rank 0 the statistics, the
    others the stop code. The curve is recorded on rank 0 (the result is broadcast from there).

    Raises:
        RuntimeError: fp16 overflowed on ``MAX_SKIPPED_IN_A_ROW`` steps in a row (on every rank).
    """
    history = SweepHistory()
    index = 0
    while index < len(ladder):
        lr = ladder[index]
        backend.set_lr(lr)
        with D.named_failure(ctx, "training step (its gradient all-reduce)", index):
            local = backend.train_step(stream.take(accumulation_steps))
        D.all_reduce_step_stats(ctx, local, index)
        code = _decide(local, lr, index, tracker, history, reporter) if ctx.is_main else D.CONTINUE
        code = D.broadcast_stop(ctx, code, index)
        if code == D.RETRY:
            continue  # same LR again with the next batch: a skipped step is no point on the curve
        if code == D.STOP_OVERFLOW:
            raise RuntimeError(
                f"fp16 gradients overflowed on {MAX_SKIPPED_IN_A_ROW} steps in a row at lr {lr:.3e}; "
                "use amp='bf16', a lower min_lr, or a GradScaler with a lower init_scale"
            )
        if code != D.CONTINUE:
            history.stop_reason = "non_finite" if code == D.STOP_NON_FINITE else "diverged"
            history.diverged_at = index
            break
        index += 1
    history.smoothed = list(tracker.smoothed) if ctx.is_main else []
    return history


def _decide(stats_tensor, lr: float, index: int, tracker: LossTracker, history: SweepHistory,
            reporter: StepReporter | None) -> int:
    """Rank 0: read the reduced step statistics (the step's one device-to-host transfer),
    record the point and choose the stop code every rank will follow."""
    stats = stats_tensor.tolist()
    non_finite = not math.isfinite(stats[LOSS_SUM])  # NaN/inf on any rank survives the sum
    # A step skipped for overflow is retried, but a non-finite loss is divergence even when the
    # optimizer skipped that step (DeepSpeed skips on NaN gradients).
    if stats[SKIPPED] > 0 and not non_finite:
        history.skipped_steps += 1
        history.skipped_in_a_row += 1
        return D.STOP_OVERFLOW if history.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW else D.RETRY
    history.skipped_in_a_row = 0
    loss = math.nan if non_finite else stats[LOSS_SUM] / stats[ITEMS]
    diverged = tracker.update(loss)
    history.lrs.append(lr)
    history.losses.append(loss)
    if reporter is not None:
        reporter.step(index, lr, loss, tracker.smoothed[-1])
    if non_finite:
        return D.STOP_NON_FINITE
    return D.STOP_DIVERGED if diverged else D.CONTINUE
