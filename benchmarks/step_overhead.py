"""Step overhead: LRFinder construction + find() against a bare training loop doing the same
forward, backward, optimizer step and LR change on the same model and batches.

    python benchmarks/step_overhead.py                # one process
    python benchmarks/step_overhead.py --ddp 2        # DDP over gloo, 2 ranks (launches torchrun)

The distlr figure includes everything find() does: snapshot, the sweep with its per-step
reduction and stop decision, suggestion and restore. Divergence is switched off so both run
every step. Goal: ratio <= 1.02.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lm_batches, machine, mlp, n_params, paired, regression_batches, table, tiny_gpt  # noqa: E402

from distlr import LRFinder  # noqa: E402

STEPS = 100


def bare_loop(model: nn.Module, batches: list, optimizer: torch.optim.Optimizer, criterion, lrs: list[float]) -> None:
    """What a user's own loop does per step: set the LR, zero, forward, backward, step, read the loss."""
    for i, lr in enumerate(lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        if criterion is None:
            labels = batch["input_ids"]
            loss = model(**batch, labels=labels).loss
        else:
            loss = criterion(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        loss.item()


CASES = {
    "mlp-1M (batch 64)": lambda: (mlp(1), regression_batches(50, 64), nn.MSELoss()),
    "mlp-8M (batch 64)": lambda: (mlp(8), regression_batches(50, 64), nn.MSELoss()),
    "demo GPT (batch 16x64)": lambda: (tiny_gpt(), lm_batches(50, 16, 64), None),
}


def measure(name: str, repeats: int, ddp: bool) -> list[object]:
    torch.manual_seed(0)
    model, batches, criterion = CASES[name]()
    if ddp:
        rank, world = dist.get_rank(), dist.get_world_size()
        batches = batches[rank::world] or batches
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lrs = [1e-6 * (1e-2 / 1e-6) ** (i / (STEPS - 1)) for i in range(STEPS)]

    def setup() -> None:  # untimed: the same starting point for both
        model.load_state_dict(initial)
        optimizer.state.clear()

    def baseline() -> None:
        trained = nn.parallel.DistributedDataParallel(model) if ddp else model
        bare_loop(trained, batches, optimizer, criterion, lrs)

    def with_distlr() -> None:
        finder = LRFinder(model, batches, optimizer, criterion, device="cpu")
        finder.find(min_lr=lrs[0], max_lr=lrs[-1], num_steps=STEPS, divergence_threshold=math.inf)

    times, ratio, low, high = paired({"bare": baseline, "distlr": with_distlr}, repeats, setup)
    return [name, f"{n_params(model) / 1e6:.1f} M", f"{times['bare'] / STEPS * 1e3:.2f}",
            f"{times['distlr'] / STEPS * 1e3:.2f}", f"{ratio:.3f}", f"{low:.3f} - {high:.3f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddp", type=int, default=0, help="ranks for the DDP run (launches torchrun)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("distlr").setLevel(logging.ERROR)  # the per-rank batch lists are sharded by hand
    if args.ddp and not args.worker:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ddp}",
               __file__, "--worker", "--ddp", str(args.ddp), "--repeats", str(args.repeats), "--cases", args.cases]
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ddp))}))
    if args.worker:
        dist.init_process_group("gloo")
    else:
        # One thread: on a 2-core VM, OpenMP's spinning second thread makes run-to-run noise
        # larger than the effect being measured.
        torch.set_num_threads(1)
    names = [name.strip() for name in args.cases.split(",")]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    rows = [measure(name, args.repeats, bool(args.ddp)) for name in names]
    if not args.worker or dist.get_rank() == 0:
        print(f"# step overhead, {'DDP %d ranks (gloo)' % args.ddp if args.ddp else 'one process'}, "
              f"{STEPS} steps, {args.repeats} back-to-back pairs (order alternating)\n# {machine()}")
        print(table(["model", "params", "bare ms/step", "distlr ms/step", "ratio (median of pairs)",
                     "ratio 25-75 %"], rows))
    if args.worker:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
