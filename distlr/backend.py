"""Backends: how one optimizer step of the sweep runs on a given kind of model.

Every backend offers the same small protocol: set the LR, run one step, snapshot, restore.
``TorchBackend`` serves a plain module or a DDP-wrapped one; DeepSpeed engines get their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from distlr.batch import Criterion, check_batch_fits, compute_loss, count_items, count_samples, prepare_batch, unwrap
from distlr.snapshot import DiskStore, HostStore, Snapshot, SnapshotMode, TrainingSnapshot

AmpMode = Literal["no", "bf16", "fp16"]
AMP_MODES: tuple[str, ...] = ("no", "bf16", "fp16")

# Layout of the packed per-step statistics that cross the one all-reduce of a step. There is no
# separate non-finite flag: NaN and inf survive the sum, so the summed loss is non-finite exactly
# when some rank's loss was.
LOSS_SUM, ITEMS, SKIPPED = range(3)
NUM_STATS = 3
_NULL = contextlib.nullcontext()  # stateless and reentrant: one serves every step


class Backend(Protocol):
    """One training step at a chosen LR, plus the state it must put back."""

    def set_lr(self, lr: float) -> None: ...
    def train_step(self, micro_batches: Sequence[Any]) -> torch.Tensor: ...
    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> Snapshot: ...


def group_lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each param group's LR relative to the largest one, so the ramp keeps their ratios.

    The group with the largest LR follows the ladder exactly; a group at half that LR gets half
    the ladder's LR at every step. If every group is at 0, all follow the ladder.
    """
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    top = max(lrs)
    return [lr / top for lr in lrs] if top > 0 else [1.0] * len(lrs)


class TorchBackend:
    """A plain PyTorch (or DDP-wrapped) model with a torch optimizer.

    Args:
        model: the module to train; a DDP wrapper is fine (gradients sync in ``backward``).
        optimizer: the optimizer stepping ``model``'s parameters.
        criterion: ``criterion(output, targets)``, or None when the model returns its loss.
        device: where batches go.
        amp: ``"no"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + GradScaler, CUDA only).
        grad_scaler: the user's GradScaler for fp16 (one is made if None).
        max_grad_norm: clip the global gradient norm to this before each step (None: no clipping).
        causal_lm: the model is a Hugging Face causal LM (labels can be made from input_ids).
        lr_scheduler: the user's LR scheduler, only saved and restored (the sweep sets the LR).
        rank: this process's rank (names its disk snapshot).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        criterion: Criterion | None,
        device: torch.device,
        amp: AmpMode = "no",
        grad_scaler: Any | None = None,
        max_grad_norm: float | None = None,
        causal_lm: bool = False,
        lr_scheduler: Any | None = None,
        rank: int = 0,
    ) -> None:
        self.model, self.optimizer, self.criterion, self.device = model, optimizer, criterion, device
        self.rank = rank
        self.amp, self.max_grad_norm, self.causal_lm = amp, max_grad_norm, causal_lm
        self.lr_scheduler = lr_scheduler
        if amp == "fp16" and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(device.type)
        self.grad_scaler = grad_scaler if amp == "fp16" else None
        self.user_grad_scaler = grad_scaler
        self._ratios = group_lr_ratios(optimizer)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # Reused every step; SKIPPED stays 0 unless a GradScaler writes it.
        self._stats = torch.zeros(NUM_STATS, dtype=torch.float64, device=device)
        self.micro_batch_size: int | None = None
        """Samples in this rank's first micro-batch (for the result's global batch size)."""

    def set_lr(self, lr: float) -> None:
        for group, ratio in zip(self.optimizer.param_groups, self._ratios):
            group["lr"] = lr * ratio

    def train_step(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        """Forward, backward and one optimizer step over ``micro_batches``.

        Returns the packed statistics (see ``LOSS_SUM`` ...) as a tensor on the device: nothing
        here waits for the device, the caller's single all-reduce does.
        """
        if not self.model.training:
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        loss_sum: torch.Tensor | None = None
        items_sum: int | torch.Tensor = 0
        for i, raw in enumerate(micro_batches):
            batch = prepare_batch(raw, self.device, causal_lm=self.causal_lm, has_criterion=self.criterion is not None)
            items = count_items(batch, causal_lm=self.causal_lm)
            if self.micro_batch_size is None:  # the first batch: checked once, not every step
                check_batch_fits(unwrap(self.model), batch, self.criterion)
                self.micro_batch_size = count_samples(batch)
            # DDP would all-reduce gradients after every micro-batch; only the last one needs it.
            defer_sync = i < n - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if defer_sync else _NULL:
                with self._autocast():
                    loss = compute_loss(self.model, batch, self.criterion)
                # The gradient is the mean over micro-batches, as one big batch would give.
                scaled = loss if n == 1 else loss / n
                if self.grad_scaler is not None:
                    scaled = self.grad_scaler.scale(scaled)
                scaled.backward()
            weighted = loss.detach() * items
            loss_sum = weighted if loss_sum is None else loss_sum + weighted
            items_sum = items_sum + items
        stats = self._stats
        stats[LOSS_SUM].copy_(loss_sum)
        stats[ITEMS] = items_sum
        self._optimizer_step(stats)
        return stats

    def _optimizer_step(self, stats: torch.Tensor) -> None:
        scaler = self.grad_scaler
        if scaler is None:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
            self.optimizer.step()
            return
        scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        # GradScaler skips the step and lowers the scale on an overflow: that step is no point
        # on the curve, and the ladder must not advance.
        stats[SKIPPED] = float(scaler.get_scale() < before)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "no":
            return _NULL
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> Snapshot:
        """This rank's state in host memory, or in a DCP directory of its own beside ``directory``."""
        store = HostStore() if mode == "memory" else DiskStore(directory.with_name(f"{directory.name}-rank{self.rank}"))
        return TrainingSnapshot(
            unwrap(self.model), self.optimizer, store, lr_scheduler=self.lr_scheduler,
            grad_scaler=self.user_grad_scaler, sampler=sampler,
        )
