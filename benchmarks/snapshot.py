"""Snapshot + restore: distlr's stores against the plain way of doing the same, per model size.

    python benchmarks/snapshot.py                       # 1 M, 10 M, 50 M, 200 M parameters
    python benchmarks/snapshot.py --sizes 1 10

The state is a model and its AdamW moments (3 x 4 bytes a parameter). ``memory``: distlr's
HostStore snapshot (take) and in-place restore against a raw tensor copy (``clone()`` of every
tensor, ``copy_()`` back). ``disk``: the per-rank torch.distributed.checkpoint directory
against ``torch.save`` + ``torch.load`` + ``load_state_dict`` of the same state. Peak host
memory is the resident-set high-water mark above the live state, in copies of the state, each
method measured once in a fresh process.
Goals: time <= 1.5 x the plain way; peak <= 1 copy; device memory added: 0 (this store never
allocates on the accelerator).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mlp, n_params, reset_peak_rss, rss_bytes, table  # noqa: E402

from distlr.train.snapshot import DiskStore, HostStore, TrainingSnapshot  # noqa: E402


def make_state(millions: float) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)
    model = mlp(millions, width=2048 if millions >= 50 else 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # moments exist
    optimizer.zero_grad(set_to_none=True)
    state_bytes = sum(t.numel() * t.element_size() for t in
                      [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values() if v.dim())])
    return model, optimizer, state_bytes


def raw_copy(model, optimizer) -> tuple[float, float]:
    tensors = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values())]
    start = time.perf_counter()
    saved = [t.detach().clone() for t in tensors]
    mid = time.perf_counter()
    with torch.no_grad():
        for t, s in zip(tensors, saved):
            t.copy_(s)
    return mid - start, time.perf_counter() - mid


def plain_disk(model, optimizer, directory: Path) -> tuple[float, float]:
    path = directory / "state.pt"
    start = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    mid = time.perf_counter()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    end = time.perf_counter()
    path.unlink()
    return mid - start, end - mid


def distlr_store(model, optimizer, store) -> tuple[float, float]:
    snapshot = TrainingSnapshot(model, optimizer, store)
    start = time.perf_counter()
    snapshot.take()
    mid = time.perf_counter()
    snapshot.restore()
    end = time.perf_counter()
    snapshot.discard()
    return mid - start, end - mid


def peak_copies(method: str, millions: float, directory: str) -> float:
    """Peak resident memory above the live state while ``method`` runs once, in copies of the
    state. Measured in a fresh process: in this one the allocator already holds the memory
    earlier runs freed, and a second copy would not raise the peak."""
    out = subprocess.run([sys.executable, __file__, "--peak", method, str(millions), "--dir", directory],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def one_peak(method: str, millions: float, directory: str) -> float:
    model, optimizer, state_bytes = make_state(millions)
    work = Path(tempfile.mkdtemp(prefix="distlr-bench-", dir=directory))
    runs = {
        "raw": lambda: raw_copy(model, optimizer),
        "memory": lambda: distlr_store(model, optimizer, HostStore()),
        "torch.save": lambda: plain_disk(model, optimizer, work),
        "disk": lambda: distlr_store(model, optimizer, DiskStore(work / "snap")),
    }
    try:
        gc.collect()
        base = rss_bytes("VmRSS")
        reset_peak_rss()
        runs[method]()
        return (rss_bytes("VmHWM") - base) / state_bytes
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(millions: float, repeats: int, directory: str) -> list[list[object]]:
    """The table rows of one model size: its state lives only while this runs."""
    rows = []
    model, optimizer, state_bytes = make_state(millions)
    work = Path(tempfile.mkdtemp(prefix="distlr-bench-", dir=directory))
    try:
        runs = {
            "raw": lambda: raw_copy(model, optimizer),
            "memory": lambda: distlr_store(model, optimizer, HostStore()),
            "torch.save": lambda: plain_disk(model, optimizer, work),
            "disk": lambda: distlr_store(model, optimizer, DiskStore(work / "snap")),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(fn())
        med = {k: tuple(sorted(x[i] for x in v)[len(v) // 2] for i in (0, 1)) for k, v in times.items()}
        peaks = {k: peak_copies(k, millions, directory) for k in ("raw", "memory", "torch.save", "disk")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for store, plain in (("memory", "raw"), ("disk", "torch.save")):
        ours, theirs = sum(med[store]), sum(med[plain])
        rows.append([f"{n_params(model) / 1e6:.0f} M", f"{state_bytes / 2**20:.0f} MiB", store,
                     f"{med[store][0]:.3f} + {med[store][1]:.3f}", f"{theirs:.3f} ({plain})", f"{ours / theirs:.2f}",
                     f"{peaks[store]:.2f} ({peaks[plain]:.2f})"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50, 200], help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where disk snapshots go")
    parser.add_argument("--peak", nargs=2, metavar=("METHOD", "MILLIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(one_peak(args.peak[0], float(args.peak[1]), args.dir))
        return
    rows = [row for millions in args.sizes for row in measure(millions, args.repeats, args.dir)]
    print(f"# snapshot + restore, median of {args.repeats}, interleaved\n# {machine()}")
    print(table(["params", "state", "store", "distlr take + restore s", "plain s", "ratio",
                 "peak copies (plain)"], rows))


if __name__ == "__main__":
    main()
