"""A plain PyTorch model with a torch optimizer, in one process or data-parallel under DDP.

Under a launcher with several ranks the model is wrapped in ``DistributedDataParallel``
(unless it already is data-parallel), so gradients are averaged in ``backward``; the user's
module, not the wrapper, is what the snapshot keeps. How gradients are synchronised is a
``GradientSync``: DDP's here, FSDP2's in ``distlr.backends.fsdp``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distlr.backends.base import SKIPPED, BackendSpec, LrRamp, StepStats, eval_pass
from distlr.core.options import RangeTestArgs, SnapshotMode
from distlr.dist import collectives as D
from distlr.train.batch import check_batch_fits, compute_loss, count_items, count_samples, is_causal_lm, prepare_batch
from distlr.train.snapshot import DiskStore, HostStore, Snapshot, TrainingSnapshot

_NULL = contextlib.nullcontext()  # stateless and reentrant: one serves every step


class GradientSync(Protocol):
    """How a model averages its gradients over the ranks, as the micro-batch loop needs it."""

    what: str
    """The backward pass as a failure names it (it carries the model's collectives)."""
    precision: str | None
    """"bf16"/"fp16" when the model itself computes in that precision (FSDP2's mixed-precision
    policy), else None (``amp`` is then autocast)."""

    def defer(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch: synchronise only in the last one."""

    def settle(self) -> None:
        """Bring the model into its resting layout before its state is read or put back."""


class StepOps(Protocol):
    """How one step's precision, backward and optimizer step are done: plain torch
    (``TorchOps``) or through a training loop's runner (``distlr.backends.accelerate``)."""

    accumulation: int | None
    """Micro-batches per step the runner fixes (an Accelerator's own accumulation), or None."""
    precision: str | None
    """The precision the runner fixes ("no", "bf16", "fp16"; an ``amp`` that differs is refused),
    or None when ``amp`` decides."""
    scaler: Any | None
    """The loss scaler the snapshot saves and restores, if any."""

    def configure(self, amp: str, device: torch.device) -> None:
        """Take ``find()``'s ``amp`` (checked against ``precision`` by the backend)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's mixed-precision context."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch's share of the step's loss."""

    def zero_grad(self) -> None:
        """Clear the gradients before a step's first micro-batch."""

    def step(self, params: list[torch.Tensor], max_grad_norm: float | None) -> bool:
        """Clip and step the optimizer; True when the step was skipped (an fp16 overflow)."""


class TorchOps:
    """Plain torch: ``torch.autocast`` for bf16/fp16, a ``GradScaler`` for fp16 (the user's if given)."""

    precision = None
    accumulation = None

    def __init__(self, optimizer: torch.optim.Optimizer, user_scaler: Any | None) -> None:
        self.optimizer, self.scaler = optimizer, user_scaler
        self._active_scaler: Any | None = None
        self._amp, self._device_type = "no", "cpu"

    def configure(self, amp: str, device: torch.device) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise ValueError(f"amp='fp16' needs a CUDA device (it uses a GradScaler); device is {device}. "
                             "Use amp='bf16' or amp='no' on the CPU")
        self._amp, self._device_type = amp, device.type
        self._active_scaler = (self.scaler or torch.amp.GradScaler(device.type)) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self._amp == "no":
            return _NULL
        return torch.autocast(self._device_type, dtype=torch.bfloat16 if self._amp == "bf16" else torch.float16)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self._active_scaler is None else self._active_scaler.scale(loss)).backward()

    def step(self, params: list[torch.Tensor], max_grad_norm: float | None) -> bool:
        scaler = self._active_scaler
        if scaler is None:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            self.optimizer.step()
            return False
        scaler.unscale_(self.optimizer)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        # GradScaler skips the step and lowers the scale on an overflow: that step is no point
        # on the curve, and the ladder must not advance.
        return scaler.get_scale() < before


class DDPSync:
    """DDP (or FSDP1): ``no_sync()`` for every micro-batch but the last."""

    what = "backward pass (with DDP's gradient all-reduce)"
    precision = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def defer(self, last: bool) -> contextlib.AbstractContextManager:
        return _NULL if last or not hasattr(self.model, "no_sync") else self.model.no_sync()

    def settle(self) -> None:
        return None


class TorchBackend:
    """One range-test step on a plain or DDP-wrapped model.

    Args:
        spec: what ``LRFinder`` was given; a missing optimizer becomes AdamW over the
            trainable parameters.
    """

    total_steps_hint: int | None = None

    def __init__(self, spec: BackendSpec, *, sync: GradientSync | None = None, ops: StepOps | None = None,
                 keep: list[tuple[Any, str]] | None = None) -> None:
        self.ctx, self.criterion, self.loss_fn = spec.ctx, spec.criterion, spec.loss_fn
        self.device = spec.ctx.device
        self.module = spec.model
        self.optimizer = spec.optimizer or torch.optim.AdamW([p for p in spec.model.parameters() if p.requires_grad])
        self.lr_scheduler = spec.lr_scheduler
        # Under DDP every rank trains through the wrapper, which also makes rank 0's weights
        # everyone's (as DDP always does).
        self.model = wrap_for_data_parallel(spec.model, spec.ctx, spec.find_unused_parameters)
        self._data_parallel = spec.ctx.distributed and is_data_parallel(self.model)
        self._sync = sync or DDPSync(self.model)
        self._ops = ops or TorchOps(self.optimizer, spec.grad_scaler)
        self._keep = keep or []
        self.causal_lm = is_causal_lm(spec.model)
        self._ramp = LrRamp(self.optimizer)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._stats = StepStats(self.device)
        self._val_stats = StepStats(self.device)
        self.notes: list[str] = []
        self.micro_batch_size: int | None = None
        self.accumulation_steps = 1
        self.max_grad_norm: float | None = None

    def configure(self, args: RangeTestArgs) -> None:
        for precision, who in ((self._sync.precision, "the model computes in {} by itself (its FSDP "
                                "MixedPrecisionPolicy)"), (self._ops.precision, "the Accelerator's mixed_precision "
                                                           "is '{}'")):
            if precision is not None and args.amp not in ("no", precision):
                allowed = "amp='no'" if precision == "no" else f"amp='no' or amp={precision!r}"
                raise ValueError(f"amp={args.amp!r} but {who.format(precision)}; pass {allowed}")
        accumulation = self._ops.accumulation
        if accumulation is not None and args.accumulation_steps not in (1, accumulation):
            raise ValueError(f"accumulation_steps={args.accumulation_steps} but the Accelerator's "
                             f"gradient_accumulation_steps is {accumulation}: the range test runs on the batch "
                             f"training uses; leave accumulation_steps out (or pass {accumulation}), or build the "
                             f"Accelerator with gradient_accumulation_steps={args.accumulation_steps}")
        self.micro_batch_size = None  # measured again: a series may change the loader between finds
        fixed = self._sync.precision or self._ops.precision
        self._ops.configure("no" if fixed else args.amp, self.device)  # a fixed precision casts by itself
        self.max_grad_norm = args.max_grad_norm
        self.accumulation_steps = accumulation or args.accumulation_steps

    def set_lr(self, lr: float) -> None:
        self._ramp(lr)

    def train_step(self, micro_batches: Sequence[Any], step: int) -> torch.Tensor:
        """Forward, backward and one optimizer step over ``micro_batches``."""
        if not self.model.training:
            self.model.train()
        self._ops.zero_grad()
        n = len(micro_batches)
        for i, raw in enumerate(micro_batches):
            batch = self._prepare(raw)
            items = count_items(batch, causal_lm=self.causal_lm)
            if self.micro_batch_size is None:  # the first batch: checked once, not every step
                if self.loss_fn is None:  # a loss_fn calls the model its own way
                    check_batch_fits(self.module, batch, self.criterion)
                self.micro_batch_size = count_samples(batch)
            # DDP or FSDP would reduce gradients after every micro-batch; only the last one needs it.
            with self._sync.defer(last=i == n - 1):
                with self._ops.autocast():
                    loss = compute_loss(self.model, batch, self.criterion, self.loss_fn)
                # The gradient is the mean over micro-batches, as one big batch would give.
                with self._backward_sync(step):
                    self._ops.backward(loss if n == 1 else loss / n)
            self._stats.add(loss, items, count_samples(batch))
        stats = self._stats.finish()
        stats[SKIPPED] = float(self._ops.step(self._params, self.max_grad_norm))
        return stats

    def eval_loss(self, batches: Sequence[Any]) -> torch.Tensor:
        return eval_pass(self.model, batches, self._val_stats, prepare=self._prepare, causal_lm=self.causal_lm,
                         loss_of=lambda batch: compute_loss(self.model, batch, self.criterion, self.loss_fn),
                         autocast=self._ops.autocast())

    def _prepare(self, raw: Any) -> Any:
        return prepare_batch(raw, self.device, causal_lm=self.causal_lm, has_criterion=self.criterion is not None)

    def _backward_sync(self, step: int) -> contextlib.AbstractContextManager:
        # A data-parallel model all-reduces its gradients in backward: a failure there is a
        # failed communication. The forward stays outside, so the model's own errors keep theirs.
        if not self._data_parallel:
            return _NULL
        return D.communication(self.ctx, self._sync.what, step)

    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> Snapshot:
        """This rank's state in host memory, or in a DCP directory of its own beside ``directory``."""
        store = HostStore() if mode == "memory" else DiskStore(directory.with_name(f"{directory.name}-rank{self.ctx.rank}"))
        return TrainingSnapshot(self.module, self.optimizer, store, lr_scheduler=self.lr_scheduler,
                                grad_scaler=self._ops.scaler, sampler=sampler, settle=self._sync.settle,
                                keep=self._keep)

    def contribute(self, optimal_lr: float | None, schedule: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def release(self) -> None:
        if self.model is not self.module:
            # Free the DDP wrapper before its process group: a group freed from inside the
            # wrapper's deallocation joins its worker threads while holding the GIL and deadlocks.
            self.model = self.module
            if isinstance(self._sync, DDPSync):
                self._sync.model = self.module  # the snapshot keeps the sync's settle
            gc.collect()


def wrap_for_data_parallel(model: nn.Module, ctx: D.DistContext, find_unused_parameters: bool) -> nn.Module:
    """``model`` in DDP when the job has several ranks; a DDP or FSDP model is used as it is."""
    if not ctx.distributed or is_data_parallel(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def is_data_parallel(model: nn.Module) -> bool:
    """A DDP or FSDP (1 or 2) model: it averages its own gradients over the ranks."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    kinds: tuple[type, ...] = (DistributedDataParallel, FullyShardedDataParallel)
    try:  # FSDP2's module class is public from torch 2.6 on
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        pass
    else:
        kinds += (FSDPModule,)
    return isinstance(model, kinds)
