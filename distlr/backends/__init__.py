"""Backends: how one optimizer step of the sweep runs on a given kind of model.

``make_backend`` picks and builds one; the facade and the sweep use it only through
``Backend`` (``distlr.backends.base``): ``ddp`` (a plain or DDP model), ``fsdp`` (FSDP2),
``accelerate`` (what an ``accelerate.Accelerator`` prepared), ``zero`` (DeepSpeed). Adding a
backend means adding one module here and one branch in
``make_backend``. DeepSpeed is imported only when a DeepSpeed engine or config is
given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distlr.args import SweepArgs
from distlr.backends.base import Backend, BackendSpec
from distlr.distributed import DistContext

__all__ = ["Backend", "BackendSpec", "check_args", "make_backend", "needs_process_group", "read_deepspeed_config"]


def _is_deepspeed_engine(model: Any) -> bool:
    # Looked at by its module's name first, so a model that is no engine never imports DeepSpeed.
    if not type(model).__module__.startswith("deepspeed"):
        return False
    from distlr.backends.zero import is_deepspeed_engine

    return is_deepspeed_engine(model)


def _uses_deepspeed(model: Any, deepspeed_config: Any) -> bool:
    return deepspeed_config is not None or _is_deepspeed_engine(model)


def needs_process_group(model: Any, deepspeed_config: Any) -> bool:
    """Whether the backend needs a process group even in one process (DeepSpeed does)."""
    return _uses_deepspeed(model, deepspeed_config)


def read_deepspeed_config(config: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """The user's DeepSpeed config as a new dict (the file or dict itself is never changed).

    Raises:
        ValueError: no such file, not JSON, or not a JSON object.
    """
    if config is None:
        return None
    from distlr.backends.dsconfig import load_ds_config

    return load_ds_config(config)


def check_args(model: Any, optimizer: torch.optim.Optimizer | None, deepspeed_config: Any) -> None:
    """Constructor arguments the chosen backend cannot run with (ValueError naming them)."""
    if _uses_deepspeed(model, deepspeed_config):
        from distlr.backends.zero import check_args as check
    else:
        from distlr.backends.ddp import check_args as check  # type: ignore[assignment]
    check(model, optimizer)


def make_backend(spec: BackendSpec, args: SweepArgs) -> Backend:
    """The backend for what ``LRFinder`` was given, built for the sweep ``args`` describes.

    Builds the DDP wrapper or the DeepSpeed engine (once: later sweeps reuse the backend through
    ``Backend.configure``).

    Raises:
        ValueError: a DeepSpeed config the run cannot resolve ("auto" with no value, an optimizer
            type with no torch equivalent on the CPU).
        ImportError: DeepSpeed is needed but not installed.
    """
    if _uses_deepspeed(spec.model, spec.deepspeed_config):
        from distlr.backends.zero import DeepSpeedBackend

        return DeepSpeedBackend(spec, args)
    if "accelerator" in spec.extra:
        from distlr.backends import accelerate

        return accelerate.make(spec)
    from distlr.backends import fsdp

    if fsdp.is_fsdp2(spec.model):
        return fsdp.make(spec)
    from distlr.backends.ddp import TorchBackend

    return TorchBackend(spec)


def from_accelerator(accelerator: Any, optimizer: Any) -> tuple[Any, dict[str, Any]]:
    """What ``LRFinder.from_accelerator`` passes on: the optimizer, and the ``BackendSpec.extra``
    that routes the sweep through the accelerator. Under DeepSpeed the model is the engine,
    which brings its optimizer and steps it inside its own backward: the DeepSpeed backend runs
    it, and the prepared optimizer wrapper is not used."""
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):
        return None, {}
    return optimizer, {"accelerator": accelerator}


def check_accelerator(accelerator: Any, ctx: DistContext) -> None:
    """Raise ValueError when the accelerator counts other processes than the job has ranks: its
    prepared loader would give every rank the same batches."""
    if accelerator.num_processes != ctx.world_size:
        raise ValueError(
            f"the accelerator counts {accelerator.num_processes} process(es) but the job has {ctx.world_size} "
            "ranks, so its prepared loader would give every rank the same batches. Without GPUs, Accelerate "
            "counts every rank only with Accelerator(cpu=True), and never with DeepSpeed")


def check_batch_splits(spec: BackendSpec, accumulations: set[int]) -> None:
    """Raise ValueError when the backend cannot run a sweep whose runs accumulate
    ``accumulations`` micro-batches: a DeepSpeed engine is built for one accumulation (its own,
    when it or its config fixes one)."""
    if not _uses_deepspeed(spec.model, spec.deepspeed_config):
        return
    if _is_deepspeed_engine(spec.model):
        fixed = spec.model.gradient_accumulation_steps()
    else:
        value = (spec.deepspeed_config or {}).get("gradient_accumulation_steps")
        fixed = value if isinstance(value, int) and not isinstance(value, bool) else None
    if len(accumulations) > 1 or (fixed is not None and accumulations != {fixed}):
        built = f"accumulates {fixed} micro-batch(es) a step" if fixed is not None else "is built for one accumulation"
        raise ValueError(f"global_batch_sizes: these sizes need {sorted(accumulations)} accumulation steps, but the "
                         f"DeepSpeed engine {built}; sweep sizes with that one split (repeats work) or run one job "
                         "per size")
