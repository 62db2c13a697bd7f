"""Set distlr's suggestion constants from the tuning half of the benchmark, and only from it.

    .venv/bin/python benchmarks/suggestion/tune.py [--jobs 2] [--no-train]

Scores variants of ``steepest_gradient`` (MARGIN, GUARD, FLOOR) under the constant-LR protocol,
then, on the variant chosen, variants of the one-cycle peak (PEAK_FACTOR, PEAK_GUARD) under the
one-cycle protocol, then how the descent is read (WIDTH_FRACTION, NOISE_FACTOR, DESCENT_BAND, one
at a time), on the *tune* tasks only. The choice rule, fixed before looking: among the
variants with no diverged and no too-high record, the lowest median regret, then the lowest
worst regret, then the more conservative (lower suggestions on the whole). The reading constants
were set before the benchmark existed; their table says whether it contradicts them (see their
docstrings). The held-out half is never read here; run.py reports it for the constants chosen.
Writes tuning.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import score  # noqa: E402
from tasks import get_tasks  # noqa: E402

from distlr import suggest  # noqa: E402
from distlr.analysis import usable_curve  # noqa: E402

MARGINS = (1.0, 2.0, 3.0, 5.0)
GUARDS = (1.0, 2.0, 3.0, 5.0, 10.0)
FLOORS = (10.0, 30.0, math.inf)        # plus floor == guard: the pick is bottom / guard alone
PEAK_FACTORS = (1.0, 2.0, 3.0, 5.0, 10.0)
PEAK_GUARDS = (1.0, 1.5, 2.0, 3.0, 5.0)
READING = {"width_fraction": (0.02, 0.04, 0.08), "noise_factor": (3.0, 4.0, 5.0), "band": (0.1, 0.25, 0.5),
           "bottom_tolerance": (0.05, 0.1, 0.2, 0.3), "flat_share": (0.0, 0.1, 0.25)}


def constant_rule(**kw):
    def rule(lrs, losses, smoothed, diverged_at, num_steps):
        return suggest.steepest_with(usable_curve(lrs, losses, smoothed, diverged_at), **kw).lr
    return rule


def peak_rule(factor, guard, constant):
    def rule(lrs, losses, smoothed, diverged_at, num_steps):
        curve = usable_curve(lrs, losses, smoothed, diverged_at)
        return suggest.peak_with(curve, suggest.steepest_with(curve, **constant), factor=factor, guard=guard).lr
    return rule


def summarise(records, protocol):
    out = {}
    for rec in records:
        if rec["protocol"] != protocol:
            continue
        out.setdefault(rec["rule"], []).append(rec)
    rows = []
    for name, recs in out.items():
        scored = [r for r in recs if r["class"] not in (None, "none")]
        regrets = [r["regret"] if r["class"] != "diverged" else float("inf") for r in scored]
        finite = [r["regret"] for r in scored if r["class"] != "diverged"]
        rows.append({
            "rule": name, "n": len(scored), "none": sum(r["class"] == "none" for r in recs),
            "diverged": sum(r["class"] == "diverged" for r in scored),
            "too_high": sum(r["class"] == "too_high" for r in scored),
            "too_low": sum(r["class"] == "too_low" for r in scored),
            "ok": sum(r["class"] == "ok" for r in scored),
            "median": statistics.median(regrets) if regrets else float("nan"),
            "worst": max(finite) if finite else float("nan"),
            # the tie-break: the more conservative variant (lower suggestions on the whole)
            "mean_log_lr": statistics.mean(math.log10(r["suggested_lr"]) for r in scored) if scored else 0.0,
        })
    return sorted(rows, key=lambda r: (r["diverged"] + r["too_high"] > 0, r["median"], r["worst"], r["mean_log_lr"]))


def table(rows, title):
    lines = [f"#### {title}", "", "| variant | n | median regret | worst | diverged | too high | too low | ok | none |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['n']} | {r['median']:.3f} | {r['worst']:.3f} | {r['diverged']} | "
                     f"{r['too_high']} | {r['too_low']} | {r['ok']} | {r['none']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="only re-score cached runs")
    args = parser.parse_args(argv)
    tune = [t.name for t in get_tasks() if t.half == "tune"]
    out = []

    variants = [(m, g, f) for m, g in itertools.product(MARGINS, GUARDS) for f in (g, *FLOORS) if f >= g]
    constants = {f"margin={m:g} guard={g:g} floor={f:g}": dict(margin=m, guard=g, floor=f)
                 for m, g, f in dict.fromkeys(variants)}
    records = score.score({name: constant_rule(**kw) for name, kw in constants.items()}, tasks=tune,
                          protocols=("constant",), include_builtin=False, n_jobs=args.jobs, train=not args.no_train)
    rows = summarise(records, "constant")
    chosen = rows[0]["rule"]
    out.append(table(rows, "constant LR, tune half"))

    peaks = {f"factor={f:g} guard={g:g}": dict(factor=f, guard=g) for f, g in itertools.product(PEAK_FACTORS, PEAK_GUARDS)}
    records = score.score({name: peak_rule(kw["factor"], kw["guard"], constants[chosen]) for name, kw in peaks.items()},
                          tasks=tune, protocols=("onecycle",), include_builtin=False, n_jobs=args.jobs,
                          train=not args.no_train)
    rows = summarise(records, "onecycle")
    out.append(table(rows, f"one-cycle peak on the chosen constant rule ({chosen}), tune half"))
    peak_choice = rows[0]["rule"]

    # How the descent is read, one constant at a time around the shipped values, on the chosen
    # constant rule: the zero-lag smoother's width, the noise test, the band that starts the descent.
    base = dict(width_fraction=suggest.WIDTH_FRACTION, noise_factor=suggest.NOISE_FACTOR, band=suggest.DESCENT_BAND,
                bottom_tolerance=suggest.BOTTOM_TOLERANCE)
    reading = {}
    for key, values in READING.items():
        for value in values:
            reading[f"{key}={value:g}"] = {**constants[chosen], **base, key: value}
    records = score.score({name: constant_rule(**kw) for name, kw in reading.items()}, tasks=tune,
                          protocols=("constant",), include_builtin=False, n_jobs=args.jobs, train=not args.no_train)
    rows = summarise(records, "constant")
    out.append(table(rows, f"reading the descent, on {chosen} (constant LR, tune half)"))
    text = (f"Chosen by the rule above: constant {chosen}; one-cycle peak {peak_choice}. The last table is "
            "evidence for the reading constants, each varied alone around the shipped value; see their "
            "docstrings in distlr/suggest.py for how it was read.\n\n" + "\n\n".join(out) + "\n")
    (HERE / "tuning.md").write_text("# Tuning (tune half only)\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
