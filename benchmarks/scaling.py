"""How the sweep's cost grows: with the number of steps (one process) and with the world size
(1, 2 and 4 ranks under torchrun, gloo), and what the end-of-run result broadcast costs.

    python benchmarks/scaling.py

Per-rank batch is fixed (weak scaling), each figure is the median of several interleaved
runs, and each world size is compared with a bare DDP loop measured in the same job. Note the
machine: 2 CPU cores, so 4 ranks share 2 cores and every figure at 4 ranks is oversubscribed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, mlp, paired, regression_batches, table  # noqa: E402
from step_overhead import bare_loop  # noqa: E402

from distlr import LRFinder  # noqa: E402
from distlr.dist import collectives as D  # noqa: E402


def sweep_seconds(steps: int, repeats: int, ddp: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model, batches = mlp(1), regression_batches(40, 32, seed=dist.get_rank() if ddp else 0)
    initial = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lrs = [1e-6 * (1e-2 / 1e-6) ** (i / (steps - 1)) for i in range(steps)]

    def setup() -> None:
        model.load_state_dict(initial)
        optimizer.state.clear()

    def bare() -> None:
        bare_loop(nn.parallel.DistributedDataParallel(model) if ddp else model, batches, optimizer, nn.MSELoss(), lrs)

    def ours() -> None:
        LRFinder(model, batches, optimizer, nn.MSELoss(), device="cpu").find(
            min_lr=lrs[0], max_lr=lrs[-1], num_steps=steps, divergence_threshold=math.inf)

    times, ratio, _, _ = paired({"bare": bare, "distlr": ours}, repeats, setup)
    return times["bare"], times["distlr"], ratio


def worker(steps: int, repeats: int) -> None:
    dist.init_process_group("gloo")
    bare, ours, ratio = sweep_seconds(steps, repeats, ddp=True)
    ctx = D.DistContext(dist.get_rank(), 0, dist.get_world_size())
    result = LRFinder(mlp(0.1), regression_batches(4, 8), criterion=nn.MSELoss(), device="cpu").find(num_steps=100)
    samples = []
    for _ in range(20):
        dist.barrier()
        start = time.perf_counter()
        D.broadcast_object(ctx, result if ctx.is_main else None)
        samples.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"bare": bare, "distlr": ours, "ratio": ratio, "broadcast": statistics.median(samples),
                          "result_bytes": len(result.to_json())}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("distlr").setLevel(logging.ERROR)
    if args.worker:
        worker(args.worker, args.repeats)
        return
    rows = []
    torch.set_num_threads(1)  # as in step_overhead.py: OpenMP spinning on 2 cores is noise
    for steps in (25, 50, 100, 200, 400):
        bare, ours, ratio = sweep_seconds(steps, args.repeats, ddp=False)
        rows.append([steps, f"{bare:.2f}", f"{ours:.2f}", f"{ours / steps * 1e3:.2f}", f"{ratio:.3f}"])
    print(f"# cost vs number of steps (mlp-1M, batch 32, one process), median of {args.repeats}\n# {machine()}")
    print(table(["steps", "bare s", "distlr s", "distlr ms/step", "ratio (median of pairs)"], rows))
    rows = []
    for world in (1, 2, 4):
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={world}", __file__, "--worker", "50", "--repeats", str(args.repeats)],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"[{world} ranks failed, exit {proc.returncode}]\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append([world, 32 * world, "failed", "-", "-", "-"])
            continue
        r = json.loads(lines[-1])
        rows.append([world, 32 * world, f"{r['bare'] / 50 * 1e3:.2f}", f"{r['distlr'] / 50 * 1e3:.2f}",
                     f"{r['ratio']:.3f}", f"{r['broadcast'] * 1e3:.2f} ({r['result_bytes'] / 1024:.0f} KiB)"])
    print(f"\n# cost vs world size (mlp-1M, 32 samples per rank, 50 steps, torchrun + gloo), median of {args.repeats}")
    print(table(["ranks", "global batch", "bare DDP ms/step", "distlr ms/step", "ratio", "result broadcast ms"], rows))


if __name__ == "__main__":
    main()
