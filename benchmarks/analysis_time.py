"""What the analysis after a sweep costs: every rule, the three numbers, the bootstrap
confidence and the range checks (``distlr.analysis.build_result``), and the check an extended
range makes before each step past max_lr (``distlr.suggest.still_open``), against one training
step of the demo model measured in the same run.

    .venv/bin/python benchmarks/analysis_time.py

Rank 0 runs the analysis once, after the sweep, so its cost is paid once per range test.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from distlr.core.analysis import build_result
from distlr.core.history import History
from distlr.core.options import RangeTestArgs
from distlr.core.rules import still_open
from distlr.cli.build import build_model
from distlr.cli.corpus import byte_tokens, demo_text

REPEATS = 15


def curve(n: int, seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    lrs = np.geomspace(1e-8, 1e-1, n)
    x = np.log10(lrs)
    losses = 2.0 + 3.0 / (1.0 + np.exp((x + 3.0) / 0.4)) + np.random.default_rng(seed).normal(0, 0.05, n)
    smoothed, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = 0.98 * avg + 0.02 * loss
        smoothed.append(avg / (1 - 0.98 ** (i + 1)))
    return lrs.tolist(), losses.tolist(), smoothed


def analysis_ms(n: int) -> list[float]:
    lrs, losses, smoothed = curve(n)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        build_result(History(lrs, losses, smoothed), RangeTestArgs(min_lr=lrs[0], max_lr=lrs[-1], num_steps=n))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def still_open_ms(n: int) -> list[float]:
    lrs, losses, _ = curve(n)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        still_open(lrs, losses)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def demo_step_ms() -> list[float]:
    torch.manual_seed(0)
    model = build_model("demo", seq_len=64)
    opt = torch.optim.AdamW(model.parameters())
    ids = byte_tokens(demo_text())[: 16 * 64].view(16, 64)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times[2:]  # the first steps warm up allocators


def main() -> None:
    torch.set_num_threads(1)
    step = demo_step_ms()
    step_med = statistics.median(step)
    print(f"one demo training step (batch 16 x 64 tokens, 1 thread): median {step_med:.1f} ms "
          f"(25-75 %: {np.percentile(step, 25):.1f}-{np.percentile(step, 75):.1f})\n")
    print("| points | analysis ms (median) | 25-75 % | x one demo step | still_open ms (each step past max_lr) |")
    print("|--:|--:|--:|--:|--:|")
    for n in (30, 100, 300, 1000):
        ms, check = analysis_ms(n), still_open_ms(n)
        med = statistics.median(ms)
        print(f"| {n} | {med:.1f} | {np.percentile(ms, 25):.1f}-{np.percentile(ms, 75):.1f} | "
              f"{med / step_med:.2f} | {statistics.median(check):.2f} |")
    assert math.isfinite(step_med)


if __name__ == "__main__":
    main()
