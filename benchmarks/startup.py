"""Start-up of the demo: time to the first step and in total, and where it goes.

    python benchmarks/startup.py

Three measurements: ``python -m distlr --help`` against a bare ``python -c pass`` (the
interpreter's own start, the baseline), with whether torch or transformers got imported;
``python -m distlr`` end to end as a user runs it (wall time of the whole process, median of
several); and the same path replayed in one process with a timer around each phase (imports,
model, data, finder, first step, the rest of the range test, outputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def phases() -> dict[str, float]:
    marks: list[tuple[str, float]] = [("start", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    import torch  # noqa: F401

    mark("import torch")
    import logging

    import distlr  # noqa: F401
    from distlr.cli.build import build_dataloader, build_model, build_optimizer
    from distlr.cli.config import RunConfig
    from distlr.finder import LRFinder
    from distlr.output.files import RESULT_FILE, write_atomic

    mark("import distlr")
    cfg = RunConfig(progress=False)
    model = build_model(cfg.model, seq_len=cfg.seq_len)
    mark("build model (transformers)")
    loader, _ = build_dataloader(cfg, model)
    mark("read + tokenize data")
    optimizer = build_optimizer(cfg, model)
    finder = LRFinder(model, loader, optimizer, device="cpu")
    mark("LRFinder()")

    class FirstStep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("step 001/"):
                mark("first step (snapshot included)")

    logger = logging.getLogger("distlr")
    logger.setLevel(logging.INFO)
    logger.addHandler(FirstStep())
    result = finder.find(**cfg.range_test.as_dict(), log_every=1)
    mark("the other steps + restore")  # 99 and the steps past max_lr, if the range went on
    out = Path(tempfile.mkdtemp())
    write_atomic(out / RESULT_FILE, result.to_json())
    finder.plot(out / "lr_finder.png")
    mark("result.json + plot (matplotlib)")
    return {name: t - prev for (_, prev), (name, t) in zip(marks, marks[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases()))
        return
    sys.path.insert(0, str(HERE))
    from common import machine, table

    def wall(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - start

    helps = [wall([sys.executable, "-m", "distlr", "--help"]) for _ in range(max(5, args.repeats))]
    bare = [wall([sys.executable, "-c", "pass"]) for _ in range(max(5, args.repeats))]
    heavy = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['distlr', '--help']\n"
                            "try: runpy.run_module('distlr', run_name='__main__')\nexcept SystemExit: pass\n"
                            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
                            "'numpy', 'matplotlib'}))"], check=True, capture_output=True, text=True).stdout
    print(f"python -m distlr --help: median {statistics.median(helps):.3f} s (min {min(helps):.3f}, max "
          f"{max(helps):.3f}, {len(helps)} runs); python -c pass: {statistics.median(bare):.3f} s; ratio "
          f"{statistics.median(helps) / statistics.median(bare):.1f}; heavy modules imported: "
          f"{heavy.strip().splitlines()[-1]}")
    walls = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "distlr", "--output-dir", tmp, "--no-progress"], check=True,
                           capture_output=True)
            walls.append(time.perf_counter() - start)
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--phases"], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(median.values())
    to_first = 0.0
    rows = []
    for name, seconds in median.items():
        if to_first == 0.0 and name.startswith("first step"):
            to_first = sum(list(median.values())[: list(median).index(name) + 1])
        rows.append([name, f"{seconds:.2f}", f"{seconds / total:.0%}"])
    print(f"# demo start-up, median of {args.repeats}\n# {machine()}")
    print(f"python -m distlr (whole process): {statistics.median(walls):.2f} s; "
          f"replayed in-process: {total:.2f} s, first step done at {to_first:.2f} s")
    print(table(["phase", "seconds", "share"], rows))


if __name__ == "__main__":
    main()
