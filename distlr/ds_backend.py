"""DeepSpeed ZeRO-1/2/3: building the engine from the user's config, one step, snapshot.

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

import copy
import inspect
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distlr import distributed as D
from distlr.backend import ITEMS, LOSS_SUM, NUM_STATS, SKIPPED, group_lr_ratios
from distlr.batch import (Criterion, cast_floating_inputs, check_batch_fits, compute_loss, count_items, count_samples,
                          prepare_batch)
from distlr.dsconfig import auto_values, load_ds_config, sweep_config, unknown_keys
from distlr.snapshot import HostStore, RNGState, SnapshotMode, check_free_space, join_tensors, split_tensors

logger = logging.getLogger(__name__)
CHECKPOINT_TAG = "distlr-snapshot"


def import_deepspeed() -> Any:
    """``deepspeed``, or an ImportError that says how to install it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("DeepSpeed support needs the deepspeed package: pip install 'distlr[deepspeed]'") from err
    return deepspeed


def is_deepspeed_engine(model: Any) -> bool:
    """True for a ``DeepSpeedEngine`` (without importing deepspeed when the model is not one)."""
    if not type(model).__module__.startswith("deepspeed"):
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


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
    config: Any,
    *,
    optimizer: torch.optim.Optimizer | None,
    ctx: D.DistContext,
    micro_batch_size: int | None,
    accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    amp: str = "no",
    weight_decay: float = 0.01,
) -> tuple[Any, dict[str, Any], list[str]]:
    """``deepspeed.initialize`` on the user's config, prepared for the sweep.

    Returns:
        ``(engine, the user's config as read, notes for the user)``.

    Raises:
        ValueError: a config problem (an unresolvable "auto", a bad file), naming it.
        ImportError: DeepSpeed is not installed.
    """
    deepspeed = import_deepspeed()
    user = load_ds_config(config)
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
    if ctx.device.type == "cpu":
        # The shared-memory comm op is a CPU-only speed-up that JIT-compiles for over a minute;
        # gloo runs the same collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # deepspeed.initialize asserts that a launcher set LOCAL_RANK; a plain process has none.
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      model_parameters=None if optimizer is not None else trainable, config=cfg)
    return engine, user, notes


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
    """One sweep step on a DeepSpeed engine (any ZeRO stage).

    Args:
        engine: the ``DeepSpeedEngine``.
        criterion: ``criterion(output, targets)``, or None when the model returns its loss.
        device: where batches go.
        causal_lm: the model is a Hugging Face causal LM (labels can be made from input_ids).
        ctx: this rank's place in the job.
    """

    def __init__(self, engine: Any, *, criterion: Criterion | None, device: torch.device, causal_lm: bool,
                 ctx: D.DistContext) -> None:
        self.engine, self.criterion, self.device, self.causal_lm, self.ctx = engine, criterion, device, causal_lm, ctx
        self.dtype = engine_dtype(engine)
        self._ratios = group_lr_ratios(engine.optimizer)
        self._stats = torch.zeros(NUM_STATS, dtype=torch.float64, device=device)
        self.micro_batch_size: int | None = None

    @property
    def accumulation_steps(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    def set_lr(self, lr: float) -> None:
        for group, ratio in zip(self.engine.optimizer.param_groups, self._ratios):
            group["lr"] = lr * ratio

    def train_step(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        """DeepSpeed's forward, backward and step over one optimizer step's micro-batches."""
        engine = self.engine
        if not engine.training:
            engine.train()
        skipped_before = engine.skipped_steps
        loss_sum: torch.Tensor | None = None
        items_sum: int | torch.Tensor = 0
        for raw in micro_batches:
            batch = prepare_batch(raw, self.device, causal_lm=self.causal_lm, has_criterion=self.criterion is not None)
            batch = cast_floating_inputs(batch, self.dtype, has_criterion=self.criterion is not None)
            items = count_items(batch, causal_lm=self.causal_lm)
            if self.micro_batch_size is None:  # the first batch: checked once, not every step
                check_batch_fits(engine.module, batch, self.criterion)
                self.micro_batch_size = count_samples(batch)
            loss = compute_loss(engine, batch, self.criterion)
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()          # applies the update only at the accumulation boundary
            weighted = loss.detach().float() * items
            loss_sum = weighted if loss_sum is None else loss_sum + weighted
            items_sum = items_sum + items
        stats = self._stats
        stats[LOSS_SUM].copy_(loss_sum)
        stats[ITEMS] = items_sum
        # fp16: DeepSpeed's loss scaler skips a step that overflowed; it is no point on the curve.
        stats[SKIPPED] = float(engine.skipped_steps > skipped_before)
        return stats

    def make_snapshot(self, mode: SnapshotMode, directory: Path, sampler: Any | None) -> DeepSpeedSnapshot:
        return DeepSpeedSnapshot(self.engine, mode, directory, self.ctx, sampler=sampler)


class DeepSpeedSnapshot:
    """What a DeepSpeed engine must get back: partitions, optimizer state, counters, RNG.

    The engine's own LR scheduler is taken off the engine for the sweep (``engine.step()``
    would step it and overwrite the sweep's LR) and put back, with its state, on restore.
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
            error = None
            try:
                self._check_space()
            except OSError as err:
                error = err
            D.raise_if_any_failed(self.ctx, error)
            engine.save_checkpoint(str(self.directory), tag=CHECKPOINT_TAG, save_latest=False)
        saved["rng"] = RNGState.capture()
        engine.lr_scheduler = None
        self._saved = saved

    def _check_space(self) -> None:
        # This rank's parameter data, times four: the fp32 master and two optimizer moments too.
        need = sum(t.numel() * t.element_size() for t in self._local_tensors().values()) * 4
        check_free_space(self.directory.parent, need)

    def restore(self) -> None:
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

        Collective for ``snapshot="disk"``: every rank must call this, in the same order.
        """
        self.store.clear()
        # Every rank reaches the barrier, also one whose take() failed (see LRFinder._take_snapshot).
        if self.mode == "disk":
            if self.ctx.distributed:
                dist.barrier()
            if self.ctx.is_main:
                shutil.rmtree(self.directory, ignore_errors=True)
        self._saved = None
