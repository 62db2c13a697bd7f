"""One range test: one optimizer step per ladder LR, one global loss, one stop decision per step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from distlr.backends.base import ITEMS, LOSS_SUM, SAMPLES, SKIPPED, Backend
from distlr.core.history import History
from distlr.core.ladder import Ladder
from distlr.core.smoothing import LossTracker, StopReason
from distlr.dist import collectives as D
from distlr.train.data import BatchStream

MAX_SKIPPED_IN_A_ROW = 25
"""An fp16 run whose every step overflows never records a point; give up after this many in a row."""


class Fp16OverflowError(D.DistlrError):
    """fp16 gradients overflowed on ``MAX_SKIPPED_IN_A_ROW`` steps in a row."""


class StepReporter(Protocol):
    """Where rank 0 shows progress (a log line, a progress bar)."""

    def step(self, index: int, lr: float, loss: float, smoothed: float) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Validation:
    """A fixed set of validation batches, measured every ``every`` recorded steps."""

    batches: Sequence[Any]
    every: int


def run_range_test(
    backend: Backend,
    stream: BatchStream,
    ladder: Ladder,
    tracker: LossTracker,
    ctx: D.DistContext,
    *,
    reporter: StepReporter | None = None,
    extend: Callable[[list[float], list[float]], bool] | None = None,
    validation: Validation | None = None,
) -> History:
    """Run the range test over ``ladder`` and return the recorded curve.

    Every rank calls this with the same ``ladder``. Each step: the backend trains on this rank's
    micro-batches and one all-reduce sums the packed statistics, which every rank then holds,
    bit for bit the same. Every rank reads them (the step's one device-to-host transfer) and
    runs the same deterministic smoothing and stop rule on the same numbers, so every rank
    leaves on the same step with no further collective.

    Args:
        extend: past ``max_lr``, ``extend(lrs, losses)`` is asked before each further step
            whether the range goes on (at most ``ladder.extension_cap`` steps). It is pure and
            every rank asks it the same numbers, so every rank decides alike. None: stop at max_lr.
        validation: measure the mean validation loss of these batches (over all ranks) after
            every ``validation.every``-th step; one more all-reduce on those steps.

    Raises:
        Fp16OverflowError: fp16 overflowed on ``MAX_SKIPPED_IN_A_ROW`` steps in a row (on every rank).
    """
    history = History()
    skipped_in_a_row = 0
    index = 0
    end = ladder.num_steps
    while index < end or (extend is not None and index < ladder.num_steps + ladder.extension_cap
                          and extend(history.lrs, history.losses)):
        lr = ladder.lr(index)
        backend.set_lr(lr)
        stats = backend.train_step(stream.take(backend.accumulation_steps), index)
        D.all_reduce_step_stats(ctx, stats, index)
        values = stats.tolist()
        non_finite = not math.isfinite(values[LOSS_SUM])  # NaN/inf on any rank survives the sum
        # A step skipped for overflow is retried at the same LR with the next batch: it is no
        # point on the curve. A non-finite loss is divergence even when the optimizer skipped
        # that step (DeepSpeed skips on NaN gradients).
        if values[SKIPPED] > 0 and not non_finite:
            history.skipped_steps += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise Fp16OverflowError(
                    f"fp16 gradients overflowed on {MAX_SKIPPED_IN_A_ROW} steps in a row at lr {lr:.3e}; "
                    "use amp='bf16', a lower min_lr, or a GradScaler with a lower init_scale"
                )
            continue
        skipped_in_a_row = 0
        loss = math.nan if non_finite else values[LOSS_SUM] / values[ITEMS]
        diverged = tracker.update(loss)
        history.lrs.append(lr)
        history.losses.append(loss)
        history.samples.append(int(values[SAMPLES]))
        if reporter is not None:
            reporter.step(index, lr, loss, tracker.smoothed[-1])
        if non_finite or diverged:
            history.stop_reason = (StopReason.NON_FINITE if non_finite else StopReason.DIVERGED).value
            history.diverged_at = index
            break
        if validation is not None and (index + 1) % validation.every == 0:
            history.val_steps.append(index)
            history.val_losses.append(_validation_loss(backend, validation, ctx, index))
        index += 1
    history.extended_steps = max(0, len(history.lrs) - ladder.num_steps)
    history.smoothed = list(tracker.smoothed)
    return history


def _validation_loss(backend: Backend, validation: Validation, ctx: D.DistContext, index: int) -> float:
    stats = backend.eval_loss(validation.batches)
    D.all_reduce_step_stats(ctx, stats, index)
    values = stats.tolist()
    return values[LOSS_SUM] / values[ITEMS] if values[ITEMS] else math.nan
