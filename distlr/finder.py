"""``LRFinder``: the public facade. It checks arguments, then hands each job to its module.

config (validate) -> backend (one step) -> snapshot -> sweep -> analysis (suggest) -> restore
-> plot. Every exit path of ``find()`` restores the state taken before the sweep.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlr import distributed as D
from distlr.analysis import build_result
from distlr.backend import AmpMode, Backend, TorchBackend
from distlr.batch import Criterion, is_causal_lm
from distlr.config import check_choice, validate_find_args
from distlr.data import BatchStream, check_loader, shard_loader
from distlr.ds_backend import DeepSpeedBackend, build_engine, engine_dtype, is_deepspeed_engine
from distlr.dsconfig import load_ds_config, total_steps_from, tuned_config
from distlr.ladder import StepMode, lr_ladder
from distlr.plot import plot_result
from distlr.report import ProgressReporter
from distlr.result import LRFinderResult
from distlr.session import DEFAULT_TIMEOUT_S, start_session
from distlr.snapshot import SNAPSHOT_MODES, Snapshot, SnapshotMode
from distlr.sweep import run_sweep
from distlr.tracker import LossTracker

logger = logging.getLogger(__name__)


class NoSuggestionError(RuntimeError):
    """``find_optimal_lr`` found no sound learning rate; ``.result`` holds the curve and why."""

    def __init__(self, result: LRFinderResult) -> None:
        super().__init__(f"no learning rate can be suggested: {result.suggestion_note}")
        self.result = result


class LRFinder:
    """Learning-rate range test (Smith, arXiv:1506.01186) that restores everything afterwards.

    Args:
        model: the ``nn.Module`` to test. It is moved to ``device`` and left there.
        train_dataloader: an iterable of batches: ``(inputs, targets)``, dicts (Hugging Face
            style) or anything with ``.to()``.
        optimizer: used as is (several param groups keep their LR ratios along the ramp);
            None builds AdamW over the trainable parameters.
        criterion: ``criterion(output, targets)``; None when the model computes the loss.
        device: ``"auto"`` (this rank's GPU if any, else CPU), ``"cpu"``, ``"cuda[:N]"``.
        lr_scheduler: your LR scheduler, saved before the sweep and restored after it.
        grad_scaler: your AMP ``GradScaler`` (used with ``amp="fp16"``), saved and restored.
        snapshot: ``"memory"`` (host memory, the default) or ``"disk"`` (a
            torch.distributed.checkpoint directory per rank, removed once restored).
        snapshot_dir: where ``"disk"`` snapshots go (default: the system temp directory).
        find_unused_parameters: passed to DDP when distlr wraps the model.
        dist_backend: ``"auto"`` (NCCL with CUDA, else gloo), ``"nccl"`` or ``"gloo"``; used only
            when distlr creates the process group (under torchrun/SLURM without one).
        dist_timeout: collective timeout in seconds for a process group distlr creates.
        data_seed: shuffle seed of the ``DistributedSampler`` distlr puts in a loader that has
            none (the same on every rank).

    Under torchrun every rank constructs the finder and calls ``find()``: the model is wrapped
    in DDP (unless it already is DDP/FSDP), the loader gets a ``DistributedSampler`` (unless it
    has one), the loss is averaged over all ranks and every rank stops on the same step.

    Raises:
        TypeError / ValueError: a bad argument, before anything runs.

    Example:
        >>> finder = LRFinder(model, loader, criterion=nn.CrossEntropyLoss())  # doctest: +SKIP
        >>> result = finder.find(num_steps=100)                              # doctest: +SKIP
        >>> finder.plot("lr_finder.png")                                     # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataloader: Iterable[Any],
        optimizer: torch.optim.Optimizer | None = None,
        criterion: Criterion | None = None,
        device: str | torch.device = "auto",
        *,
        lr_scheduler: Any | None = None,
        grad_scaler: Any | None = None,
        snapshot: SnapshotMode = "memory",
        snapshot_dir: str | Path | None = None,
        find_unused_parameters: bool = False,
        dist_backend: str = "auto",
        dist_timeout: float = DEFAULT_TIMEOUT_S,
        data_seed: int = 0,
        deepspeed_config: str | Path | dict[str, Any] | None = None,
    ) -> None:
        # DeepSpeed needs a process group even for one process.
        use_deepspeed = deepspeed_config is not None or is_deepspeed_engine(model)
        self._session = start_session(device, dist_backend=dist_backend, dist_timeout=dist_timeout,
                                      for_deepspeed=use_deepspeed)
        self.ctx = self._session.ctx
        self.device = self.ctx.device
        try:
            error = None
            try:
                _check_constructor_args(model, train_dataloader, optimizer, criterion, snapshot)
            except (TypeError, ValueError) as err:
                error = err
            # The same error on every rank, before any rank enters DDP's or DeepSpeed's collectives.
            D.raise_if_any_failed(self.ctx, error)
            self._setup(model, train_dataloader, optimizer, criterion, deepspeed_config=deepspeed_config,
                        find_unused_parameters=find_unused_parameters, data_seed=data_seed)
        except BaseException:
            self._session.close()
            raise
        self.lr_scheduler, self.grad_scaler = lr_scheduler, grad_scaler
        self.snapshot_mode: SnapshotMode = snapshot
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else Path(tempfile.gettempdir())
        self.result: LRFinderResult | None = None
        self._snapshot: Snapshot | None = None

    def _setup(self, model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer | None,
               criterion: Criterion | None, *, deepspeed_config: Any, find_unused_parameters: bool,
               data_seed: int) -> None:
        """The model to train (DDP wrapper or DeepSpeed engine), its optimizer, the sharded loader."""
        self._engine: Any | None = None
        self._ds_config: dict[str, Any] | None = None
        self._notes: list[str] = []
        if is_deepspeed_engine(model):
            self._engine = model
            self._ds_config = load_ds_config(deepspeed_config) if deepspeed_config is not None else dict(model.config)
        elif deepspeed_config is not None:
            self._engine, self._ds_config, self._notes = build_engine(
                model.to(self.device), deepspeed_config, optimizer=optimizer, ctx=self.ctx,
                micro_batch_size=getattr(loader, "batch_size", None))
        if self._engine is not None:
            model, optimizer = self._engine.module, self._engine.optimizer
            if self._engine.lr_scheduler is not None or "scheduler" in self._ds_config:
                self._notes.append("the DeepSpeed scheduler was set aside for the sweep (the sweep sets the LR); "
                                   "the tuned config carries a new one")
        self.model = model.to(self.device)
        self.optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        self.criterion = criterion
        # Under DDP every rank trains through the wrapper, which also makes rank 0's weights
        # everyone's (as DDP always does); the user's module stays what is snapshotted.
        self._train_model = self._engine or wrap_for_data_parallel(self.model, self.ctx, find_unused_parameters)
        self.train_dataloader = shard_loader(loader, self.ctx, seed=data_seed)

    def close(self) -> None:
        """Remove a disk snapshot and end the process group if distlr created it.

        A group made for DeepSpeed is kept: DeepSpeed holds on to it in module globals, and a
        later engine in this process would break on a new one.
        """
        if self._snapshot is not None and self.snapshot_mode == "disk":
            self._snapshot.discard()
            self._snapshot = None
        if self._train_model is not self.model:
            # Drop the DDP wrapper before its process group: a group that is freed from inside the
            # wrapper's deallocation joins its worker threads while holding the GIL and deadlocks.
            self._train_model = self.model
            gc.collect()
        self._session.close()

    def __enter__(self) -> LRFinder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def find(
        self,
        min_lr: float = 1e-8,
        max_lr: float = 1e-1,
        num_steps: int = 100,
        smooth_factor: float = 0.98,
        divergence_threshold: float = 4.0,
        suggestion_method: str = "steepest_gradient",
        *,
        step_mode: StepMode = "exp",
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        amp: AmpMode = "no",
        total_steps: int | None = None,
        progress: bool = False,
        log_every: int = 10,
    ) -> LRFinderResult:
        """Ramp the LR from ``min_lr`` to ``max_lr``, record the loss, suggest an LR, restore.

        Args:
            min_lr: LR of the first step (> 0).
            max_lr: LR of the last step (> ``min_lr``).
            num_steps: optimizer steps on the ladder (>= 2).
            smooth_factor: weight on history of the loss EMA, in [0, 1); 0 disables smoothing.
            divergence_threshold: stop when the smoothed loss exceeds this x the best one (> 1).
            suggestion_method: ``"steepest_gradient"``, ``"valley"`` or ``"minimum"``.
            step_mode: ``"exp"`` (even in log space) or ``"linear"``.
            accumulation_steps: micro-batches per optimizer step; the ladder advances per step.
            max_grad_norm: clip gradients to this norm before each step (None: no clipping).
            amp: ``"no"``, ``"bf16"`` autocast, or ``"fp16"`` with a GradScaler (CUDA only);
                an fp16 step skipped for overflow is retried and is no point on the curve.
            total_steps: your training run's optimizer steps, for the schedule recommendation.
            progress: draw a progress bar on rank 0 when stderr is a terminal.
            log_every: log one line every this many steps (rank 0, logger ``distlr``).

        Returns:
            The ``LRFinderResult``, identical on every rank.

        Raises:
            TypeError / ValueError: a bad argument, before any training step; a batch or model
                output whose loss cannot be found, before the first optimizer step.
        """
        self._check_find_args(
            min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, smooth_factor=smooth_factor,
            divergence_threshold=divergence_threshold, suggestion_method=suggestion_method, step_mode=step_mode,
            accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm, amp=amp, total_steps=total_steps,
        )
        ladder = lr_ladder(min_lr, max_lr, num_steps, step_mode)
        backend = self._make_backend(amp=amp, max_grad_norm=max_grad_norm)
        if isinstance(backend, DeepSpeedBackend):
            accumulation_steps = backend.accumulation_steps  # the engine's config decides
        if total_steps is None and self._ds_config is not None:
            total_steps = total_steps_from(self._ds_config)
        tracker = LossTracker(smooth_factor=smooth_factor, divergence_threshold=divergence_threshold)
        reporter = ProgressReporter(num_steps, bar=progress, log_every=log_every) if self.ctx.is_main else None

        start = time.perf_counter()
        snapshot = self._take_snapshot(backend)
        stream = BatchStream(self.train_dataloader)
        try:
            history = run_sweep(backend, stream, ladder, tracker, self.ctx,
                                accumulation_steps=accumulation_steps, reporter=reporter)
        finally:
            if reporter is not None:
                reporter.close()
            snapshot.restore()
            if self.snapshot_mode == "disk":
                # A disk snapshot is removed as soon as it has been restored, on every exit path.
                snapshot.discard()
                self._snapshot = None
        elapsed = time.perf_counter() - start
        cycled = D.any_rank(self.ctx, stream.cycled)  # shards may differ in length between ranks

        result = None
        if self.ctx.is_main:
            notes = list(self._notes)
            if cycled:
                notes.append(f"train_dataloader ran out before {num_steps} steps and was cycled (new epochs)")
            result = self._result(
                lrs=history.lrs, losses=history.losses, smoothed=history.smoothed, stop_reason=history.stop_reason,
                diverged_at=history.diverged_at, skipped_steps=history.skipped_steps, smooth_factor=smooth_factor,
                min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, suggestion_method=suggestion_method,
                step_mode=step_mode, micro_batch_size=backend.micro_batch_size, accumulation_steps=accumulation_steps,
                elapsed_s=elapsed, total_steps=total_steps, notes=notes,
            )
        self.result = D.broadcast_object(self.ctx, result)
        return self.result

    def _check_find_args(self, *, amp: str, max_grad_norm: float | None, accumulation_steps: int,
                         total_steps: Any, **find_args: Any) -> None:
        """Every argument checked on every rank; the same error everywhere, before any step."""
        error: Exception | None = None
        try:
            validate_find_args(amp=amp, max_grad_norm=max_grad_norm, accumulation_steps=accumulation_steps,
                               **find_args)
            _check_run_args(amp=amp, device=self.device, total_steps=total_steps)
            if self._engine is not None:
                _check_engine_args(self._engine, amp=amp, max_grad_norm=max_grad_norm,
                                   accumulation_steps=accumulation_steps)
        except (TypeError, ValueError) as err:
            error = err
        D.raise_if_any_failed(self.ctx, error)

    def _make_backend(self, *, amp: AmpMode, max_grad_norm: float | None) -> Backend:
        causal_lm = is_causal_lm(self.model)
        if self._engine is not None:
            return DeepSpeedBackend(self._engine, criterion=self.criterion, device=self.device,
                                    causal_lm=causal_lm, ctx=self.ctx)
        return TorchBackend(
            self._train_model, self.optimizer, criterion=self.criterion, device=self.device, amp=amp,
            grad_scaler=self.grad_scaler, max_grad_norm=max_grad_norm, causal_lm=causal_lm,
            lr_scheduler=self.lr_scheduler, rank=self.ctx.rank,
        )

    def _take_snapshot(self, backend: Backend) -> Snapshot:
        """Every rank saves its own state; if any rank cannot, every rank drops what it took."""
        if self._snapshot is not None:
            self._snapshot.discard()
            self._snapshot = None
        snapshot = backend.make_snapshot(self.snapshot_mode, self._snapshot_path(),
                                         getattr(self.train_dataloader, "sampler", None))
        error: Exception | None = None
        try:
            snapshot.take()
        except Exception as err:  # noqa: BLE001 - whatever it was, every rank must hear of it
            error = err
        try:
            D.raise_if_any_failed(self.ctx, error)
        except BaseException:
            snapshot.discard()  # no half-written snapshot is left on any rank
            raise
        self._snapshot = snapshot
        return snapshot

    def _result(self, **kwargs: Any) -> LRFinderResult:
        """Rank 0: the result of the sweep, with the tuned DeepSpeed config when there is one."""
        result = build_result(world_size=self.ctx.world_size, **kwargs)
        if self._engine is not None:
            result.zero_stage = int(self._engine.zero_optimization_stage())
            if result.optimal_lr is not None and result.schedule is not None:
                result.deepspeed_config, ds_notes = tuned_config(self._ds_config, result.optimal_lr, result.schedule)
                result.notes.extend(ds_notes)
        logger.info(
            "suggested lr %s (%s) | %s after %d/%d steps | %.1f s",
            "none" if result.optimal_lr is None else f"{result.optimal_lr:.3e}", result.suggestion_method,
            result.stop_reason, result.steps_run, result.num_steps, result.elapsed_s,
        )
        return result

    def plot(self, output_path: str | Path | None = None, log_scale: bool = True,
             show_suggestion: bool = True) -> str | None:
        """Draw the last result (loss and smoothed loss vs LR, suggestion, divergence point).

        Args:
            output_path: file to write (PNG by default). None picks ``lr_finder.png`` in the
                working directory, or ``lr_finder-N.png`` if that exists (nothing is overwritten).
            log_scale: log-scale LR axis.
            show_suggestion: mark the suggested LR.

        Returns:
            The path written (only rank 0 writes; every rank gets the path).

        Raises:
            RuntimeError: ``find()`` has not run yet.
        """
        if self.result is None:
            raise RuntimeError("nothing to plot yet: call find() first")
        path = Path(output_path) if output_path is not None else _free_name(Path("lr_finder.png"))
        if self.ctx.is_main:
            plot_result(self.result, path, log_scale=log_scale, show_suggestion=show_suggestion)
        return str(path)

    def reset(self) -> None:
        """Put model, optimizer, scheduler, scaler and RNG back as they were before ``find()``.

        ``find()`` already does this on every exit path; ``reset()`` does it again on demand
        (e.g. after you trained the model further). Before any ``find()`` it does nothing.
        """
        if self._snapshot is None:
            if self.snapshot_mode == "disk" and self.result is not None:
                raise RuntimeError(
                    "reset() has nothing to restore from: with snapshot='disk' the snapshot is removed once "
                    "find() has restored it; use snapshot='memory' to reset() later"
                )
            logger.info("reset(): nothing to restore, find() has not run")
            return
        self._snapshot.restore()

    def _snapshot_path(self) -> Path:
        if self.snapshot_mode == "memory":
            return self.snapshot_dir  # unused: nothing goes to disk
        # Rank 0 names the snapshot so that every rank uses the same name.
        name = D.broadcast_object(self.ctx, f"distlr-snapshot-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        return self.snapshot_dir / name


def _check_constructor_args(model: Any, loader: Any, optimizer: Any, criterion: Any, snapshot: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loader(loader)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if optimizer is not None and is_deepspeed_engine(model):
        raise ValueError("optimizer=... was given with a DeepSpeed engine, which brings its own; pass optimizer=None")
    if optimizer is None and not is_deepspeed_engine(model) and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameters (every requires_grad is False)")
    if criterion is not None and not callable(criterion):
        raise TypeError(f"criterion must be callable (criterion(output, targets)) or None, got {criterion!r}")
    check_choice("snapshot", snapshot, SNAPSHOT_MODES)


def _check_run_args(*, amp: str, device: torch.device, total_steps: Any) -> None:
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (it uses a GradScaler); device is {device}. "
                         "Use amp='bf16' or amp='no' on the CPU")
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
        raise ValueError(f"total_steps={total_steps!r} is not allowed; use None or an int >= 1")


def _check_engine_args(engine: Any, *, amp: str, max_grad_norm: float | None, accumulation_steps: int) -> None:
    # With DeepSpeed the config decides these; a different value in find() would be ignored.
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[engine_dtype(engine)]
    if amp not in ("no", dtype):
        raise ValueError(f"amp={amp!r} but the DeepSpeed engine runs {dtype}; set bf16/fp16 in the DeepSpeed config")
    clipping = engine.gradient_clipping()
    if max_grad_norm is not None and max_grad_norm != clipping:
        raise ValueError(f"max_grad_norm={max_grad_norm!r} but the DeepSpeed config has gradient_clipping={clipping}; "
                         "set gradient_clipping in the DeepSpeed config")
    gas = engine.gradient_accumulation_steps()
    if accumulation_steps not in (1, gas):
        raise ValueError(f"accumulation_steps={accumulation_steps!r} but the DeepSpeed config has "
                         f"gradient_accumulation_steps={gas}; set it in the DeepSpeed config")


def wrap_for_data_parallel(model: nn.Module, ctx: D.DistContext, find_unused_parameters: bool) -> nn.Module:
    """``model`` in DDP when the job has several ranks; a DDP or FSDP model is used as it is."""
    if not ctx.distributed or _is_data_parallel(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _is_data_parallel(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, (DistributedDataParallel, FullyShardedDataParallel, FSDPModule))


def _free_name(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def find_optimal_lr(model: nn.Module, train_dataloader: Iterable[Any], **kwargs: Any) -> float:
    """Run a range test in one line and return the suggested learning rate.

    Takes ``LRFinder``'s and ``find()``'s keyword arguments.

    Raises:
        TypeError: an unknown keyword argument.
        NoSuggestionError: the curve gave no sound suggestion (the error says why and carries
            the result).

    Example:
        >>> lr = find_optimal_lr(model, loader, criterion=nn.CrossEntropyLoss())  # doctest: +SKIP
    """
    init_names = set(inspect.signature(LRFinder.__init__).parameters) - {"self", "model", "train_dataloader"}
    find_names = set(inspect.signature(LRFinder.find).parameters) - {"self"}
    unknown = sorted(set(kwargs) - init_names - find_names)
    if unknown:
        raise TypeError(f"find_optimal_lr() got unknown argument(s) {unknown}; allowed: {sorted(init_names | find_names)}")
    finder = LRFinder(model, train_dataloader, **{k: v for k, v in kwargs.items() if k in init_names})
    result = finder.find(**{k: v for k, v in kwargs.items() if k in find_names})
    if result.optimal_lr is None:
        raise NoSuggestionError(result)
    return result.optimal_lr
