"""Will my LR transfer? A width series of the two MLPs tests/test_series_axes.py checks: a
standard one (SGD with momentum) and a muP one (mup's MuReadout and MuAdamW), widths 64 to
1,024, two repeats each, in one process. Prints each series' time against the sum of its range tests, its table, and draws
docs/width-standard.png and docs/width-mup.png (the figures in docs/series.md).

    .venv/bin/python benchmarks/width_transfer.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_series_axes import RANGE, WIDTHS, mup_mlp, standard_mlp, teacher_task  # noqa: E402

from distlr import LRFinder  # noqa: E402
from distlr.output.plot import plot_series  # noqa: E402
from distlr.output.summary import series_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    out = Path(parser.parse_args().out)
    for name, factory in (("standard", standard_mlp), ("mup", mup_mlp)):
        model, optimizer = factory(WIDTHS[0])
        loader = DataLoader(teacher_task(), batch_size=256, shuffle=True)
        start = time.perf_counter()
        with LRFinder(model, loader, optimizer, criterion=nn.MSELoss()) as finder:
            series = finder.series(widths=WIDTHS, model_factory=factory, repeats=2, target_width=4096, **RANGE,
                                   progress=False)
        total = time.perf_counter() - start
        tests = sum(run.result.elapsed_s for run in series.runs)
        print(f"== {name} MLP: the series took {total:.1f} s, its range tests {tests:.1f} s "
              f"(the rest, {total - tests:.1f} s: fresh models, snapshots, analysis)\n{series_summary(series)}\n")
        plot_series(series, out / f"width-{name}.png")


if __name__ == "__main__":
    main()
