"""Where a sweep step's time goes, from a cProfile of find(): distlr's own Python, torch, the rest.

    python benchmarks/profile_step.py

Own time (tottime) of every function is summed by where the function lives. A model whose
step costs almost nothing shows distlr's fixed cost per step plainly; the demo model shows it
against a real step. Host synchronisation: the only device-to-host read per step is
``Tensor.tolist`` of the packed statistics on rank 0 (the stop code's ``.item()`` on the other
ranks); the table counts them.
"""

from __future__ import annotations

import cProfile
import logging
import math
import pstats
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lm_batches, machine, regression_batches, table, tiny_gpt  # noqa: E402

from distlr import LRFinder  # noqa: E402

STEPS = 400


def profile(model: nn.Module, batches: list, criterion) -> list[object]:
    finder = LRFinder(model, batches, torch.optim.SGD(model.parameters(), lr=1e-3), criterion, device="cpu")
    finder.find(min_lr=1e-6, max_lr=1e-3, num_steps=10, divergence_threshold=math.inf)  # warm up
    prof = cProfile.Profile()
    prof.enable()
    finder.find(min_lr=1e-6, max_lr=1e-3, num_steps=STEPS, divergence_threshold=math.inf)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    groups = {"distlr (own Python)": 0.0, "torch (forward, backward, optimizer)": 0.0, "other": 0.0}
    syncs = 0
    for (filename, _, name), (_, ncalls, tottime, _, _) in stats.items():
        if "/distlr/" in filename:
            groups["distlr (own Python)"] += tottime
        elif "torch" in filename or filename == "~":
            groups["torch (forward, backward, optimizer)"] += tottime
        else:
            groups["other"] += tottime
        if name in ("<method 'tolist' of 'torch._C.TensorBase' objects>", "<method 'item' of 'torch._C.TensorBase' objects>"):
            syncs += ncalls
    total = sum(groups.values())
    return [*(f"{t / STEPS * 1e6:.0f} ({t / total:.0%})" for t in groups.values()), f"{syncs / STEPS:.2f}"]


def main() -> None:
    logging.getLogger("distlr").setLevel(logging.ERROR)
    torch.manual_seed(0)
    rows = [
        ["Linear(64, 1), batch 64", *profile(nn.Linear(64, 1), regression_batches(50, 64), nn.MSELoss())],
        ["demo GPT, batch 16x64", *profile(tiny_gpt(), lm_batches(50, 16, 64), None)],
    ]
    print(f"# one process, {STEPS} steps under cProfile (which inflates Python time), microseconds per step\n# {machine()}")
    print(table(["model", "distlr", "torch", "other", "host syncs / step"], rows))


if __name__ == "__main__":
    main()
