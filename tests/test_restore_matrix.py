"""Exact restore, as a matrix: every exit path x every backend x both snapshot stores.

Backends: one process, DDP, FSDP2 (each rank keeps and restores its own shards), ZeRO-1/2/3.

After the range test, each rank's parameters, buffers, gradients, optimizer state and param-group
settings, LR scheduler, GradScaler (DeepSpeed: partitions, fp32 masters, loss scaler and step
counters), train/eval flags and RNG streams are bit-identical to what they were before it.

The single-process cells run in this process; each distributed backend gets its own 2-rank
torchrun launch, so that one crash cannot take down another backend's cells. The cell itself
is ``cell`` below, the same code in every case.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from distlr import LRFinder
from helpers import (RANK, Boom, Faulty, RegressionNet, Scenarios, deepspeed_engine, ds_config, engine_digest, launch,
                     read_ranks, regression_data, state_digest, warm_up)

pytestmark = pytest.mark.timeout(600)
MODULE = "test_restore_matrix"
EXITS = ("normal_end", "divergence", "exception", "keyboard_interrupt", "nan_one_rank")
BACKENDS = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
SNAPSHOTS = ("memory", "disk")
FAULTS = {"exception": "boom", "keyboard_interrupt": "interrupt", "nan_one_rank": "nan"}
EXPECTED_OUTCOME = {"normal_end": "completed", "divergence": "diverged", "exception": "Boom",
                    "keyboard_interrupt": "KeyboardInterrupt", "nan_one_rank": "non_finite"}
scenarios = Scenarios()


@scenarios
def cell(out: Path, backend: str, exit_path: str, snapshot: str) -> dict:
    """One cell: train a little, snapshot-sweep-restore, compare bits.

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
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # Each Linear its own unit, then the root: the BatchNorm's parameters sit in the root's.
        for layer in inner.body:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    if backend in ("single", "ddp", "fsdp2"):
        optimizer = torch.optim.AdamW([
            {"params": inner.body[0].parameters(), "lr": 1e-3},
            {"params": list(inner.body[1].parameters()) + list(inner.body[4].parameters()), "lr": 5e-4,
             "betas": (0.8, 0.9)},
        ])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
        # Through the FSDP2 root, whose hooks gather the parameters it holds (the BatchNorm's).
        warm_up(model if backend == "fsdp2" else inner, optimizer, loader)
        scheduler.step()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        inner.eval()  # the range test trains; the user's eval mode must come back
        finder = LRFinder(model, loader, optimizer, nn.MSELoss(), device="cpu", lr_scheduler=scheduler,
                          grad_scaler=scaler, snapshot=snapshot, snapshot_dir=snap_dir)

        def digest() -> str:
            return state_digest(inner, optimizer) + repr(scheduler.state_dict()) + repr(scaler.state_dict())
    else:
        # The user's own engine, trained a little, so it has optimizer state to get back.
        engine = deepspeed_engine(model, ds_config(int(backend[-1]), optimizer={"type": "AdamW", "params": {"lr": 1e-3}}))
        for x, y in list(loader)[:3]:
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
        inner.eval()
        finder = LRFinder(engine, loader, criterion=nn.MSELoss(), device="cpu", snapshot=snapshot,
                          snapshot_dir=snap_dir)

        def digest() -> str:
            return engine_digest(engine) + repr([m.training for m in inner.modules()])
    if fault:
        model.calls = 0
    torch.manual_seed(100 + RANK)
    np.random.seed(100 + RANK)
    random.seed(100 + RANK)
    before = digest()
    max_lr = 1e3 if exit_path == "divergence" else 1e-2
    with finder:
        try:
            # The exit paths of the ladder itself (the extended range restores the same way:
            # tests/test_extension.py).
            result = finder.find(min_lr=1e-5, max_lr=max_lr, num_steps=12, smooth_factor=0.5,
                                 extend_range=False).to_dict()
            outcome = result["stop_reason"]
        except (Boom, KeyboardInterrupt) as err:
            result, outcome = None, type(err).__name__
    if dist.is_initialized():
        dist.barrier()  # every rank has cleaned up before anyone looks
    return {"before": before, "after": digest(), "outcome": outcome, "result": result,
            "left_on_disk": sorted(os.listdir(snap_dir)) if snap_dir.exists() else []}


def cells(backend: str) -> list[str]:
    return [f"cell:{backend}:{e}:{s}" for e in EXITS for s in SNAPSHOTS]


@pytest.fixture(scope="module", params=BACKENDS)
def backend_cells(request, tmp_path_factory) -> tuple[str, dict[str, list[dict]]]:
    """Every cell of one backend, one record per rank: {"cell:ddp:exception:disk": [rank0, rank1], ...}."""
    backend = request.param
    out = tmp_path_factory.mktemp(f"matrix-{backend}")
    if backend == "single":
        return backend, {spec: [cell(out, *spec.split(":")[1:])] for spec in cells(backend)}
    job = launch(MODULE, out, cells(backend), timeout=300)
    assert job.returncode == 0, job.explain()
    return backend, {spec: read_ranks(out, spec) for spec in cells(backend)}


@pytest.mark.parametrize("snapshot", SNAPSHOTS)
@pytest.mark.parametrize("exit_path", EXITS)
def test_state_is_bit_identical_after_the_sweep(backend_cells, exit_path, snapshot):
    backend, records = backend_cells
    ranks = records[f"cell:{backend}:{exit_path}:{snapshot}"]
    for rank, record in enumerate(ranks):
        assert record["outcome"] == EXPECTED_OUTCOME[exit_path], f"rank {rank}"
        assert record["after"] == record["before"], f"rank {rank}: the state differs after {exit_path}"
        assert record["left_on_disk"] == [], f"rank {rank}: the snapshot left {record['left_on_disk']}"
    if len(ranks) > 1:
        assert ranks[0]["before"] != ranks[1]["before"]  # each rank has its own state to get back
        assert ranks[0]["result"] == ranks[1]["result"]  # and every rank got the same result
    if exit_path == "nan_one_rank":
        # NaN on the last rank at its 7th forward: every rank stops at step 6.
        assert all(r["result"]["diverged_at"] == 6 and len(r["result"]["losses"]) == 7 for r in ranks)
