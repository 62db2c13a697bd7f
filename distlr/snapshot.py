"""Snapshot and restore: put the model, optimizer and RNG back exactly as they were.

``MemorySnapshot`` keeps a copy of this rank's state in host memory, never on the device, so a
snapshot costs no accelerator memory. Restore is bit-exact: tensors are copied back in place
(the optimizer keeps pointing at the same parameters) and every RNG stream is reset.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class Snapshot(Protocol):
    """What a backend's snapshot offers: take once, restore any number of times, discard."""

    def take(self) -> None: ...
    def restore(self) -> None: ...
    def discard(self) -> None: ...


@dataclass
class RNGState:
    """The state of every random stream a training step can draw from."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RNGState:
        # Reading CUDA RNG state would initialise CUDA in a CPU-only job; only do it if CUDA is live.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)


def to_host(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to host memory (CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class ModuleState:
    """Parameters, buffers, gradients and train/eval flags of a module, on the host."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    training: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module) -> ModuleState:
        state = cls()
        for name, tensor in _named_tensors(model):
            state.tensors[name] = to_host(tensor)
        for name, param in model.named_parameters():
            state.grads[name] = None if param.grad is None else to_host(param.grad)
        state.training = {name: m.training for name, m in model.named_modules()}
        return state

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, tensor in _named_tensors(model):
                tensor.copy_(self.tensors[name])
            for name, param in model.named_parameters():
                saved = self.grads[name]
                if saved is None:
                    param.grad = None
                elif param.grad is None:
                    param.grad = saved.to(param.device, copy=True)
                else:
                    param.grad.copy_(saved)
        for name, module in model.named_modules():
            module.training = self.training[name]


def _named_tensors(model: nn.Module):
    # Parameters and every buffer (also non-persistent ones, which state_dict() leaves out).
    yield from model.named_parameters()
    yield from model.named_buffers()


class MemorySnapshot:
    """This rank's training state, copied to host memory.

    Args:
        model: the module whose parameters and buffers are saved (the user's module, unwrapped).
        optimizer: its optimizer; state and param-group settings (LR, betas, ...) are saved.
        lr_scheduler: optional LR scheduler to save and restore.
        grad_scaler: optional AMP ``GradScaler``.
        sampler: optional sampler whose ``epoch`` the sweep advances when it cycles the loader.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        lr_scheduler: Any | None = None,
        grad_scaler: Any | None = None,
        sampler: Any | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.lr_scheduler, self.grad_scaler, self.sampler = lr_scheduler, grad_scaler, sampler
        self._saved: dict[str, Any] | None = None

    def take(self) -> None:
        self._saved = {
            "model": ModuleState.capture(self.model),
            "optimizer": to_host(self.optimizer.state_dict()),
            "lr_scheduler": None if self.lr_scheduler is None else to_host(self.lr_scheduler.state_dict()),
            "grad_scaler": None if self.grad_scaler is None else to_host(self.grad_scaler.state_dict()),
            "sampler_epoch": getattr(self.sampler, "epoch", None),
            "rng": RNGState.capture(),
        }

    def restore(self) -> None:
        saved = self._saved
        assert saved is not None, "restore() before take()"
        saved["model"].restore(self.model)
        # load_state_dict may keep the tensors it is given, so hand it a copy: the snapshot has
        # to survive for the next reset().
        self.optimizer.load_state_dict(to_host(saved["optimizer"]))
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(copy.deepcopy(saved["lr_scheduler"]))
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(copy.deepcopy(saved["grad_scaler"]))
        if saved["sampler_epoch"] is not None:
            self.sampler.epoch = saved["sampler_epoch"]
        saved["rng"].restore()

    def discard(self) -> None:
        self._saved = None

    @property
    def taken(self) -> bool:
        return self._saved is not None
