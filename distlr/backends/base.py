"""What every backend offers the range test, and the pieces they share.

A backend runs one optimizer step of the range test on one kind of model (plain or DDP, a DeepSpeed
engine, ...). The facade and the range-test loop talk to it only through ``Backend``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distlr.core.options import RangeTestArgs, SnapshotMode
from distlr.dist.collectives import DistContext
from distlr.train.batch import Criterion, LossFn, count_items, count_samples
from distlr.train.snapshot import Snapshot

# Layout of the packed per-step statistics that cross the one all-reduce of a step. There is no
# separate non-finite flag: NaN and inf survive the sum, so the summed loss is non-finite exactly
# when some rank's loss was.
LOSS_SUM, ITEMS, SKIPPED, SAMPLES = range(4)
NUM_STATS = 4


class Backend(Protocol):
    """One training step at a chosen LR on one kind of model, plus the state it must put back.

    ``make_backend`` builds it once, on the first ``find()``, knowing that range test's arguments;
    every later ``find()`` goes through ``configure`` first.
    """

    accumulation_steps: int
    """Micro-batches per optimizer step (the range test takes this many batches a step)."""
    micro_batch_size: int | None
    """Samples per rank per micro-batch, known after the first step (for the global batch size)."""
    notes: list[str]
    """What the user should be told about how the backend runs the range test."""
    total_steps_hint: int | None
    """The training length the backend's own config names (for the schedule), or None."""

    def configure(self, args: RangeTestArgs) -> None:
        """Take one ``find()``'s arguments; ValueError naming any the backend cannot honour."""

    def set_lr(self, lr: float) -> None:
        """Set the LR of the next step."""

    def train_step(self, micro_batches: Sequence[Any], step: int) -> torch.Tensor:
        """Forward, backward and one optimizer step; the packed statistics (``LOSS_SUM`` ...)
        on the device, not yet read (the range test's one all-reduce does that)."""

    def eval_loss(self, batches: Sequence[Any]) -> torch.Tensor:
        """The packed statistics (``LOSS_SUM``, ``ITEMS``) of a forward pass over ``batches``
        in eval mode without gradients, not yet read; the model is back in training mode after."""

    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> Snapshot:
        """This rank's state before the range test, in host memory or on disk."""

    def contribute(self, optimal_lr: float | None, schedule: dict[str, Any] | None) -> dict[str, Any]:
        """What this backend adds to the result once its numbers are known (rank 0): result
        fields by name, and ``"notes"`` for the user (``distlr.core.analysis.build_result``)."""

    def release(self) -> None:
        """Let go of what the backend made (a DDP wrapper) before the process group ends."""


@dataclass(kw_only=True)
class BackendSpec:
    """What ``LRFinder`` was given, for ``make_backend`` to build a backend from."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    criterion: Criterion | None
    ctx: DistContext
    loss_fn: LossFn | None = None
    lr_scheduler: Any | None = None
    grad_scaler: Any | None = None
    find_unused_parameters: bool = False
    deepspeed_config: dict[str, Any] | None = None
    """The user's DeepSpeed config as read (a copy), or None."""
    micro_batch_hint: int | None = None
    """The loader's batch size, for configs that leave the micro-batch size to the run."""
    kind: Any = None
    """The ``distlr.backends.BackendKind`` ``kind_of`` decided (``finder`` sets it)."""
    accelerator: Any = None
    """The ``accelerate.Accelerator`` every step goes through (``LRFinder.from_accelerator``)."""


def group_lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's LR relative to the largest one, so the ramp keeps their ratios.

    The group with the largest LR follows the ladder exactly; a group at half that LR gets half
    the ladder's LR at every step. If every group is at 0, all follow the ladder.
    """
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    top = max(lrs)
    return [lr / top for lr in lrs] if top > 0 else [1.0] * len(lrs)


class LrRamp:
    """Sets an optimizer's LR along the ladder, keeping its param groups' LR ratios."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.ratios = group_lr_ratios(optimizer)

    def __call__(self, lr: float) -> None:
        for group, ratio in zip(self.optimizer.param_groups, self.ratios):
            group["lr"] = lr * ratio


class StepStats:
    """The packed statistics of one step, accumulated over its micro-batches on the device.

    ``add`` takes each micro-batch's mean loss, its item count (samples, or tokens for a
    language model) and its sample count; the step's loss is the item-weighted mean, and the
    summed samples over all ranks are the step's global batch. Nothing here waits for the
    device.
    """

    def __init__(self, device: torch.device) -> None:
        # Reused every step: no allocation in the hot loop.
        self.tensor = torch.zeros(NUM_STATS, dtype=torch.float64, device=device)
        self._loss: torch.Tensor | None = None
        self._items: int | torch.Tensor = 0
        self._samples = 0

    def add(self, loss: torch.Tensor, items: int | torch.Tensor, samples: int) -> None:
        weighted = loss.detach().float() * items
        self._loss = weighted if self._loss is None else self._loss + weighted
        self._items = self._items + items
        self._samples += samples

    def finish(self, *, skipped: bool = False) -> torch.Tensor:
        """The packed tensor for this step; the accumulator is ready for the next one.

        ``skipped``: the optimizer skipped this step (an fp16 overflow); a backend that learns
        it only later writes ``tensor[SKIPPED]`` itself.
        """
        stats = self.tensor
        stats[LOSS_SUM].copy_(self._loss)
        stats[ITEMS] = self._items
        stats[SKIPPED] = float(skipped)
        stats[SAMPLES] = self._samples
        self._loss, self._items, self._samples = None, 0, 0
        return stats


def eval_pass(model: nn.Module, batches: Sequence[Any], stats: StepStats, *, prepare: Callable[[Any], Any],
              loss_of: Callable[[Any], torch.Tensor], causal_lm: bool,
              autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """The packed statistics of a forward over ``batches`` in eval mode without gradients
    (dropout off, BatchNorm's running statistics read, not updated); ``model`` is in training
    mode again after. ``prepare`` makes a raw batch ready, ``loss_of`` runs the forward."""
    model.eval()
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            for raw in batches:
                batch = prepare(raw)
                stats.add(loss_of(batch), count_items(batch, causal_lm=causal_lm), count_samples(batch))
    finally:
        model.train()
    return stats.finish()
