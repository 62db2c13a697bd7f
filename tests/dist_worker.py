"""Scenarios that every rank of a torchrun job runs; each rank writes what it saw as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_worker.py OUT scenario ...

Several scenarios share one launch (a launch costs seconds of imports). test_distributed.py
starts the launches and compares what the ranks wrote.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

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


class Faulty(nn.Module):
    """Passes through to ``inner``; on rank ``rank`` at forward call ``at``: NaN output or a raise."""

    def __init__(self, inner: nn.Module, *, rank: int, at: int, mode: str) -> None:
        super().__init__()
        self.inner, self.rank, self.at, self.mode, self.calls = inner, rank, at, mode, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        if RANK == self.rank and self.calls == self.at:
            if self.mode == "raise":
                raise RuntimeError(f"injected failure on rank {RANK} at forward call {self.calls}")
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


def _restore_case(snapshot: str, out: Path, *, nan_at: int | None = None) -> dict:
    torch.manual_seed(0)
    inner = RegressionNet()
    model = Faulty(inner, rank=1, at=nan_at, mode="nan") if nan_at else inner
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    warm_up(inner, optimizer, loader)  # the optimizer has moments and step counts to restore
    snap_dir = out / f"snapshots-{snapshot}"
    finder = keep(LRFinder(model, loader, optimizer, nn.MSELoss(), device="cpu", snapshot=snapshot,
                           snapshot_dir=snap_dir))
    torch.manual_seed(100 + RANK)  # a rank-specific RNG state to come back to
    before = state_digest(inner, optimizer)
    result = finder.find(min_lr=1e-5, max_lr=1e-2, num_steps=12)
    after = state_digest(inner, optimizer)
    left = sorted(os.listdir(snap_dir)) if snap_dir.exists() else []
    return {"result": result.to_dict(), "before": before, "after": after, "left_on_disk": left}


def scenario_restore_memory(out: Path) -> dict:
    return _restore_case("memory", out)


def scenario_restore_disk(out: Path) -> dict:
    return _restore_case("disk", out)


def scenario_nan(out: Path) -> dict:
    return _restore_case("memory", out, nan_at=6)


def scenario_raise() -> dict:
    model = Faulty(mlp(), rank=1, at=3, mode="raise")
    loader = DataLoader(regression_data(n=1536), batch_size=8)
    keep(LRFinder(model, loader, criterion=mse, device="cpu")).find(min_lr=1e-4, max_lr=1e-2, num_steps=20)
    return {}


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


def scenario_ds_restore(out: Path, stage: str, dtype: str, snapshot: str) -> dict:
    """ZeRO-N with optimizer state (momentum), fp32 or bf16, memory or disk snapshot."""
    import deepspeed

    torch.manual_seed(0)
    # No BatchNorm here: DeepSpeed's bf16 mode leaves its running stats in fp32 and the forward fails.
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    config = ds_config(int(stage), bf16=dtype == "bf16",
                       optimizer={"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}})
    loader = DataLoader(regression_data(), batch_size=8, shuffle=True)
    snap_dir = out / f"ds-{stage}-{dtype}-{snapshot}"
    finder = keep(LRFinder(model, loader, criterion=mse_any, device="cpu", deepspeed_config=config,
                           snapshot=snapshot, snapshot_dir=snap_dir))
    engine = finder._engine
    for x, y in list(loader)[:3]:  # a few real steps: momentum buffers and counters to restore
        loss = mse_any(engine(x.to(engine_dtype(engine))), y)
        engine.backward(loss)
        engine.step()
    torch.manual_seed(100 + RANK)
    before = engine_digest(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full_before = [p.detach().clone() for p in engine.module.parameters()]
    result = finder.find(min_lr=1e-4, max_lr=1.0, num_steps=10)
    after = engine_digest(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full_same = all(torch.equal(a, p) for a, p in zip(full_before, engine.module.parameters()))
    left = sorted(os.listdir(snap_dir)) if snap_dir.exists() else []
    return {"result": result.to_dict(), "before": before, "after": after, "full_same": full_same,
            "left_on_disk": left, "optimizer": type(engine.optimizer).__name__}


def mse_any(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.float().squeeze(-1), y.float())


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


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
    result = finder.find(min_lr=1e-4, max_lr=10.0, num_steps=30, smooth_factor=0.5)
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
