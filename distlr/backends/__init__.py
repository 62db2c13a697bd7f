"""Backends: how one optimizer step of a range test runs on a given kind of model.

``kind_of`` decides, once and by type, which backend a model needs: ``torch`` (a plain or DDP
model, ``ddp``), ``fsdp2`` (``fsdp``), ``accelerate`` (what an ``accelerate.Accelerator``
prepared) or ``deepspeed`` (``zero``). ``make_backend`` builds that one; the facade and the loop
use it only through ``Backend`` (``distlr.backends.base``). Adding a backend means adding one
module here, one kind and one branch in ``make_backend``. DeepSpeed is imported only when a
DeepSpeed engine or config is given.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from distlr.backends.base import Backend, BackendSpec
from distlr.core.options import RangeTestArgs
from distlr.dist.collectives import DistContext

__all__ = ["Backend", "BackendKind", "BackendSpec", "check_args", "kind_of", "make_backend", "read_deepspeed_config"]

KindName = Literal["torch", "fsdp2", "accelerate", "deepspeed"]


@dataclass(frozen=True)
class BackendKind:
    """How a model trains, and what that asks of the process around it."""

    name: KindName
    needs_group: bool
    """A process group even in one process (DeepSpeed makes its collectives through one)."""
    placed: bool
    """The model is already on its device (a DeepSpeed engine placed its module itself)."""


def kind_of(model: Any, deepspeed_config: Any = None, accelerator: Any = None) -> BackendKind:
    """The one place that decides which backend runs ``model``, by type.

    A model is a DeepSpeed engine only if DeepSpeed was imported (an engine cannot exist
    otherwise), so a model that is none never imports DeepSpeed here.
    """
    engine = _deepspeed_engine_class()
    is_engine = engine is not None and isinstance(model, engine)
    if deepspeed_config is not None or is_engine:
        return BackendKind("deepspeed", needs_group=True, placed=is_engine)
    if accelerator is not None:
        return BackendKind("accelerate", needs_group=False, placed=False)
    from distlr.backends.fsdp import is_fsdp2

    if is_fsdp2(model):
        return BackendKind("fsdp2", needs_group=False, placed=False)
    return BackendKind("torch", needs_group=False, placed=False)


def _deepspeed_engine_class() -> type | None:
    deepspeed = sys.modules.get("deepspeed")
    return None if deepspeed is None else getattr(deepspeed, "DeepSpeedEngine", None)


def read_deepspeed_config(config: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """The user's DeepSpeed config as a new dict (the file or dict itself is never changed).

    Raises:
        ValueError: no such file, not JSON, or not a JSON object.
    """
    if config is None:
        return None
    from distlr.backends.dsconfig import load_ds_config

    return load_ds_config(config)


def check_args(kind: BackendKind, model: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Constructor arguments the chosen backend cannot run with.

    Raises:
        ValueError: an optimizer beside a DeepSpeed engine (which brings its own); no optimizer
            and no trainable parameter to build one over.
    """
    if kind.placed:
        if optimizer is not None:
            raise ValueError("optimizer=... was given with a DeepSpeed engine, which brings its own; pass optimizer=None")
    elif optimizer is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (every requires_grad is False)")


def make_backend(spec: BackendSpec, args: RangeTestArgs) -> Backend:
    """The backend for what ``LRFinder`` was given, built for the range test ``args`` describes.

    Builds the DDP wrapper or the DeepSpeed engine (once: later range tests reuse the backend
    through ``Backend.configure``).

    Raises:
        ValueError: a DeepSpeed config the run cannot resolve ("auto" with no value, an optimizer
            type with no torch equivalent on the CPU).
        ImportError: DeepSpeed is needed but not installed.
    """
    if spec.kind.name == "deepspeed":
        from distlr.backends.zero import DeepSpeedBackend

        return DeepSpeedBackend(spec, args)
    if spec.kind.name == "accelerate":
        from distlr.backends import accelerate

        return accelerate.make(spec)
    if spec.kind.name == "fsdp2":
        from distlr.backends import fsdp

        return fsdp.make(spec)
    from distlr.backends.ddp import TorchBackend

    return TorchBackend(spec)


def accelerator_optimizer(accelerator: Any, optimizer: Any) -> Any:
    """The optimizer ``LRFinder.from_accelerator`` passes on: the prepared one, or None under
    DeepSpeed (the model is then its engine, which brings its optimizer and steps it inside its
    own backward: the DeepSpeed backend runs it, ``kind_of`` says so by the engine's type)."""
    return None if str(accelerator.distributed_type).endswith("DEEPSPEED") else optimizer


def loader_keeper(spec: BackendSpec) -> Callable[[Any], Callable[[], None]]:
    """What takes, before a range test, what reading the loader will change, and puts it back:
    for a loader an accelerator prepared (under DeepSpeed too) its bookkeeping as well."""
    if spec.accelerator is not None:
        from distlr.backends.accelerate import keep_prepared_loader

        return keep_prepared_loader
    from distlr.train.data import keep_generators

    return keep_generators


def check_accelerator(accelerator: Any, ctx: DistContext) -> None:
    """Raise ValueError when the accelerator counts other processes than the job has ranks: its
    prepared loader would give every rank the same batches."""
    if accelerator.num_processes != ctx.world_size:
        raise ValueError(
            f"the accelerator counts {accelerator.num_processes} process(es) but the job has {ctx.world_size} "
            "ranks, so its prepared loader would give every rank the same batches. Without GPUs, Accelerate "
            "counts every rank only with Accelerator(cpu=True), and never with DeepSpeed")


def fixed_accumulation(spec: BackendSpec) -> int | None:
    """The micro-batches per step the training setup fixes, or None where ``find()`` decides:
    a DeepSpeed engine's (or its config's) ``gradient_accumulation_steps``, or an Accelerator's
    when it accumulates."""
    if spec.kind.name == "accelerate":
        steps = int(getattr(spec.accelerator, "gradient_accumulation_steps", 1))
        return steps if steps > 1 else None
    if spec.kind.name != "deepspeed":
        return None
    if spec.kind.placed:
        return int(spec.model.gradient_accumulation_steps())
    value = (spec.deepspeed_config or {}).get("gradient_accumulation_steps")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_batch_splits(spec: BackendSpec, accumulations: set[int]) -> None:
    """Raise ValueError when the backend cannot run a series whose range tests accumulate
    ``accumulations`` micro-batches: a DeepSpeed engine is built for one accumulation (its own,
    when it or its config fixes one), and an Accelerator that accumulates fixes its own."""
    if spec.kind.name not in ("deepspeed", "accelerate"):
        return
    fixed = fixed_accumulation(spec)
    if spec.kind.name == "accelerate" and fixed is not None and accumulations != {fixed}:
        raise ValueError(f"global_batch_sizes: these sizes need {sorted(accumulations)} accumulation steps, but "
                         f"the Accelerator accumulates {fixed} micro-batches a step; keep to sizes with that "
                         "split (repeats work), or build the Accelerator with gradient_accumulation_steps=1")
    if spec.kind.name == "deepspeed" and (len(accumulations) > 1 or (fixed is not None and accumulations != {fixed})):
        built = f"accumulates {fixed} micro-batch(es) a step" if fixed is not None else "is built for one accumulation"
        raise ValueError(f"global_batch_sizes: these sizes need {sorted(accumulations)} accumulation steps, but the "
                         f"DeepSpeed engine {built}; keep to sizes with that one split (repeats work) or run one "
                         "job per size")
