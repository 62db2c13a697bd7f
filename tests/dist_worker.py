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

from helpers import RegressionNet, regression_data, state_digest, warm_up
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


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        fn = globals()[f"scenario_{name}"]
        record = fn(out) if "out" in fn.__code__.co_varnames[: fn.__code__.co_argcount] else fn()
        (out / f"{name}.rank{RANK}.json").write_text(json.dumps(record))
    for finder in reversed(FINDERS):  # the group's maker last, after every DDP wrapper is gone
        finder.close()
    # Whether a process group is still up: distlr must tear down only the groups it made.
    (out / f"final.rank{RANK}.json").write_text(json.dumps({"group_alive": dist.is_initialized()}))


if __name__ == "__main__":
    main()
