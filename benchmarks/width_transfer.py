"""Will my LR transfer, and what does a series cost? Width series of the two MLPs
tests/test_series_axes.py checks: a standard one (SGD with momentum) and a muP one (mup's
MuReadout and MuAdamW), widths 64 to 1,024, two repeats each, global batch 256. Each round
times the series against a baseline measured beside it: the same six range tests as six
separate ``LRFinder(...).find()`` calls on models made by hand. Prints the table of each series
and the timings, and draws docs/width-standard.png and docs/width-mup.png (round 1).

    torchrun --standalone --nproc_per_node=2 benchmarks/width_transfer.py [--out docs] [--rounds 3]
    .venv/bin/python benchmarks/width_transfer.py          # one process, the same global batch
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_series_axes import RANGE, WIDTHS, mup_mlp, standard_mlp, teacher_task  # noqa: E402

from distlr import LRFinder  # noqa: E402
from distlr.output.plot import plot_series  # noqa: E402
from distlr.output.summary import series_summary  # noqa: E402

GLOBAL_BATCH = 256
REPEATS = 2


def timed_series(factory, batch_size: int):
    model, optimizer = factory(WIDTHS[0])
    loader = DataLoader(teacher_task(), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    with LRFinder(model, loader, optimizer, criterion=nn.MSELoss()) as finder:
        series = finder.series(widths=WIDTHS, model_factory=factory, repeats=REPEATS, target_width=4096, **RANGE,
                               progress=False)
    return series, time.perf_counter() - start


def timed_separately(factory, batch_size: int) -> float:
    """The baseline: each (width, repeat) as its own finder on a model and loader made by hand,
    seeded as the series seeds them."""
    start = time.perf_counter()
    for width in WIDTHS:
        for repeat in range(REPEATS):
            torch.manual_seed(repeat)
            model, optimizer = factory(width)
            loader = DataLoader(teacher_task(), batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(repeat))
            with LRFinder(model, loader, optimizer, criterion=nn.MSELoss(), data_seed=repeat) as finder:
                finder.find(**RANGE, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    main_rank = not distributed or dist.get_rank() == 0
    rows = []
    for round_ in range(1, options.rounds + 1):
        for name, factory in (("standard", standard_mlp), ("mup", mup_mlp)):
            series, total = timed_series(factory, GLOBAL_BATCH // world)
            separate = timed_separately(factory, GLOBAL_BATCH // world)
            rows.append((name, round_, total, separate))
            if main_rank and round_ == 1:
                print(f"== {name} MLP, {world} rank(s), global batch {GLOBAL_BATCH}\n{series_summary(series)}\n")
                plot_series(series, Path(options.out) / f"width-{name}.png")
    if main_rank:
        print("| MLP | round | series (s) | the same range tests, one finder each (s) | ratio |\n|---|---|---|---|---|")
        for name, round_, total, separate in rows:
            print(f"| {name} | {round_} | {total:.1f} | {separate:.1f} | {total / separate:.2f} |")
        for name in ("standard", "mup"):
            ratios = [t / s for n, _, t, s in rows if n == name]
            print(f"{name}: ratio median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
