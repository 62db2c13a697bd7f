"""Snapshot and restore: put the model, optimizer and RNG back exactly as they were.

A snapshot splits this rank's training state into its tensors (parameters, buffers, gradients,
optimizer state) and everything else (param-group settings, scheduler, scaler, sampler epoch,
RNG states, train/eval flags). The small part stays in host memory; the tensors go to a store:

- ``HostStore``: copies in host memory, never on the accelerator;
- ``DiskStore``: a torch.distributed.checkpoint directory of this rank's own.

Each rank saves and loads only its own state, with no collective, so a restore on an exception
path can never wait on a rank that failed. Restore is bit-exact: tensors are copied back in
place (the optimizer keeps pointing at the same parameters) and every RNG stream is reset.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class TensorSpec:
    """Stands in the state tree for a tensor that lives in the store."""

    key: str


def split_tensors(tree: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``tree`` by a ``TensorSpec``; collect the tensors in ``out``."""
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree.detach()
        return TensorSpec(prefix)
    if isinstance(tree, dict):
        return {k: split_tensors(v, f"{prefix}/{k}", out) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(tree))
    return copy.deepcopy(tree)


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``split_tensors``."""
    if isinstance(tree, TensorSpec):
        return tensors[tree.key]
    if isinstance(tree, dict):
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(join_tensors(v, tensors) for v in tree)
    return copy.deepcopy(tree)


class TensorStore(Protocol):
    """Where a snapshot's tensors live between take and restore."""

    def put(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def load_into(self, targets: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]: ...
    def clear(self) -> None: ...


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (t.shape, t.dtype) for k, t in tensors.items()}


class HostStore:
    """Copies in host memory (pinned when the tensors live on a GPU, for faster copies)."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = {k: _host_copy(t) for k, t in tensors.items()}

    def load_into(self, targets: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Copy each saved tensor into its target in place; a key without one gets a new copy
        (never the stored tensor itself: the snapshot must survive for the next restore)."""
        out = {}
        for key, target in targets.items():
            saved = self._tensors[key]
            if target is None:
                out[key] = saved.clone()
            else:
                target.copy_(saved, non_blocking=True)
                out[key] = target
        return out

    def clear(self) -> None:
        self._tensors = {}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    return t.to("cpu", copy=True)


def check_snapshot_dir(directory: Path) -> None:
    """Refuse a ``snapshot_dir`` that cannot be made or written, before anything runs.

    Raises:
        OSError: naming ``snapshot_dir``, why, and the way around it.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"snapshot_dir={str(directory)!r} cannot be created ({err.strerror or err}); choose a writable "
                      "snapshot_dir or use snapshot='memory'") from None
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"snapshot_dir={str(directory)!r} is not writable; choose a writable snapshot_dir or "
                              "use snapshot='memory'")


def check_free_space(directory: Path, need: int) -> None:
    """Refuse a disk snapshot of ``need`` bytes before writing any of it if it would not fit.

    Raises:
        OSError: not enough free space in ``directory`` (made if missing), saying where and how much.
    """
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    # Metadata and alignment cost a little on top of the raw bytes; keep a margin.
    if need * 1.1 + (64 << 20) > free:
        raise OSError(
            f"snapshot='disk' needs about {need / 2**30:.2f} GiB in {str(directory)!r} but only "
            f"{free / 2**30:.2f} GiB is free; set snapshot_dir to a larger disk or use snapshot='memory'"
        )


class DiskStore:
    """This rank's tensors in a torch.distributed.checkpoint directory of its own.

    Save and load run with ``no_dist=True``: no collective, so a rank can restore on its own
    (an exception on one rank must not wait for the others). Loading goes straight into the
    live tensors, so a restore needs no second copy in memory. The directory is removed by
    ``clear``.

    Raises (from ``put``):
        OSError: not enough free space for the snapshot (checked before anything is written).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._specs: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        check_free_space(self.directory.parent, sum(t.numel() * t.element_size() for t in tensors.values()))
        self._specs = _specs(tensors)
        with _single_rank_checkpoint():
            dcp.save(dict(tensors), checkpoint_id=str(self.directory), no_dist=True)

    def load_into(self, targets: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        out = {k: t if t is not None else torch.empty(self._specs[k][0], dtype=self._specs[k][1])
               for k, t in targets.items()}
        with _single_rank_checkpoint():
            dcp.load(out, checkpoint_id=str(self.directory), no_dist=True)
        return out

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def _single_rank_checkpoint() -> Iterator[None]:
    # Saving each rank on its own is the point here, not a mistake to warn about.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _is_dtensor(t: torch.Tensor) -> bool:
    # Looked at by type name first: importing torch.distributed.tensor costs a second.
    if type(t).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _named_tensors(model: nn.Module):
    # Parameters and every buffer (also non-persistent ones, which state_dict() leaves out).
    yield from model.named_parameters()
    yield from model.named_buffers()


class TrainingSnapshot:
    """This rank's training state: tensors in a ``TensorStore``, the rest in host memory.

    Args:
        model: the module whose parameters, buffers and gradients are saved (unwrapped).
        optimizer: its optimizer; state and param-group settings (LR, betas, ...) are saved.
        store: where the tensors go (``HostStore()`` or ``DiskStore(dir)``).
        lr_scheduler: optional LR scheduler to save and restore.
        grad_scaler: optional AMP ``GradScaler``.
        sampler: optional sampler whose ``epoch`` the range test advances when it cycles the loader.
        settle: called before the state is read or written back, to bring the model into its
            resting layout (FSDP2: resharded, also after an error stopped a forward midway).
        keep: ``(object, attribute)`` pairs whose values are saved and put back too (a
            training loop runner's step count).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        store: TensorStore,
        *,
        lr_scheduler: Any | None = None,
        grad_scaler: Any | None = None,
        sampler: Any | None = None,
        settle: Callable[[], None] | None = None,
        keep: list[tuple[Any, str]] | None = None,
    ) -> None:
        self.model, self.optimizer, self.store = model, optimizer, store
        self.lr_scheduler, self.grad_scaler, self.sampler = lr_scheduler, grad_scaler, sampler
        self._settle = settle or (lambda: None)
        self._keep = keep or []
        self._saved: dict[str, Any] | None = None

    def _live(self) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
        """This rank's tensors now, by key (a DTensor's by its local shard, the part this rank
        holds), the optimizer state with tensors as TensorSpecs, and the DTensors by key."""
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in _named_tensors(self.model):
            tensors[f"model/{name}"] = tensor.detach()
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                tensors[f"grad/{name}"] = param.grad.detach()
        optimizer_tree = split_tensors(self.optimizer.state_dict(), "optimizer", tensors)
        dtensors = {key: t for key, t in tensors.items() if _is_dtensor(t)}
        # FSDP2 and other DTensor state: only the local shard is stored and put back, in place
        # (to_local() is a view of it), so no rank ever copies the whole tensor.
        tensors.update({key: t.to_local() for key, t in dtensors.items()})
        return tensors, optimizer_tree, dtensors

    def take(self) -> None:
        self._settle()
        tensors, optimizer_tree, dtensors = self._live()
        self.store.put(tensors)
        self._saved = {
            "specs": _specs(tensors),
            "dtensors": {key: (t.device_mesh, t.placements, t.shape, t.stride()) for key, t in dtensors.items()},
            "grads": {name: p.grad is not None for name, p in self.model.named_parameters()},
            "optimizer": optimizer_tree,
            "training": {name: m.training for name, m in self.model.named_modules()},
            "lr_scheduler": None if self.lr_scheduler is None else copy.deepcopy(self.lr_scheduler.state_dict()),
            "grad_scaler": None if self.grad_scaler is None else copy.deepcopy(self.grad_scaler.state_dict()),
            "sampler_epoch": getattr(self.sampler, "epoch", None),
            "kept": [copy.deepcopy(getattr(owner, name)) for owner, name in self._keep],
            "rng": RNGState.capture(),
        }

    def restore(self) -> None:
        saved = self._saved
        assert saved is not None, "restore() before take()"
        self._settle()
        live, _, live_dtensors = self._live()
        # Load straight into every live tensor that still has the saved shape and dtype (the
        # usual case after a range test); only what is missing now (a gradient that was freed,
        # optimizer state that was dropped) gets a new tensor.
        targets = {}
        for key, (shape, dtype) in saved["specs"].items():
            tensor = live.get(key)
            targets[key] = tensor if tensor is not None and tensor.shape == shape and tensor.dtype == dtype else None
        local = self.store.load_into(targets)
        # As the optimizer and the parameters hold them: a DTensor around each restored shard.
        full = {key: self._as_saved(key, value, live, live_dtensors) for key, value in local.items()}
        with torch.no_grad():
            for name, _ in _named_tensors(self.model):
                key = f"model/{name}"
                if local[key] is not live[key]:
                    live[key].copy_(local[key])
            for name, param in self.model.named_parameters():
                key = f"grad/{name}"
                if not saved["grads"][name]:
                    param.grad = None
                elif local[key] is not live.get(key):
                    param.grad = full[key].to(param.device)
        for name, module in self.model.named_modules():
            module.training = saved["training"][name]
        # The tensors are the live state itself or new ones the optimizer may keep; never the
        # snapshot's own, which must survive for the next reset().
        self.optimizer.load_state_dict(join_tensors(saved["optimizer"], full))
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(copy.deepcopy(saved["lr_scheduler"]))
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(copy.deepcopy(saved["grad_scaler"]))
        if saved["sampler_epoch"] is not None:
            self.sampler.epoch = saved["sampler_epoch"]
        for (owner, name), value in zip(self._keep, saved["kept"]):
            setattr(owner, name, copy.deepcopy(value))
        saved["rng"].restore()

    def _as_saved(self, key: str, value: torch.Tensor, live: dict[str, torch.Tensor],
                  live_dtensors: dict[str, Any]) -> Any:
        """``value`` (a restored local tensor) as the state holds it: the live DTensor when the
        shard was restored into it in place, a new DTensor around it otherwise."""
        meta = self._saved["dtensors"].get(key)  # type: ignore[index]
        if meta is None:
            return value
        if key in live_dtensors and value is live.get(key):
            return live_dtensors[key]
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = meta
        return DTensor.from_local(value.to(mesh.device_type), mesh, placements, shape=shape, stride=stride,
                                  run_check=False)

    def discard(self) -> None:
        self.store.clear()
        self._saved = None
