"""Scenarios that every rank of a torchrun job runs; each rank writes what it saw as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_worker.py OUT scenario ...

Several scenarios share one launch (a launch costs seconds of imports). test_distributed.py
starts the launches and compares what the ranks wrote.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from helpers import RegressionNet, engine_digest, regression_data, state_digest, warm_up
from distlr import LRFinder

RANK = int(os.environ.get("RANK", 0))
FINDERS: list[LRFinder] = []


def keep(finder: LRFinder) -> LRFinder:
    """Keep finders alive to the end: the first one made the process group and closes it last."""
    FINDERS.append(finder)
    return finder
EQUIV = dict(min_lr=1e-3, max_lr=50.0, num_steps=40, smooth_factor=0.5, divergence_threshold=4.0)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(-1), y)


def equivalence_run(batch_size: int) -> dict:
    """The same model, data and sweep; with N ranks each reads batch_size of the N * batch_size."""
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=batch_size, shuffle=False)
    finder = keep(LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu"))
    return finder.find(**EQUIV).to_dict()


class Boom(Exception):
    """The exception the matrix injects into the model."""


class Faulty(nn.Module):
    """Passes through to ``inner``; at forward call ``at``, on ``rank`` (None: every rank), it
    raises (``"raise"``: RuntimeError, ``"boom"``: Boom, ``"interrupt"``: KeyboardInterrupt),
    returns NaN (``"nan"``) or kills its own process (``"sigkill"``)."""

    def __init__(self, inner: nn.Module, *, rank: int | None, at: int, mode: str) -> None:
        super().__init__()
        self.inner, self.rank, self.at, self.mode, self.calls = inner, rank, at, mode, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        if (self.rank is None or RANK == self.rank) and self.calls == self.at:
            if self.mode == "raise":
                raise RuntimeError(f"injected failure on rank {RANK} at forward call {self.calls}")
            if self.mode == "boom":
                raise Boom(f"injected failure at forward call {self.calls}")
            if self.mode == "interrupt":
                raise KeyboardInterrupt
            if self.mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "stall":
                time.sleep(600)
            return out * math.nan
        return out


def scenario_equivalence() -> dict:
    return equivalence_run(batch_size=8)


def scenario_injected() -> dict:
    """Each rank's loss is offset by 0.01 * (rank + 1): the recorded loss must be their mean."""
    local: list[float] = []

    def offset_loss(out, y):
        loss = mse(out, y) + 0.01 * (RANK + 1)
        local.append(loss.item())
        return loss

    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=True)
    finder = keep(LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), offset_loss, device="cpu"))
    result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=15)
    return {"result": result.to_dict(), "local": local}


def scenario_raise() -> dict:
    model = Faulty(mlp(), rank=1, at=3, mode="raise")
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    keep(LRFinder(model, loader, criterion=mse, device="cpu")).find(min_lr=1e-4, max_lr=1e-2, num_steps=20)
    return {}


def scenario_fault(mode: str, timeout: str = "300") -> dict:
    """Rank 1 fails at its third forward: ``sigkill`` kills it, ``stall`` hangs it."""
    model = Faulty(mlp(), rank=1, at=3, mode=mode)
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    keep(LRFinder(model, loader, criterion=mse, device="cpu", dist_timeout=float(timeout))).find(
        min_lr=1e-4, max_lr=1e-2, num_steps=20)
    return {}


def scenario_short_shard() -> dict:
    """Rank 0 reads 20 batches, rank 1 only 3 (a loader distlr cannot re-shard): no hang."""
    batches = list(DataLoader(regression_data(n=1536), batch_size=8))
    mine = batches[:20] if RANK == 0 else batches[20:23]
    model = mlp()
    finder = keep(LRFinder(model, mine, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu"))
    return finder.find(min_lr=1e-4, max_lr=1e-1, num_steps=12).to_dict()


def scenario_bad_inputs(out: Path) -> dict:
    """Every rank tries the same bad inputs (and some that are bad on rank 1 only); each must
    fail before any training step, with the same error on every rank, and nothing may hang."""
    import logging

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("distlr").addHandler(handler)
    loader = DataLoader(regression_data(n=256), batch_size=8)
    bad_json = out / "bad.json"
    if RANK == 0:
        bad_json.write_text('{"zero_optimization": {"stage": 1},}')

    def finder(**kwargs):
        model = mlp()
        return keep(LRFinder(model, loader, kwargs.pop("optimizer", torch.optim.SGD(model.parameters(), lr=0.1)),
                             kwargs.pop("criterion", mse), device="cpu", **kwargs))

    small = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1},
             "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    cases = {
        "find_min_lr": lambda: finder().find(min_lr=-1.0),
        "find_num_steps_on_rank1": lambda: finder().find(num_steps=1 if RANK == 1 else 10),
        "criterion_on_rank1": lambda: finder(criterion="mse" if RANK == 1 else mse),
        "ds_missing_file": lambda: finder(optimizer=None, deepspeed_config="missing/ds_config.json"),
        "ds_bad_json": lambda: finder(optimizer=None, deepspeed_config=str(bad_json)),
        "ds_auto_unresolved": lambda: finder(optimizer=None, deepspeed_config={
            "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}),
        "ds_optimizer_type": lambda: finder(optimizer=None, deepspeed_config={**small, "optimizer": {"type": "Lamb"}}),
        "ds_accumulation": lambda: finder(optimizer=None, deepspeed_config=small).find(accumulation_steps=4),
        "ds_amp": lambda: finder(optimizer=None, deepspeed_config=small).find(amp="bf16"),
        "ds_clipping": lambda: finder(optimizer=None, deepspeed_config=small).find(max_grad_norm=0.5),
        "ds_misspelled_key": lambda: finder(optimizer=None, deepspeed_config={**small, "gradient_cliping": 1.0}),
        "disk_full_on_rank1": lambda: short_of_space(
            lambda: finder(snapshot="disk", snapshot_dir=out / "snap-ddp").find(num_steps=5)),
        "ds_disk_full_on_rank1": lambda: short_of_space(
            lambda: finder(optimizer=None, deepspeed_config=small, snapshot="disk",
                           snapshot_dir=out / "snap-ds").find(num_steps=5)),
    }

    def short_of_space(run):
        """Rank 1's disk is (made to look) full; every rank must fail alike and leave no files."""
        import shutil
        from collections import namedtuple

        real = shutil.disk_usage
        if RANK == 1:
            shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(1 << 30, 1 << 30, 1 << 10)
        try:
            run()
        finally:
            shutil.disk_usage = real
    if dist.is_initialized():
        dist.barrier()
    record = {}
    for name, case in cases.items():
        try:
            case()
            record[name] = None
        except Exception as err:  # noqa: BLE001 - the error is what is recorded
            record[name] = f"{type(err).__name__}: {err}"
    record["warnings"] = warnings
    if dist.is_initialized():
        dist.barrier()
    record["left_on_disk"] = sorted(str(p.relative_to(out)) for d in ("snap-ddp", "snap-ds")
                                    if (out / d).exists() for p in (out / d).rglob("*"))
    # After all that, the ranks are still in step: a normal sweep works and agrees.
    record["after"] = finder().find(**EQUIV).to_dict()
    return record


def scenario_collectives() -> dict:
    """Count the collectives distlr issues from Python (DDP's gradient all-reduce runs in C++
    and is not counted): per step exactly one all-reduce and one broadcast."""
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in
                 ("all_reduce", "broadcast", "all_gather_object", "broadcast_object_list", "barrier")}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    finder = keep(LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), mse, device="cpu"))
    per_run = {}
    for steps in (10, 30):
        counts.clear()
        for name in originals:
            setattr(dist, name, counting(name))
        try:
            finder.find(min_lr=1e-5, max_lr=1e-3, num_steps=steps)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        per_run[steps] = dict(counts)
    return per_run


def scenario_user_group_and_sampler() -> dict:
    """The user made the process group and the DistributedSampler: distlr uses both as they are."""
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dataset = regression_data(n=1536)
    world = dist.get_world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=RANK, shuffle=False)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    model = mlp()
    with LRFinder(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), mse, device="cpu") as finder:
        same_loader = finder.train_dataloader is loader
        result = finder.find(**EQUIV)
    # close() (the with block) must leave the user's group alone.
    return {"result": result.to_dict(), "same_loader": same_loader, "group_alive": dist.is_initialized()}


def ds_config(stage: int, *, bf16: bool = False, optimizer: dict | None = None, **extra) -> dict:
    # stage3_param_persistence_threshold 0: small parameters are really partitioned under ZeRO-3.
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": bf16}, "steps_per_print": 10**9,
              "optimizer": optimizer or {"type": "SGD", "params": {"lr": 0.1}}}
    config.update(extra)
    return config


def scenario_ds_curve(stage: str) -> dict:
    """The DDP equivalence sweep under ZeRO-N (fp32, plain SGD): the curve must match."""
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    # DeepSpeed clips at 1.0 unless told otherwise; the DDP reference does not clip.
    config = ds_config(int(stage), gradient_clipping=0.0)
    finder = keep(LRFinder(model, loader, criterion=mse, device="cpu", deepspeed_config=config))
    return finder.find(**EQUIV).to_dict()


def scenario_ds_gpt2_zero3() -> dict:
    """A Hugging Face GPT-2 under ZeRO-3 comes out with the weights it was built with."""
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    model.loss_type = "ForCausalLM"
    built = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 256, (64, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    config = ds_config(3, optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}})
    finder = keep(LRFinder(model, DataLoader(rows, batch_size=4), device="cpu", deepspeed_config=config))
    engine = finder._engine
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        initialised = all(torch.equal(built[n], p) for n, p in engine.module.named_parameters())
        partitioned = [p.ds_tensor.numel() for p in engine.module.parameters()][:3]
    before = engine_digest(engine)
    result = finder.find(min_lr=1e-5, max_lr=1.0, num_steps=12)
    return {"result": result.to_dict(), "initialised": initialised, "restored": before == engine_digest(engine),
            "partition_sizes": partitioned, "full_sizes": [v.numel() for v in list(built.values())[:3]]}


def scenario_ds_auto(out: Path) -> dict:
    """A Hugging Face-style config full of "auto"; the tuned copy must load back into DeepSpeed."""
    import deepspeed

    config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": 5000}},
        "zero_optimization": {"stage": 2, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
    }
    path = out / "ds_auto.json"
    if RANK == 0:
        path.write_text(json.dumps(config))
    dist.barrier() if dist.is_initialized() else None
    model = mlp()
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    finder = keep(LRFinder(model, loader, criterion=mse, device="cpu", deepspeed_config=str(path)))
    result = finder.find(min_lr=1e-4, max_lr=10.0, num_steps=60, smooth_factor=0.5)  # 30 steps: too few for a clear descent
    tuned = result.deepspeed_config
    lrs = None
    if tuned is not None:
        fresh = mlp()
        engine, *_ = deepspeed.initialize(model=fresh, model_parameters=fresh.parameters(),
                                          config={**tuned, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
                                                  "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                                                  "bf16": {"enabled": False},
                                                  "optimizer": {**tuned["optimizer"], "params": {"lr": tuned["optimizer"]["params"]["lr"]}}})
        lrs = []
        for _ in range(3):
            lrs.append(engine.get_lr()[0])
            engine.lr_scheduler.step()
        lrs.append(engine.lr_scheduler.get_lr()[0])
    return {"result": result.to_dict(), "tuned": tuned, "lrs": lrs, "file_after": json.loads(path.read_text())}


def scenario_ds_user_engine() -> dict:
    """The user's own engine, with its own LR scheduler: set aside for the sweep, then back."""
    import deepspeed

    model = mlp()
    config = ds_config(2, gradient_clipping=0.0,
                       scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.05,
                                                                  "warmup_num_steps": 10}})
    config.pop("optimizer")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                      config={**config, "zero_allow_untested_optimizer": True})
    loader = DataLoader(regression_data(n=1536), batch_size=8, shuffle=False)
    for x, y in list(loader)[:3]:
        engine.backward(mse(engine(x), y))
        engine.step()
    scheduler = engine.lr_scheduler
    lr_before, sched_before = engine.get_lr(), dict(scheduler.state_dict())
    before = engine_digest(engine)
    finder = keep(LRFinder(engine, loader, criterion=mse, device="cpu"))
    result = finder.find(**EQUIV)
    return {"result": result.to_dict(), "restored": engine_digest(engine) == before,
            "same_scheduler": engine.lr_scheduler is scheduler,
            "scheduler_state_same": dict(scheduler.state_dict()) == sched_before,
            "lr_same": engine.get_lr() == lr_before}


MATRIX_EXITS = ("normal_end", "divergence", "exception", "keyboard_interrupt", "nan_one_rank")
MATRIX_BACKENDS = ("single", "ddp", "zero1", "zero2", "zero3")
MATRIX_SNAPSHOTS = ("memory", "disk")
FAULTS = {"exception": "boom", "keyboard_interrupt": "interrupt", "nan_one_rank": "nan"}


def scenario_matrix(out: Path, backend: str, exit_path: str, snapshot: str) -> dict:
    """One cell of the restore matrix: train a little, snapshot-sweep-restore, compare bits.

    The state compared: parameters, buffers (BatchNorm), gradients, optimizer state and
    param-group settings (two groups), LR scheduler, GradScaler, DeepSpeed partitions and
    counters, and the Python, NumPy and torch RNG streams (seeded per rank).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.manual_seed(0)
    inner = RegressionNet()
    fault = FAULTS.get(exit_path)
    # Exceptions hit every rank on the same step; NaN hits one rank only (the last).
    fault_rank = world - 1 if exit_path == "nan_one_rank" else None
    model = Faulty(inner, rank=fault_rank, at=7, mode=fault) if fault else inner
    loader = DataLoader(regression_data(), batch_size=8, shuffle=True)
    snap_dir = out / f"matrix-{backend}-{exit_path}-{snapshot}"
    if backend in ("single", "ddp"):
        optimizer = torch.optim.AdamW([
            {"params": inner.body[0].parameters(), "lr": 1e-3},
            {"params": list(inner.body[1].parameters()) + list(inner.body[4].parameters()), "lr": 5e-4,
             "betas": (0.8, 0.9)},
        ])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
        warm_up(inner, optimizer, loader)
        scheduler.step()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        inner.eval()  # the sweep trains; the user's eval mode must come back
        finder = keep(LRFinder(model, loader, optimizer, nn.MSELoss(), device="cpu", lr_scheduler=scheduler,
                               grad_scaler=scaler, snapshot=snapshot, snapshot_dir=snap_dir))

        def digest() -> str:
            return state_digest(inner, optimizer) + repr(scheduler.state_dict()) + repr(scaler.state_dict())
    else:
        config = ds_config(int(backend[-1]), optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
        finder = keep(LRFinder(model, loader, criterion=nn.MSELoss(), device="cpu", deepspeed_config=config,
                               snapshot=snapshot, snapshot_dir=snap_dir))
        engine = finder._engine
        for x, y in list(loader)[:3]:
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
        inner.eval()

        def digest() -> str:
            return engine_digest(engine) + repr([m.training for m in inner.modules()])
    if fault:
        model.calls = 0
    torch.manual_seed(100 + RANK)
    np.random.seed(100 + RANK)
    random.seed(100 + RANK)
    before = digest()
    max_lr = 1e3 if exit_path == "divergence" else 1e-2
    try:
        result = finder.find(min_lr=1e-5, max_lr=max_lr, num_steps=12, smooth_factor=0.5).to_dict()
        outcome = result["stop_reason"]
    except (Boom, KeyboardInterrupt) as err:
        result, outcome = None, type(err).__name__
    if dist.is_initialized():
        dist.barrier()  # every rank has cleaned up before anyone looks
    return {"before": before, "after": digest(), "outcome": outcome, "result": result,
            "left_on_disk": sorted(os.listdir(snap_dir)) if snap_dir.exists() else []}


def main() -> None:
    out = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        name, *args = spec.split(":")
        fn = globals()[f"scenario_{name}"]
        wants_out = "out" in fn.__code__.co_varnames[: fn.__code__.co_argcount]
        record = fn(out, *args) if wants_out else fn(*args)
        (out / f"{spec.replace(':', '-')}.rank{RANK}.json").write_text(json.dumps(record))
    for finder in reversed(FINDERS):  # the group's maker last, after every DDP wrapper is gone
        finder.close()
    # Whether a process group is still up: distlr must tear down only the groups it made.
    (out / f"final.rank{RANK}.json").write_text(json.dumps({"group_alive": dist.is_initialized()}))


if __name__ == "__main__":
    main()
