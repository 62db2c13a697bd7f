"""Shared pieces of the benchmarks: models, batches, timing, peak memory, tables.

Every figure is a ratio against a baseline measured in the same run, alternating with it
(baseline, distlr, distlr, baseline, ...), over several repetitions.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def mlp(params_millions: float, width: int = 1024) -> nn.Module:
    """An MLP of about ``params_millions`` million parameters (layers of ``width``)."""
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    body: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(layers):
        body += [nn.Linear(width, width), nn.ReLU()]
    body.append(nn.Linear(width, 1))
    return nn.Sequential(*body)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def regression_batches(n: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 64, generator=g), torch.randn(batch_size, 1, generator=g)) for _ in range(n)]


def lm_batches(n: int, batch_size: int, seq_len: int, vocab: int = 256, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def tiny_gpt() -> nn.Module:
    """The demo's model: GPT-2 style, 2 layers, 64 wide, byte vocabulary."""
    from distlr.cli.build import build_model

    return build_model("demo", seq_len=64)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(runs: dict[str, Callable[[], object]], repeats: int, setup: Callable[[], None] | None = None,
           ) -> tuple[dict[str, float], float, float, float]:
    """Median wall time of each of two callables, and the ratio of the second to the first taken
    pair by pair (each pair run back to back, the order alternating), as its median and 25th/75th
    percentiles: on a noisy VM a pairwise ratio is steadier than a ratio of medians. ``setup``
    runs untimed before every call."""
    (first, a), (second, b) = runs.items()
    times: dict[str, list[float]] = {first: [], second: []}
    ratios = []
    for i in range(repeats):
        pair = {}
        for name, fn in ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a)):
            if setup is not None:
                setup()
            pair[name] = timed(fn)
            times[name].append(pair[name])
        ratios.append(pair[second] / pair[first])
    q = statistics.quantiles(ratios, n=4)
    return {k: statistics.median(v) for k, v in times.items()}, statistics.median(ratios), q[0], q[2]


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak since the last reset (VmHWM) resident memory, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (pasted as is into benchmarks/README.md)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
