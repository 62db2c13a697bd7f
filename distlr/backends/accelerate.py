"""A model, optimizer and loader prepared by ``accelerate.Accelerator``: each step goes through
the accelerator, as the user's own training loop does.

``accelerator.backward`` (which scales an fp16 loss and divides by the accelerator's own
accumulation), ``accelerator.autocast()``, ``accelerator.clip_grad_norm_`` and the prepared
optimizer's ``step`` (which steps the scaler and may skip the step on an overflow). The
micro-batch loop is ``distlr.backends.ddp.TorchBackend``'s; accumulation uses
``accelerator.no_sync``. The snapshot adds the accelerator's scaler and step count. A prepared
DeepSpeed engine is not handled here: ``LRFinder.from_accelerator`` gives it to the DeepSpeed
backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from distlr.backends import fsdp
from distlr.backends.base import BackendSpec
from distlr.backends.ddp import TorchBackend
from distlr.train.data import keep_generators

_NULL = contextlib.nullcontext()


class AccelerateSync:
    """The accelerator's ``no_sync(model)`` for every micro-batch but the last."""

    what = "backward pass (with the accelerator's gradient all-reduce)"
    precision = None

    def __init__(self, accelerator: Any, model: torch.nn.Module) -> None:
        self.accelerator, self.model = accelerator, model

    def defer(self, last: bool) -> contextlib.AbstractContextManager:
        return _NULL if last else self.accelerator.no_sync(self.model)

    def settle(self) -> None:
        return None


class AccelerateOps:
    """Precision, backward and optimizer step through the accelerator."""

    def __init__(self, accelerator: Any, optimizer: Any) -> None:
        self.accelerator, self.optimizer = accelerator, optimizer
        # The accelerator's mixed_precision decides, "no" included: find()'s amp must agree.
        self.precision = str(getattr(accelerator, "mixed_precision", "no"))
        self.scaler = getattr(accelerator, "scaler", None)
        # The accelerator's accumulation is the training run's global batch: the range test's
        # default, and a find(accumulation_steps=...) that differs is refused (as DeepSpeed's).
        steps = int(getattr(accelerator, "gradient_accumulation_steps", 1))
        self.accumulation = steps if steps > 1 else None

    def configure(self, amp: str, device: torch.device) -> None:
        return None  # the accelerator's mixed_precision decides (the backend checked amp against it)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def zero_grad(self) -> None:
        # The prepared optimizer's zero_grad does nothing while the accelerator's own
        # accumulation says gradients are not synced: clear the wrapped optimizer's directly.
        getattr(self.optimizer, "optimizer", self.optimizer).zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        # The accelerator divides by its own gradient_accumulation_steps; distlr already took
        # the mean over the step's micro-batches.
        self.accelerator.backward(loss * self.accelerator.gradient_accumulation_steps)

    def step(self, params: list[torch.Tensor], max_grad_norm: float | None) -> bool:
        # The prepared optimizer steps only when the accelerator says gradients are synced,
        # which its own accumulation may have left False; every distlr step is a whole step.
        state = self.accelerator.gradient_state
        synced = state.sync_gradients
        state.sync_gradients = True
        try:
            if max_grad_norm is not None:
                self.accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales an fp16 gradient first
            self.optimizer.step()
        finally:
            state.sync_gradients = synced
        return bool(self.accelerator.optimizer_step_was_skipped)


def keep_prepared_loader(loader: Any) -> Callable[[], None]:
    """What reading a loader ``accelerator.prepare`` returned changes: the generators of it and
    of the loader it wraps (``base_dataloader``, its ``synchronized_generator``), its
    ``iteration`` count (the epoch its sampler is seeded with), its end-of-epoch bookkeeping,
    and the list of loaders the accelerator's gradient state believes are being iterated (a
    loader joins it when an iteration begins and leaves, with every other entry for itself,
    only when an epoch runs to its end). Returns what puts them back."""
    generators = keep_generators(loader, ("sampler", "batch_sampler", "generator", "base_dataloader",
                                          "synchronized_generator"))
    attrs = {name: getattr(loader, name) for name in ("iteration", "end_of_dataloader", "remainder")
             if isinstance(getattr(loader, name, None), (bool, int))}
    state = getattr(loader, "gradient_state", None)
    references = None if state is None else list(state.dataloader_references)

    def restore() -> None:
        generators()
        if references is not None:
            state.dataloader_references = references
        for name, value in attrs.items():
            setattr(loader, name, value)
    return restore


def make(spec: BackendSpec) -> TorchBackend:
    """The backend for what an accelerator prepared (``spec.accelerator``). An FSDP2
    model keeps FSDP2's own gradient sync and resharding (``distlr.backends.fsdp``)."""
    accelerator = spec.accelerator
    sync = fsdp.FSDP2Sync(spec.model) if fsdp.is_fsdp2(spec.model) else AccelerateSync(accelerator, spec.model)
    return TorchBackend(spec, sync=sync, ops=AccelerateOps(accelerator, spec.optimizer), keep=[(accelerator, "step")])
