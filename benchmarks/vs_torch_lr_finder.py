"""distlr against torch-lr-finder on the same model, data and number of steps, one process.

    pip install --no-deps torch-lr-finder      # benchmark only; not a distlr dependency
    python benchmarks/vs_torch_lr_finder.py

Each run is its own process (so peak memory is that run's alone), alternating between the two
tools; the figure is the median of several runs. Time covers what a user waits for: finder
construction, the sweep and the restore of the model (torch-lr-finder's reset()). Memory is
the peak resident set above what the process held before the finder was made. Both run every
step (no early stop), from 1e-6 to 1e-2 with AdamW. Goal: distlr <= 0.9 x its time, <= its memory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 100


def one_run(tool: str, case: str) -> dict:
    sys.path.insert(0, str(HERE))
    import logging

    import torch
    from common import mlp, regression_batches, reset_peak_rss, rss_bytes
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("distlr").setLevel(logging.ERROR)
    torch.manual_seed(0)
    millions = {"mlp-1M": 1, "mlp-8M": 8, "mlp-32M": 32}[case]
    model = mlp(millions)
    batches = regression_batches(50, 64)
    dataset = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loader = DataLoader(dataset, batch_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    criterion = nn.MSELoss()
    import gc

    gc.collect()
    base = rss_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    if tool == "distlr":
        from distlr import LRFinder

        LRFinder(model, loader, optimizer, criterion, device="cpu").find(
            min_lr=1e-6, max_lr=1e-2, num_steps=STEPS, divergence_threshold=math.inf)
    else:
        from torch_lr_finder import LRFinder

        finder = LRFinder(model, optimizer, criterion, device="cpu")
        finder.range_test(loader, end_lr=1e-2, num_iter=STEPS, diverge_th=float("inf"))
        finder.reset()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": (rss_bytes("VmHWM") - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("TOOL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one)))
        return
    sys.path.insert(0, str(HERE))
    from common import machine, table

    rows = []
    for case in ("mlp-1M", "mlp-8M", "mlp-32M"):
        runs: dict[str, list[dict]] = {"torch-lr-finder": [], "distlr": []}
        for _ in range(args.repeats):
            for tool in runs:
                out = subprocess.run([sys.executable, __file__, "--one", tool, case], capture_output=True, text=True,
                                     check=True).stdout
                runs[tool].append(json.loads(out.strip().splitlines()[-1]))
        t = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        m = {k: statistics.median(r["peak_mib"] for r in v) for k, v in runs.items()}
        rows.append([case, f"{t['torch-lr-finder']:.2f}", f"{t['distlr']:.2f}", f"{t['distlr'] / t['torch-lr-finder']:.2f}",
                     f"{m['torch-lr-finder']:.0f}", f"{m['distlr']:.0f}", f"{m['distlr'] / max(m['torch-lr-finder'], 1):.2f}"])
    print(f"# distlr vs torch-lr-finder, {STEPS} steps, one process, median of {args.repeats} processes each\n# {machine()}")
    print(table(["model", "torch-lr-finder s", "distlr s", "time ratio", "torch-lr-finder peak MiB",
                 "distlr peak MiB", "memory ratio"], rows))


if __name__ == "__main__":
    main()
