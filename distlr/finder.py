"""``LRFinder``: the public facade. It checks arguments, then hands each job to its module.

session (join or make the process group) -> backend (how one step runs) -> snapshot -> range test
(``distlr.loop``) -> restore -> result (``distlr.core.analysis.build_result``) -> plot. Every exit
path of ``find()`` restores the state taken before the range test; SIGTERM is one of them.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlr import backends
from distlr.core.analysis import build_result
from distlr.core.history import RunFacts
from distlr.core.ladder import Ladder
from distlr.core.options import (DEFAULT_TIMEOUT_S, DEFAULTS, SNAPSHOT_MODES, AmpMode, RangeTestArgs, SnapshotMode,
                                 StepMode, SuggestionMethod, check_choice)
from distlr.core.result import LRFinderResult
from distlr.core.rules import still_open
from distlr.core.scaling import split_global_batch
from distlr.core.series import SeriesResult, SeriesRun, check_series
from distlr.core.smoothing import LossTracker
from distlr.dist import collectives as D
from distlr.dist.session import start_session
from distlr.dist.signals import shielded, sigterm_as_interrupt
from distlr.loop import Validation, run_range_test
from distlr.output import trackers
from distlr.output.files import free_name
from distlr.output.plot import plot_result
from distlr.output.progress import LOG_EVERY, ProgressReporter, check_display_args, wants_bar
from distlr.output.summary import summary
from distlr.train.batch import Criterion, LossFn
from distlr.train.data import (BatchStream, check_loader, check_reshufflable, read_fixed_batches, reshuffled,
                               shard_loader)
from distlr.train.snapshot import Snapshot, check_snapshot_dir

logger = logging.getLogger(__name__)
MANY_MICRO_BATCHES = 64
"""Micro-batches per step past which a series warns: 64 x 100 steps is already 6,400 forward and
backward passes per rank for one range test, where a plain one takes 100."""


class NoSuggestionError(D.DistlrError):
    """``find_optimal_lr`` found no sound learning rate; ``.result`` holds the curve and why."""

    def __init__(self, result: LRFinderResult) -> None:
        super().__init__(f"no learning rate can be suggested: {result.suggestion_note}")
        self.result = result


class LRFinder:
    """Learning-rate range test (Smith, arXiv:1506.01186) that restores everything afterwards.

    Args:
        model: the ``nn.Module`` to test (or a DeepSpeed engine). It is moved to ``device``
            and left there.
        train_dataloader: an iterable of batches: ``(inputs, targets)``, dicts (Hugging Face
            style) or anything with ``.to()``.
        optimizer: used as is (several param groups keep their LR ratios along the ramp);
            None builds AdamW over the trainable parameters.
        criterion: ``criterion(output, targets)``; None when the model computes the loss.
        device: ``"auto"`` (this rank's GPU if any, else CPU), ``"cpu"``, ``"cuda[:N]"``.
        lr_scheduler: your LR scheduler, saved before the range test and restored after it.
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
        deepspeed_config: a DeepSpeed config (a JSON file or a dict): the first ``find()``
            builds the engine from it, resolving its "auto" values from that range test's arguments.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, the whole loss of one micro-batch,
            forward included, in place of the model's own loss or ``criterion`` (a Hugging Face
            Trainer's ``compute_loss``, for instance). ``model`` is what trains: the DDP
            wrapper or the DeepSpeed engine under a launcher.
        accelerator: the ``accelerate.Accelerator`` that prepared ``model``, ``optimizer`` and
            ``train_dataloader`` (``from_accelerator`` passes it): every step goes through it,
            and its prepared loader, which reads its own shard, is used as it is.

    Under torchrun every rank constructs the finder and calls ``find()``: the model is wrapped
    in DDP (unless it already is DDP/FSDP), the loader gets a ``DistributedSampler`` (unless it
    has one), the loss is averaged over all ranks and every rank stops on the same step.

    The finder joins the job's process group, or makes one under a launcher that has none;
    ``close()`` (or leaving a ``with LRFinder(...) as finder:`` block) ends only a group it made.

    Raises:
        TypeError / ValueError: a bad argument, before anything runs.

    Example:
        >>> with LRFinder(model, loader, criterion=nn.CrossEntropyLoss()) as finder:  # doctest: +SKIP
        ...     result = finder.find(num_steps=100)
        ...     finder.plot("lr_finder.png")
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
        loss_fn: LossFn | None = None,
        accelerator: Any | None = None,
    ) -> None:
        kind = backends.kind_of(model, deepspeed_config, accelerator)
        self._session = start_session(device, dist_backend=dist_backend, dist_timeout=dist_timeout,
                                      make_group=kind.needs_group, keep_group=kind.needs_group)
        self.ctx = self._session.ctx
        self.device = self.ctx.device
        try:
            # The same error on every rank, before any rank enters DDP's or DeepSpeed's collectives.
            snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else Path(tempfile.gettempdir())
            with D.agree_on_failure(self.ctx):
                _check_constructor_args(model, train_dataloader, optimizer, criterion, snapshot, loss_fn)
                backends.check_args(kind, model, optimizer)
                ds_config = backends.read_deepspeed_config(deepspeed_config)
                if snapshot == "disk":
                    check_snapshot_dir(snapshot_dir)
                # A loader an accelerator prepared reads its own shard already.
                self.train_dataloader = (train_dataloader if accelerator is not None
                                         else shard_loader(train_dataloader, self.ctx, seed=data_seed))
            self.data_seed = data_seed
            if not kind.placed:
                model = model.to(self.device)
        except BaseException:
            self._session.close()
            raise
        self._spec = backends.BackendSpec(
            model=model, optimizer=optimizer, criterion=criterion, loss_fn=loss_fn, ctx=self.ctx, lr_scheduler=lr_scheduler,
            grad_scaler=grad_scaler, find_unused_parameters=find_unused_parameters, deepspeed_config=ds_config,
            micro_batch_hint=getattr(train_dataloader, "batch_size", None), kind=kind, accelerator=accelerator)
        self._backend: backends.Backend | None = None
        self.snapshot_mode: SnapshotMode = snapshot
        self.snapshot_dir = snapshot_dir
        self.result: LRFinderResult | None = None
        self._snapshot: Snapshot | None = None
        self._closed = False
        self._progress: bool | None = None  # find(progress=None) means this
        self._summary = False  # print the summary when find() ends (rank 0)

    @classmethod
    def from_accelerator(cls, accelerator: Any, model: nn.Module, optimizer: Any, train_dataloader: Iterable[Any],
                         criterion: Criterion | None = None, **kwargs: Any) -> LRFinder:
        """A finder for what ``accelerator.prepare`` returned: every step goes through the
        accelerator (``backward``, ``autocast``, ``clip_grad_norm_``, the prepared optimizer's
        step), and its scaler, step count, gradient state and the loader's iteration come back
        as they were. When the accelerator runs DeepSpeed, ``model`` is its engine and the
        DeepSpeed backend runs it. ``kwargs`` are ``LRFinder``'s.

        Example:
            >>> model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # doctest: +SKIP
            >>> with LRFinder.from_accelerator(accelerator, model, optimizer, loader) as finder:  # doctest: +SKIP
            ...     result = finder.find(num_steps=100)
        """
        kwargs.setdefault("device", accelerator.device)
        optimizer = backends.accelerator_optimizer(accelerator, optimizer)
        finder = cls(model, train_dataloader, optimizer, criterion, accelerator=accelerator, **kwargs)
        try:
            with D.agree_on_failure(finder.ctx):
                backends.check_accelerator(accelerator, finder.ctx)
        except BaseException:
            finder.close()
            raise
        # As in the user's own Accelerate loop: a tqdm bar, and the summary on the main process.
        finder._progress, finder._summary = True, True
        return finder

    def close(self) -> None:
        """Let go of the snapshot (memory or disk) and the DDP wrapper, and end the process group
        if the finder made it (a group made for DeepSpeed is kept: DeepSpeed holds on to it).

        The memory snapshot goes too: a host copy of every rank's state would otherwise stay as
        long as the finder object does, and under FSDP2 its DTensor records (the device mesh) kept
        to interpreter exit made 4 in 40 runs of the docs' FSDP2 script abort there, after the
        user's ``destroy_process_group()`` (0 in 120 without them). ``reset()`` works until then.
        """
        if self._snapshot is not None:
            self._snapshot.discard()
            self._snapshot = None
        self._closed = True
        if self._backend is not None:
            self._backend.release()
        self._backend = None  # the backend and its wrapper go now
        self._session.close()

    def __enter__(self) -> LRFinder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def find(
        self,
        min_lr: float = DEFAULTS.min_lr,
        max_lr: float = DEFAULTS.max_lr,
        num_steps: int = DEFAULTS.num_steps,
        smooth_factor: float = DEFAULTS.smooth_factor,
        divergence_threshold: float = DEFAULTS.divergence_threshold,
        suggestion_method: SuggestionMethod = DEFAULTS.suggestion_method,
        *,
        step_mode: StepMode = DEFAULTS.step_mode,
        accumulation_steps: int = DEFAULTS.accumulation_steps,
        max_grad_norm: float | None = DEFAULTS.max_grad_norm,
        amp: AmpMode = DEFAULTS.amp,
        total_steps: int | None = DEFAULTS.total_steps,
        extend_range: bool = DEFAULTS.extend_range,
        val_loader: Iterable[Any] | None = None,
        val_every: int = DEFAULTS.val_every,
        val_batches: int = DEFAULTS.val_batches,
        progress: bool | None = None,
        log_every: int = LOG_EVERY,
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
            extend_range: when the loss has not turned up by ``max_lr`` (still falling, or flat),
                go on up the same ladder until it turns up or diverges, at most ``num_steps``
                more steps and up to 1000 x ``max_lr`` (``result.extended_steps`` says how many).
                False: the range ends at ``max_lr``.
            val_loader: batches to measure a validation loss on: the first ``val_batches`` of
                them (this rank's shard under a launcher), the same ones every time, in eval
                mode without gradients, after every ``val_every``-th step (``result.val_losses``).
                Training is the same with or without it.
            val_every: steps between validation losses (>= 1).
            val_batches: batches of ``val_loader`` the validation loss is the mean over (>= 1).
            progress: a tqdm bar on rank 0 (True), log lines (False), or, with None, a bar when
                stderr is a terminal outside SLURM (``find_lr`` and ``from_accelerator``: a bar).
            log_every: log one line every this many steps (rank 0, logger ``distlr``).

        Returns:
            The ``LRFinderResult``, identical on every rank.

        Raises:
            TypeError / ValueError: a bad argument, or arguments that differ between ranks,
                before any training step; a batch or model output whose loss cannot be found,
                before the first optimizer step.
            KeyboardInterrupt: Ctrl-C or SIGTERM (``distlr.signals.Terminated``), after the
                state was restored.
        """
        # Every rank checks its arguments, and the ranks compare them, before any step.
        with D.agree_on_failure(self.ctx):
            args = RangeTestArgs(min_lr=min_lr, max_lr=max_lr, num_steps=num_steps, smooth_factor=smooth_factor,
                                 divergence_threshold=divergence_threshold, suggestion_method=suggestion_method,
                                 step_mode=step_mode, accumulation_steps=accumulation_steps,
                                 max_grad_norm=max_grad_norm, amp=amp, total_steps=total_steps, extend_range=extend_range, val_every=val_every,
                                 val_batches=val_batches)
            check_display_args(progress=progress, log_every=log_every)
            if val_loader is not None:
                check_loader(val_loader, name="val_loader")
                val_loader = shard_loader(val_loader, self.ctx, seed=self.data_seed)
        D.agree_on_arguments(self.ctx, "find() arguments", {**args.as_dict(), "val_loader": val_loader is not None})
        with D.agree_on_failure(self.ctx):
            if self._backend is None:
                self._backend = backends.make_backend(self._spec, args)
            self._backend.configure(args)
        backend = self._backend
        ladder = Ladder(args.min_lr, args.max_lr, args.num_steps, args.step_mode)
        tracker = LossTracker(smooth_factor=args.smooth_factor, divergence_threshold=args.divergence_threshold)
        if progress is None:
            progress = self._progress
        reporter = (ProgressReporter(args.num_steps, bar=wants_bar(progress), log_every=log_every)
                    if self.ctx.is_main else None)

        start = time.perf_counter()
        with sigterm_as_interrupt():
            snapshot = self._take_snapshot(backend)
            # Rank 0 speaks for all: every rank cycles its own shard, and N copies of a line say no more.
            stream = BatchStream(self.train_dataloader, warn=reporter.warn if reporter else lambda message: None,
                                 keep=backends.loader_keeper(self._spec))
            try:
                validation = None if val_loader is None else Validation(
                    read_fixed_batches(val_loader, args.val_batches, self.ctx), args.val_every)
                history = run_range_test(backend, stream, ladder, tracker, self.ctx, reporter=reporter,
                                         extend=still_open if args.extend_range else None, validation=validation)
            finally:
                stream.close()
                if reporter is not None:
                    reporter.close()
                # A restore, once begun, is finished before a second Ctrl-C or a SIGTERM is let through.
                with shielded():
                    snapshot.restore()
                    if self.snapshot_mode == "disk":
                        # A disk snapshot is removed as soon as it has been restored, on every exit path.
                        snapshot.discard()
                        self._snapshot = None
        elapsed = time.perf_counter() - start
        cycled = D.any_rank(self.ctx, stream.cycled)  # shards may differ in length between ranks

        result = None
        if self.ctx.is_main:
            run = RunFacts(world_size=self.ctx.world_size, micro_batch_size=backend.micro_batch_size,
                           accumulation_steps=backend.accumulation_steps, elapsed_s=elapsed,
                           total_steps_hint=backend.total_steps_hint, cycled=cycled, validated=val_loader is not None,
                           notes=tuple(backend.notes), provenance=_provenance(self._session.launcher, self.ctx.world_size))
            result = build_result(history, args, run, contribute=backend.contribute)
            if result.optimal_lr is None:  # what a user needs most is why: said where it is seen
                logger.warning("no suggestion (%s): %s", result.suggestion_method, result.suggestion_note)
            logger.info("suggested lr %s (%s) | %s after %d/%d steps | %.1f s",
                        "none" if result.optimal_lr is None else f"{result.optimal_lr:.3e}", result.suggestion_method,
                        result.stop_reason, result.steps_run, result.num_steps, result.elapsed_s)
            if self._summary:
                print(summary(result), flush=True)
        self.result = D.broadcast_object(self.ctx, result)
        return self.result

    def series(
        self,
        global_batch_sizes: Sequence[int] | None = None,
        repeats: int = 1,
        *,
        widths: Sequence[int] | None = None,
        model_factory: Callable[..., Any] | None = None,
        num_steps_series: Sequence[int] | None = None,
        target_global_batch_size: int | None = None,
        target_width: int | None = None,
        on_run: Callable[[SeriesResult], None] | None = None,
        **find_kwargs: Any,
    ) -> SeriesResult:
        """One range test per point of one axis and repeat, all in this job: every rank takes
        part in every run, and the state is restored after each run (``find()`` does). The axis:

        - ``global_batch_sizes`` (the default): each global batch is split as micro-batch x
          ranks x accumulation steps, with the largest micro-batch up to the loader's
          ``batch_size``; the LR is fitted against B with a power law and with a law that can
          bend flat (the critical batch size seen from the LR side).
        - ``widths`` with ``model_factory``: each run trains a fresh model,
          ``model_factory(width=w)``, made from the same seed for every width, with a fresh
          optimizer of the finder's optimizer's class and defaults (or return ``(model,
          optimizer)`` from the factory, e.g. muP's ``MuAdamW``). Says whether the LR transfers
          across widths (flat within the spread) or fits ``lr ~ width^alpha``.
        - ``num_steps_series``: range tests of several lengths, showing the short-horizon bias.

        Repeat ``r`` reads the data shuffled with seed ``data_seed + r``, the same order for every
        point. A run that diverges at once or has no suggestion is recorded, and the series goes on.

        Args:
            global_batch_sizes: the sizes (default: the one ``find()`` would run, the loader's
                batch size x ranks x ``accumulation_steps``).
            repeats: runs per point, each with its own data order (>= 1).
            widths: the widths of a width series (needs ``model_factory``).
            model_factory: called as ``model_factory(width=w)``; returns a module, or a module
                and its optimizer.
            num_steps_series: the lengths of a horizon series (``num_steps`` of each run).
            target_global_batch_size: a size to predict the LR for from the fit.
            target_width: a width to predict the LR for, in a width series.
            on_run: called on every rank after each run with the series so far (``complete``
                False until the last run), e.g. to write it to disk, so that an interrupted
                series keeps the runs it finished (the CLI writes ``series.json`` this way).
            **find_kwargs: ``find()``'s arguments; ``accumulation_steps`` only without
                ``global_batch_sizes`` (each size's split decides it), ``num_steps`` only
                without ``num_steps_series``.

        Returns:
            The ``SeriesResult`` (runs, spreads, fits), identical on every rank.

        Raises:
            ValueError: a size the ranks cannot form (naming the nearest that can), a loader
                that cannot be re-read at other batch sizes, two axes at once, or bad
                arguments, before any step.

        Example:
            >>> series = finder.series(global_batch_sizes=[64, 128, 256], repeats=2, num_steps=100)  # doctest: +SKIP
            >>> series.fit.exponent                                                               # doctest: +SKIP
        """
        world = self.ctx.world_size
        micro_max = self._spec.micro_batch_hint
        with D.agree_on_failure(self.ctx):
            axis = check_series(global_batch_sizes, widths, num_steps_series, repeats=repeats,
                                target_global_batch_size=target_global_batch_size, target_width=target_width,
                                num_steps=find_kwargs.get("num_steps", DEFAULTS.num_steps),
                                num_steps_given="num_steps" in find_kwargs,
                                accumulation_steps=find_kwargs.get("accumulation_steps"),
                                accumulation_given="accumulation_steps" in find_kwargs)
            if widths is not None and not callable(model_factory):
                raise ValueError("widths=... needs model_factory: a function called as model_factory(width=w) that "
                                 "returns a fresh module (or a module and its optimizer)")
            if widths is None and model_factory is not None:
                raise ValueError("model_factory is used only with widths=...")
            if axis == "width" and self._spec.kind.name not in ("torch",):
                raise ValueError(f"series(widths=...) trains fresh plain modules (DDP under torchrun); this finder "
                                 f"runs a {self._spec.kind.name} model: run the width series on the plain model")
            # Without sizes, the one this finder would run: the accumulation the setup fixes, if any.
            accumulation = find_kwargs.pop("accumulation_steps", None) or backends.fixed_accumulation(self._spec) or 1
            if not isinstance(micro_max, int):
                raise ValueError("series(): train_dataloader has no batch_size to split global batches with; pass a "
                                 "torch DataLoader with batch_size set")
            sizes = list(global_batch_sizes) if global_batch_sizes is not None else [micro_max * world * accumulation]
            splits = {b: split_global_batch(b, world, micro_max) for b in sorted(sizes)}
            backends.check_batch_splits(self._spec, {a for _, a in splits.values()})
            check_reshufflable(self.train_dataloader)
        D.agree_on_arguments(self.ctx, "series() arguments",
                             {"global_batch_sizes": sorted(sizes), "repeats": repeats, "axis": axis,
                              "widths": None if widths is None else sorted(widths),
                              "num_steps_series": None if num_steps_series is None else sorted(num_steps_series),
                              "target_global_batch_size": target_global_batch_size, "target_width": target_width})
        longest = max(num_steps_series) if num_steps_series else find_kwargs.get("num_steps", DEFAULTS.num_steps)
        self._warn_about_splits(splits, micro_max, longest)
        points: list[int] = sorted({"global_batch_size": sizes, "width": widths or [],
                                    "num_steps": num_steps_series or []}[axis])
        plan = [(v, r) for v in points for r in range(repeats)]
        target = {"global_batch_size": target_global_batch_size, "width": target_width}.get(axis)
        runs: list[SeriesRun] = []
        original = self.train_dataloader
        try:
            for k, (value, repeat) in enumerate(plan, start=1):
                size = value if axis == "global_batch_size" else sizes[0]
                micro, accumulation = splits[size]
                seed = self.data_seed + repeat
                if self.ctx.is_main:
                    point = "" if axis == "global_batch_size" else f"{axis} {value}, "
                    logger.info("run %d/%d: %sglobal batch %d (%d per micro-batch x %d rank(s) x %d), repeat %d, "
                                "seed %d", k, len(plan), point, size, micro, world, accumulation, repeat + 1, seed)
                self.train_dataloader = reshuffled(original, self.ctx, batch_size=micro, seed=seed)
                run_kwargs = {**find_kwargs, "accumulation_steps": accumulation}
                if axis == "num_steps":
                    run_kwargs["num_steps"] = value
                if axis == "width":
                    result = self._fresh_model_run(model_factory, value, seed, run_kwargs)
                else:
                    result = self.find(**run_kwargs)
                runs.append(SeriesRun(size, repeat, seed, micro, accumulation, result,
                                      width=value if axis == "width" else None))
                if on_run is not None:
                    on_run(SeriesResult(list(runs), world, target_global_batch_size, planned=len(plan), axis=axis,
                                        target=target))
        finally:
            self.train_dataloader = original
        return SeriesResult(runs, world, target_global_batch_size, planned=len(plan), axis=axis, target=target)

    def _warn_about_splits(self, splits: dict[int, tuple[int, int]], micro_max: int, num_steps: int) -> None:
        if not self.ctx.is_main:
            return
        many = {b: a for b, (_, a) in splits.items() if a > MANY_MICRO_BATCHES}
        if many:
            logger.warning("global batch %s: %s micro-batches of %d per rank for each of up to %d steps; each step "
                           "costs that many forward and backward passes (pass smaller --global-batch-sizes, or a "
                           "larger --batch-size if memory allows)",
                           ", ".join(map(str, many)), ", ".join(f"{a:,}" for a in many.values()), micro_max, num_steps)
        tiny = [b for b, (micro, _) in splits.items() if micro == 1 and micro_max > 1]
        if tiny:
            logger.warning("global batch %s: the per-rank share has no divisor up to batch_size=%d but 1, so these "
                           "runs read micro-batches of 1 (slow; BatchNorm cannot train on them)",
                           ", ".join(map(str, tiny)), micro_max)

    def _fresh_model_run(self, model_factory: Callable[..., Any], width: int, seed: int,
                         find_kwargs: dict[str, Any]) -> LRFinderResult:
        """One run of a width series: a model (and optimizer) made fresh from ``seed``, in a
        finder of its own on this finder's loader and process group; the random streams are
        put back afterwards, so the series leaves no trace on the user's model or RNG."""
        from distlr.train.snapshot import RNGState

        rng = RNGState.capture()
        try:
            torch.manual_seed(seed)
            made = model_factory(width=width)
            model, optimizer = made if isinstance(made, tuple) else (made, None)
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_factory(width={width}) returned {type(made).__name__}, not a torch.nn.Module "
                                "or a (module, optimizer) pair")
            if optimizer is None:
                optimizer = _fresh_optimizer(self._spec.optimizer, model)
            with LRFinder(model, self.train_dataloader, optimizer, self._spec.criterion, self.device,
                          loss_fn=self._spec.loss_fn, data_seed=seed) as finder:
                finder._progress = self._progress
                return finder.find(**find_kwargs)
        finally:
            rng.restore()

    def sweep(self, *args: Any, **kwargs: Any) -> SeriesResult:
        """Deprecated spelling of ``series`` (a "sweep" is one range test everywhere else); it
        goes in the next release."""
        warnings.warn("LRFinder.sweep() is now LRFinder.series(); the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return self.series(*args, **kwargs)

    def _take_snapshot(self, backend: backends.Backend) -> Snapshot:
        """Every rank saves its own state; if any rank cannot, every rank drops what it took."""
        if self._snapshot is not None:
            self._snapshot.discard()
            self._snapshot = None
        snapshot = backend.make_snapshot(self.snapshot_mode, self._snapshot_path(),
                                         getattr(self.train_dataloader, "sampler", None))
        try:
            with D.agree_on_failure(self.ctx):
                with shielded():  # a snapshot half written is no snapshot: an interrupt waits for it
                    snapshot.take()
        except BaseException:
            snapshot.discard()  # no half-written snapshot is left on any rank
            raise
        self._snapshot = snapshot
        return snapshot

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
        path = Path(output_path) if output_path is not None else free_name(Path("lr_finder.png"))
        if self.ctx.is_main:
            plot_result(self.result, path, log_scale=log_scale, show_suggestion=show_suggestion)
        return str(path)

    def report(self, report_to: str | Iterable[str], *, log_dir: str | Path = ".") -> list[str]:
        """Log the last result to trackers: ``"tensorboard"``, ``"mlflow"``, ``"wandb"`` (a list
        or a comma-separated string; ``"all"``: every one installed). The curve keyed by LR, the
        figure and the suggestion as a summary, in a run of its own (``distlr.output.trackers``).

        Args:
            report_to: the trackers.
            log_dir: where TensorBoard writes (``<log_dir>/lr_finder``) and W&B keeps its run.

        Returns:
            Where each tracker put it (rank 0; the other ranks log nothing and get ``[]``).

        Raises:
            RuntimeError: ``find()`` has not run yet.
            ValueError: an unknown tracker name. ImportError: a tracker that is not installed.
        """
        if self.result is None:
            raise RuntimeError("nothing to report yet: call find() first")
        names = trackers.parse(report_to)
        trackers.check(names)
        if not self.ctx.is_main or not names:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            figure = plot_result(self.result, Path(tmp) / "lr_finder.png")
            return trackers.log(self.result, names, figure=figure, log_dir=Path(log_dir))

    def reset(self) -> None:
        """Put model, optimizer, scheduler, scaler and RNG back as they were before ``find()``.

        ``find()`` already does this on every exit path; ``reset()`` does it again on demand
        (e.g. after you trained the model further). Before any ``find()`` it does nothing.
        """
        if self._snapshot is None:
            if self._closed and self.result is not None:
                raise RuntimeError(
                    "reset() after the finder was closed (its with block ended): the snapshot was let go of then; "
                    "call reset() inside the with block"
                )
            if self.snapshot_mode == "disk" and self.result is not None:
                raise RuntimeError(
                    "reset() has nothing to restore from: with snapshot='disk' the snapshot is removed once "
                    "find() has restored it; use snapshot='memory' to reset() later"
                )
            logger.info("reset(): nothing to restore, find() has not run")
            return
        with shielded():
            self._snapshot.restore()

    def _snapshot_path(self) -> Path:
        if self.snapshot_mode == "memory":
            return self.snapshot_dir  # unused: nothing goes to disk
        # Rank 0 names the snapshot so that every rank uses the same name.
        name = D.broadcast_object(self.ctx, f"distlr-snapshot-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        return self.snapshot_dir / name


def _provenance(launcher: str, world_size: int) -> dict[str, Any]:
    """The versions a result was made with, and how the job was launched."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    versions = {name: version(name) for name in ("distlr", "torch", "transformers", "deepspeed")}
    return {**versions, "launcher": launcher, "world_size": world_size}


def _check_constructor_args(model: Any, loader: Any, optimizer: Any, criterion: Any, snapshot: Any,
                            loss_fn: Any = None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loader(loader)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if criterion is not None and not callable(criterion):
        raise TypeError(f"criterion must be callable (criterion(output, targets)) or None, got {criterion!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (loss_fn(model, batch) -> loss) or None, got {loss_fn!r}")
    if loss_fn is not None and criterion is not None:
        raise ValueError("criterion=... and loss_fn=... were both given; loss_fn computes the whole loss: pass one")
    _check_optimizer_kind(optimizer)
    check_choice("snapshot", snapshot, SNAPSHOT_MODES)


UNRAMPABLE = {
    "ScheduleFree": "schedule-free optimizers replace the schedule by an average of their iterates, so a ramp "
                    "does not measure how they train. Run the range test with the optimizer they are built on "
                    "(AdamW for AdamWScheduleFree / schedule_free_adamw, SGD for SGDScheduleFree, RAdam for "
                    "RAdamScheduleFree) and start the schedule-free run from result.optimal_lr, the constant LR, "
                    "checking it and a few times above it with short runs",
    "AdaLomo": "AdaLomo updates inside backward; run the range test with AdamW",
    "LOMO": "LOMO is SGD fused into backward; run the range test with SGD",
    "LayerWise": "a layer-wise optimizer (GaLore's or APOLLO's *_layerwise) keeps one optimizer per parameter "
                 "and steps in hooks; run the range test with its plain form (galore_adamw) or AdamW",
    "APOLLO": "APOLLO rescales its updates per channel outside param_groups; run the range test with AdamW",
}
"""Optimizers whose learning rate does not live in their param groups the ordinary way, so a
ramp over ``param_groups`` would not be what they train with, and what to do instead. Matched
in order against the optimizer's class name (AdaLomo before LOMO)."""


def unrampable_advice(name: str) -> str | None:
    """What to do instead, when ``name`` (a class name or ``TrainingArguments.optim``) is an
    optimizer a range test cannot ramp; None otherwise."""
    key = name.lower().replace("_", "").replace("-", "")
    return next((advice for kind, advice in UNRAMPABLE.items() if kind.lower() in key), None)


def _check_optimizer_kind(optimizer: Any) -> None:
    name = type(optimizer).__name__
    advice = unrampable_advice(name)
    if advice is not None:
        raise ValueError(f"optimizer {name} cannot be ramped: {advice}")


def find_optimal_lr(model: nn.Module, train_dataloader: Iterable[Any], **kwargs: Any) -> float:
    """Run a range test in one line and return the suggested learning rate. With ``repeats=N``
    (> 1): N range tests with N data orders, and the geometric mean of their suggestions (a run
    without one is left out of it); ``LRFinder.series(repeats=N)`` gives each run and the spread.

    Takes ``LRFinder``'s and ``find()``'s keyword arguments. A process group the finder had to
    make is ended before this returns, so the caller can make its own afterwards.

    Raises:
        TypeError: an unknown keyword argument.
        NoSuggestionError: the curve gave no sound suggestion (the error says why and carries
            the result).

    Example:
        >>> lr = find_optimal_lr(model, loader, criterion=nn.CrossEntropyLoss())  # doctest: +SKIP
    """
    init_names = set(inspect.signature(LRFinder.__init__).parameters) - {"self", "model", "train_dataloader"}
    find_names = set(inspect.signature(LRFinder.find).parameters) - {"self"}
    unknown = sorted(set(kwargs) - init_names - find_names - {"repeats"})
    if unknown:
        raise TypeError(f"find_optimal_lr() got unknown argument(s) {unknown}; allowed: "
                        f"{sorted(init_names | find_names | {'repeats'})}")
    repeats = kwargs.pop("repeats", 1)
    find_kwargs = {k: v for k, v in kwargs.items() if k in find_names}
    with LRFinder(model, train_dataloader, **{k: v for k, v in kwargs.items() if k in init_names}) as finder:
        if repeats == 1:
            result = finder.find(**find_kwargs)
        else:
            series = finder.series(None, repeats, **find_kwargs)
    if repeats == 1:
        if result.optimal_lr is None:
            raise NoSuggestionError(result)
        return result.optimal_lr
    [spread] = series.spreads().values()
    if spread.geometric_mean is None:
        raise NoSuggestionError(series.runs[-1].result)
    logger.info("%d range tests: geometric mean %.3e, from %.3e to %.3e", repeats, spread.geometric_mean, spread.min,
                spread.max)
    return spread.geometric_mean


def _fresh_optimizer(template: torch.optim.Optimizer | None, model: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``template``'s class and defaults over ``model``'s trainable parameters
    (AdamW when there is none): what a width series gives each fresh model."""
    params = [p for p in model.parameters() if p.requires_grad]
    if template is None:
        return torch.optim.AdamW(params)
    return type(template)(params, **template.defaults)
