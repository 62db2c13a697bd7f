"""DeepSpeed ZeRO-1/2/3: the engine (the user's, or built once from the user's config with the
range test's arguments), one step, the snapshot.

The LR is set through the engine's optimizer param groups (effective at every stage), one
step is DeepSpeed's own forward / ``engine.backward`` / ``engine.step`` over the micro-batches
of one optimizer step, and the loss is reduced over the data-parallel ranks exactly as on the
DDP path. The snapshot keeps only what this rank owns: under ZeRO-3 its parameter partitions,
under every stage its fp32 master partition and optimizer-state partition.

The in-memory snapshot goes through the ZeRO optimizer's ``state_dict`` / ``load_state_dict``
(the rigid, non-elastic layout, which reads only this rank's entry) and was checked bit-exact
with DeepSpeed 0.19.8 at stages 1, 2 and 3, fp32 and bf16; ``snapshot="disk"`` uses the
engine's own ``save_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlr.backends.base import BackendSpec, LrRamp, StepStats, eval_pass
from distlr.backends.dsconfig import auto_values, sweep_config, total_steps_from, tuned_config, unknown_keys
from distlr.core.options import RangeTestArgs, SnapshotMode
from distlr.dist import collectives as D
from distlr.train.batch import (cast_floating_inputs, check_batch_fits, compute_loss, count_items, count_samples,
                                is_causal_lm, prepare_batch)
from distlr.train.snapshot import HostStore, RNGState, check_free_space, join_tensors, split_tensors

logger = logging.getLogger(__name__)
CHECKPOINT_TAG = "distlr-snapshot"


def import_deepspeed() -> Any:
    """``deepspeed``, or an ImportError that says how to install it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("DeepSpeed support needs the deepspeed package: pip install 'distlr[deepspeed]'") from err
    return deepspeed


def zero_config_keys() -> frozenset[str]:
    """Every key (and alias) ``zero_optimization`` accepts in the installed DeepSpeed."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    return frozenset(fields) | frozenset(f.alias for f in fields.values() if f.alias)


def torch_optimizer_from_block(block: dict[str, Any], params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer equivalent to a DeepSpeed ``optimizer`` block (Adam, AdamW, SGD).

    DeepSpeed's ``Adam`` is AdamW unless ``adam_w_mode`` is false, as in DeepSpeed itself.

    Raises:
        ValueError: a type with no torch equivalent, naming it.
    """
    kind = str(block.get("type", "")).lower()
    kwargs = dict(block.get("params") or {})
    adam_w_mode = kwargs.pop("adam_w_mode", True)
    kwargs.pop("torch_adam", None)
    classes = {"adam": torch.optim.AdamW if adam_w_mode else torch.optim.Adam, "adamw": torch.optim.AdamW,
               "sgd": torch.optim.SGD}
    if kind not in classes:
        raise ValueError(
            f"DeepSpeed optimizer type {block.get('type')!r} has no torch equivalent to run on the CPU without "
            "compiling DeepSpeed ops; pass optimizer=... (a torch optimizer) or use Adam, AdamW or SGD"
        )
    cls = classes[kind]
    accepted = set(inspect.signature(cls).parameters)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(params, **{k: v for k, v in kwargs.items() if k in accepted})


def build_engine(
    model: nn.Module,
    config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None,
    ctx: D.DistContext,
    micro_batch_size: int | None,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    amp: str = "no",
    weight_decay: float = 0.01,
) -> tuple[Any, dict[str, Any], list[str]]:
    """``deepspeed.initialize`` on the user's config (as read), prepared for the range test.

    Returns:
        ``(engine, the user's config, notes for the user)``.

    Raises:
        ValueError: a config problem (an unresolvable "auto", a bad file), naming it.
        ImportError: DeepSpeed is not installed.
    """
    deepspeed = import_deepspeed()
    user = copy.deepcopy(config)
    for message in unknown_keys(user, zero_config_keys()):
        if ctx.is_main:
            logger.warning("%s; DeepSpeed ignores it", message)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    values = auto_values(micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps,
                         world_size=ctx.world_size, max_grad_norm=max_grad_norm, lr=1e-3,
                         weight_decay=weight_decay, hidden_size=hidden, amp=amp)
    cfg = sweep_config(user, values)
    notes = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None and "optimizer" in cfg and ctx.device.type == "cpu":
        # DeepSpeed would build FusedAdam / DeepSpeedCPUAdam, compiling C++ ops for minutes first;
        # on the CPU the torch optimizer does the same arithmetic.
        optimizer = torch_optimizer_from_block(cfg.pop("optimizer"), trainable)
        notes.append(f"on the CPU the config's optimizer runs as torch {type(optimizer).__name__}")
        if ctx.is_main:
            logger.info("%s", notes[-1])
    elif optimizer is None and "optimizer" not in cfg:
        optimizer = torch.optim.AdamW(trainable)
    if optimizer is not None:
        cfg.setdefault("zero_allow_untested_optimizer", True)
        if _offloads_optimizer(cfg):
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    with _initialize_environment(deepspeed, ctx):
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          model_parameters=None if optimizer is not None else trainable, config=cfg)
    return engine, user, notes


@contextlib.contextmanager
def _initialize_environment(deepspeed: Any, ctx: D.DistContext) -> Iterator[None]:
    """What ``deepspeed.initialize`` needs from the process, set for the call and put back after:
    ``LOCAL_RANK`` (see ``local_rank_for``), and on the CPU no shared-memory comm op: a CPU-only
    speed-up that JIT-compiles for over a minute when the engine sets up its communication;
    gloo runs the same collectives.
    """
    ops = deepspeed.ops.__compatible_ops__
    missing = object()
    op_before = ops.get("deepspeed_shm_comm", missing)
    if ctx.device.type == "cpu":
        ops["deepspeed_shm_comm"] = False
    try:
        with local_rank_for(ctx):
            yield
    finally:
        if op_before is missing:
            ops.pop("deepspeed_shm_comm", None)
        else:
            ops["deepspeed_shm_comm"] = op_before


@contextlib.contextmanager
def local_rank_for(ctx: D.DistContext) -> Iterator[None]:
    """``LOCAL_RANK`` for the length of a call into DeepSpeed, when no launcher set it (a plain
    ``python`` process): ``deepspeed.initialize`` asserts it, and ZeRO-3 reads it again in the
    forward pass (to place the tensors it broadcasts) and in checkpointing. It is removed again
    when the call returns, so the user's environment never holds it outside distlr's calls."""
    if "LOCAL_RANK" in os.environ:
        yield
        return
    os.environ["LOCAL_RANK"] = str(ctx.local_rank)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_RANK", None)


def _offloads_optimizer(cfg: dict[str, Any]) -> bool:
    offload = (cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() not in ("none", "")


def engine_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


class DeepSpeedBackend:
    """One range-test step on a DeepSpeed engine (any ZeRO stage).

    The user's engine is used as it is. A model with a config gets its engine here, on the
    first ``find()``: the config's "auto" values are resolved from that range test's arguments
    (micro-batch size from the loader, accumulation, clipping, precision), as the Hugging
    Face integration resolves them from ``TrainingArguments``.
    """

    def __init__(self, spec: BackendSpec, args: RangeTestArgs) -> None:
        self.ctx, self.criterion, self.device = spec.ctx, spec.criterion, spec.ctx.device
        self.loss_fn = spec.loss_fn
        if spec.kind.placed:
            self.engine = spec.model
            self.user_config = spec.deepspeed_config if spec.deepspeed_config is not None else dict(spec.model.config)
            self.notes: list[str] = []
        else:
            self.engine, self.user_config, self.notes = build_engine(
                spec.model, spec.deepspeed_config, optimizer=spec.optimizer, ctx=spec.ctx,
                micro_batch_size=spec.micro_batch_hint, accumulation_steps=args.accumulation_steps,
                max_grad_norm=args.max_grad_norm, amp=args.amp)
        if self.engine.lr_scheduler is not None or "scheduler" in self.user_config:
            self.notes.append("the DeepSpeed scheduler was set aside for the range test (which sets the LR itself); "
                              "the tuned config carries a new one")
        self.total_steps_hint = total_steps_from(self.user_config)
        self.causal_lm = is_causal_lm(self.engine.module)
        self.dtype = engine_dtype(self.engine)
        self._ramp = LrRamp(self.engine.optimizer)
        self._stats = StepStats(self.device)
        self._val_stats = StepStats(self.device)
        self.micro_batch_size: int | None = None

    @property
    def accumulation_steps(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    def configure(self, args: RangeTestArgs) -> None:
        """With DeepSpeed the config decides precision, clipping and accumulation; a different
        value in ``find()`` would be ignored, so it is refused."""
        engine = self.engine
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}[self.dtype]
        if args.amp not in ("no", dtype):
            raise ValueError(f"amp={args.amp!r} but the DeepSpeed engine runs {dtype}; "
                             "set bf16/fp16 in the DeepSpeed config")
        clipping = engine.gradient_clipping()
        if args.max_grad_norm is not None and args.max_grad_norm != clipping:
            raise ValueError(f"max_grad_norm={args.max_grad_norm!r} but the DeepSpeed config has "
                             f"gradient_clipping={clipping}; set gradient_clipping in the DeepSpeed config")
        gas = engine.gradient_accumulation_steps()
        if args.accumulation_steps not in (1, gas):
            raise ValueError(f"accumulation_steps={args.accumulation_steps!r} but the DeepSpeed config has "
                             f"gradient_accumulation_steps={gas}; set it in the DeepSpeed config")

    def set_lr(self, lr: float) -> None:
        self._ramp(lr)

    def train_step(self, micro_batches: Sequence[Any], step: int) -> torch.Tensor:
        """DeepSpeed's forward, backward and step over one optimizer step's micro-batches."""
        with local_rank_for(self.ctx):
            return self._train_step(micro_batches, step)

    def _train_step(self, micro_batches: Sequence[Any], step: int) -> torch.Tensor:
        engine = self.engine
        if not engine.training:
            engine.train()
        skipped_before = engine.skipped_steps
        for raw in micro_batches:
            batch = self._prepare(raw)
            items = count_items(batch, causal_lm=self.causal_lm)
            if self.micro_batch_size is None:  # the first batch: checked once, not every step
                if self.loss_fn is None:  # a loss_fn calls the model its own way
                    check_batch_fits(engine.module, batch, self.criterion)
                self.micro_batch_size = count_samples(batch)
            loss = compute_loss(engine, batch, self.criterion, self.loss_fn)
            with D.communication(self.ctx, "backward pass (with ZeRO's gradient reduction)", step):
                engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
                engine.step()          # applies the update only at the accumulation boundary
            self._stats.add(loss, items, count_samples(batch))
        # fp16: DeepSpeed's loss scaler skips a step that overflowed; it is no point on the curve.
        return self._stats.finish(skipped=engine.skipped_steps > skipped_before)

    def eval_loss(self, batches: Sequence[Any]) -> torch.Tensor:
        # ZeRO-3 gathers the parameters for an eval forward as for a training one.
        with local_rank_for(self.ctx):
            return eval_pass(self.engine, batches, self._val_stats, prepare=self._prepare, causal_lm=self.causal_lm,
                             loss_of=lambda batch: compute_loss(self.engine, batch, self.criterion, self.loss_fn))

    def _prepare(self, raw: Any) -> Any:
        batch = prepare_batch(raw, self.device, causal_lm=self.causal_lm, has_criterion=self.criterion is not None)
        return cast_floating_inputs(batch, self.dtype, has_criterion=self.criterion is not None)

    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> DeepSpeedSnapshot:
        return DeepSpeedSnapshot(self.engine, mode, directory, self.ctx, sampler=sampler)

    def contribute(self, optimal_lr: float | None, schedule: dict[str, Any] | None) -> dict[str, Any]:
        """The ZeRO stage, and the user's config tuned with the suggestion and a schedule."""
        out: dict[str, Any] = {"zero_stage": int(self.engine.zero_optimization_stage())}
        if optimal_lr is not None and schedule is not None:
            out["deepspeed_config"], out["notes"] = tuned_config(self.user_config, optimal_lr, schedule)
        return out

    def release(self) -> None:
        return None  # the engine is the user's, or lives as long as the finder


class DeepSpeedSnapshot:
    """What a DeepSpeed engine must get back: partitions, optimizer state, counters, RNG.

    The engine's own LR scheduler is taken off the engine for the range test (``engine.step()``
    would step it and overwrite the range test's LR) and put back, with its state, on restore.
    """

    def __init__(self, engine: Any, mode: SnapshotMode, directory: Path, ctx: D.DistContext, *,
                 sampler: Any | None = None) -> None:
        self.engine, self.mode, self.directory, self.ctx, self.sampler = engine, mode, directory, ctx, sampler
        self.store = HostStore()
        self._saved: dict[str, Any] | None = None

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        """The parameter data this rank holds (its ZeRO-3 partition) and the buffers."""
        module = self.engine.module
        stage3 = self.engine.zero_optimization_stage() == 3
        tensors = {f"param/{n}": (p.ds_tensor if stage3 else p).detach() for n, p in module.named_parameters()}
        tensors.update({f"buffer/{n}": b.detach() for n, b in module.named_buffers()})
        return tensors

    def take(self) -> None:
        with local_rank_for(self.ctx):
            self._take()

    def _take(self) -> None:
        engine = self.engine
        if engine.micro_steps % engine.gradient_accumulation_steps() != 0:
            raise ValueError("the DeepSpeed engine is in the middle of a gradient accumulation "
                             f"(micro step {engine.micro_steps}); run the range test at an optimizer-step boundary")
        saved: dict[str, Any] = {
            "counters": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")},
            "scheduler": engine.lr_scheduler,
            "scheduler_state": None if engine.lr_scheduler is None else copy.deepcopy(engine.lr_scheduler.state_dict()),
            "training": {n: m.training for n, m in engine.module.named_modules()},
            "sampler_epoch": getattr(self.sampler, "epoch", None),
        }
        if self.mode == "memory":
            if getattr(engine.optimizer, "elastic_checkpoint", False):
                raise ValueError("zero_optimization.elastic_checkpoint is true: its state cannot be restored "
                                 "rank by rank; use snapshot='disk'")
            tensors = self._local_tensors()
            saved["optimizer"] = split_tensors(engine.optimizer.state_dict(), "optimizer", tensors)
            saved["keys"] = list(tensors)
            self.store.put(tensors)
        else:
            # save_checkpoint is a collective: a rank short of space must stop every rank before it.
            with D.agree_on_failure(self.ctx):
                self._check_space()
            engine.save_checkpoint(str(self.directory), tag=CHECKPOINT_TAG, save_latest=False)
        saved["rng"] = RNGState.capture()
        engine.lr_scheduler = None
        self._saved = saved

    def _check_space(self) -> None:
        # This rank's parameter data, times four: the fp32 master and two optimizer moments too.
        need = sum(t.numel() * t.element_size() for t in self._local_tensors().values()) * 4
        check_free_space(self.directory.parent, need)

    def restore(self) -> None:
        with local_rank_for(self.ctx):
            self._restore()

    def _restore(self) -> None:
        saved = self._saved
        assert saved is not None, "restore() before take()"
        engine = self.engine
        if self.mode == "memory":
            tensors = self.store.load_into(dict.fromkeys(saved["keys"]))
            state = join_tensors(saved["optimizer"], tensors)
            group = getattr(engine.optimizer, "dp_process_group", None)
            if group is None:  # ZeRO stage 0 in fp32: the engine steps the torch optimizer itself
                engine.optimizer.load_state_dict(state)
            else:
                # DeepSpeed's loader takes every rank's state dict and, for the rigid layout, reads
                # only this rank's entry: hand it a list with ours in our place.
                entries: list[Any] = [None] * dist.get_world_size(group=group)
                entries[dist.get_rank(group=group)] = state
                engine.optimizer.load_state_dict(entries, load_optimizer_states=True, load_from_fp32_weights=True)
            with torch.no_grad():
                for key, tensor in self._local_tensors().items():
                    tensor.copy_(tensors[key])
        else:
            engine.load_checkpoint(str(self.directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
        for key, value in saved["counters"].items():
            setattr(engine, key, value)
        engine.lr_scheduler = saved["scheduler"]
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(copy.deepcopy(saved["scheduler_state"]))
        for name, module in engine.module.named_modules():
            module.training = saved["training"][name]
        if saved["sampler_epoch"] is not None:
            self.sampler.epoch = saved["sampler_epoch"]
        saved["rng"].restore()

    def discard(self) -> None:
        """Drop the snapshot; a disk one is removed once every rank is done reading it.

        Collective for ``snapshot="disk"``: every rank must call this, in the same order. When
        the barrier fails (another rank died), no one reads the snapshot any more: rank 0
        removes it, and every other rank its own files in case rank 0 is the one gone.
        """
        self.store.clear()
        # Every rank reaches the barrier, also one whose take() failed (see LRFinder._take_snapshot).
        if self.mode == "disk":
            try:
                D.barrier(self.ctx, "wait for every rank to finish reading the DeepSpeed snapshot")
            except D.CollectiveError:
                for path in self.directory.rglob(f"zero_pp_rank_{self.ctx.rank}_*"):
                    path.unlink(missing_ok=True)
            if self.ctx.is_main:
                shutil.rmtree(self.directory, ignore_errors=True)
        self._saved = None
