"""CLI: run what is missing, then print the regret tables (also written to results.md).

    python benchmarks/suggestion/run.py [--tasks a,b] [--jobs 2] [--only-score] [--tol 0.10]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import score  # noqa: E402

CLASSES = ("diverged", "too_high", "too_low", "ok", "none")


def _fmt(x, spec=".2f"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


DEFAULT = "DISTLR DEFAULT"


def default_records(records) -> list[dict]:
    """The two numbers distlr's default gives, each scored under the protocol it is for:
    ``optimal_lr`` (steepest_gradient) under constant LR, ``peak_lr`` (one_cycle) under one-cycle."""
    source = {"constant": "distlr:steepest_gradient", "onecycle": "distlr:one_cycle"}
    return [{**r, "rule": DEFAULT} for r in records if source.get(r["protocol"]) == r["rule"]]


def rule_table(records, kind, half, protocol) -> list[str]:
    rows = defaultdict(list)
    for r in records:
        if r["kind"] == kind and r["half"] == half and r["protocol"] == protocol:
            rows[r["rule"]].append(r)
    if not rows:
        return []
    lines = [f"#### {kind} tasks, {half}, {protocol}", "",
             "| rule | n | median regret | worst regret (non-div) | " + " | ".join(CLASSES) + " |",
             "|---|--:|--:|--:|" + "--:|" * len(CLASSES)]
    for rule in sorted(rows, key=lambda name: (name != DEFAULT, name)):
        rs = rows[rule]
        scored = [r for r in rs if r["class"] not in (None, "none")]
        regs = [math.inf if r["regret"] is None else r["regret"] for r in scored]
        nondiv = [r["regret"] for r in scored if r["class"] != "diverged"]
        counts = [sum(r["class"] == c for r in rs) for c in CLASSES]
        lines.append(f"| {rule} | {len(scored)} | {_fmt(statistics.median(regs) if regs else None)} | "
                     f"{_fmt(max(nondiv) if nondiv else None)} | " + " | ".join(map(str, counts)) + " |")
    return lines + [""]


def summary_table(records, kind) -> list[str]:
    """One row per rule, one column per (half, protocol): median regret / worst regret (non-
    diverged), then diverged + too high, then how many curves got no answer."""
    cols = [(h, p) for h in ("tune", "held-out") for p in score.PROTOCOLS]
    cells = defaultdict(dict)
    for (half, protocol) in cols:
        rows = defaultdict(list)
        for r in records:
            if r["kind"] == kind and r["half"] == half and r["protocol"] == protocol:
                rows[r["rule"]].append(r)
        for rule, rs in rows.items():
            scored = [r for r in rs if r["class"] not in (None, "none")]
            regs = [math.inf if r["regret"] is None else r["regret"] for r in scored]
            nondiv = [r["regret"] for r in scored if r["class"] != "diverged"]
            bad = sum(r["class"] in ("diverged", "too_high") for r in scored)
            none = sum(r["class"] == "none" for r in rs)
            cells[rule][(half, protocol)] = (f"{_fmt(statistics.median(regs) if regs else None)} / "
                                             f"{_fmt(max(nondiv) if nondiv else None, '.1f')} · {bad} · {none}")
    lines = [f"#### {kind} tasks: median / worst regret · diverged + too high · no answer", "",
             "| rule | " + " | ".join(f"{h}, {p}" for h, p in cols) + " |", "|---|" + "--:|" * len(cols)]
    for rule in sorted(cells, key=lambda name: (name != DEFAULT, name)):
        lines.append(f"| {rule} | " + " | ".join(cells[rule].get(c, "-") for c in cols) + " |")
    return lines + [""]


def setting_table(records, kind) -> list[str]:
    """ok-rate per rule and finder setting (both halves and protocols pooled)."""
    settings = list(score.FINDER_SETTINGS)
    agg = defaultdict(lambda: [0, 0])
    for r in records:
        if r["kind"] == kind and r["setting"] in settings:
            a = agg[(r["rule"], r["setting"])]
            a[0] += r["class"] == "ok"
            a[1] += 1
    rules = sorted({r for r, _ in agg})
    lines = [f"#### ok / n per finder setting ({kind} tasks, both halves, both protocols)", "",
             "| rule | " + " | ".join(settings) + " |", "|---|" + "--:|" * len(settings)]
    for rule in rules:
        lines.append(f"| {rule} | " + " | ".join(f"{agg[(rule, s)][0]}/{agg[(rule, s)][1]}" for s in settings) + " |")
    return lines + [""]


def task_table(summary) -> list[str]:
    lines = ["| task | half | kind | protocol | grid | best lr | best val | init val | seed cv | seed range "
             "| ok band (decades) | notes |", "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['half']} | {s['kind']} | {s['protocol']} | {s['grid_lo']:.1e}..{s['grid_hi']:.1e} "
            f"({s['n_grid']}) | {s['best_lr']:.2e} | {s['best_val']:.4g} | {s['init_val']:.4g} | "
            f"{100 * s['seed_cv']:.1f}% | {100 * s['seed_range']:.1f}% | {s['ok_band_decades']:.1f} "
            f"({s['ok_band'][0]:.1e}..{s['ok_band'][1]:.1e}) | {'; '.join(s['notes'])} |")
    cvs = [s["seed_cv"] for s in summary]
    if cvs:
        lines += ["", f"Seed spread at the best grid LR: median cv {100 * statistics.median(cvs):.1f}%, "
                  f"max cv {100 * max(cvs):.1f}%; the 3-seed mean's cv is ~cv/sqrt(3) "
                  f"(median {100 * statistics.median(cvs) / math.sqrt(3):.1f}%)."]
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only-score", action="store_true", help="no training: score what is cached")
    ap.add_argument("--tol", type=float, default=score.OK_TOLERANCE)
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)
    names = args.tasks.split(",") if args.tasks else None
    t0 = time.perf_counter()
    records = score.score(tasks=names, n_jobs=args.jobs, tol=args.tol, train=not args.only_score)
    records += default_records(records)
    summary = score.grid_summary(names, tol=args.tol)
    elapsed = time.perf_counter() - t0

    out = ["# Suggestion benchmark results", "",
           f"OK_TOLERANCE = {args.tol}; regret = mean val loss (3 seeds) at the snapped suggestion / "
           "best grid mean - 1. Median regret counts diverged-with-non-finite-loss as inf; "
           "worst is over non-diverged records.", "",
           "## Summary", ""] + summary_table(records, "ordinary") + summary_table(records, "finetune") + [
           "## Per task: grid best, seed spread", ""] + task_table(summary)
    for kind in ("ordinary", "finetune"):
        out += [f"## Rules, {kind} tasks", ""]
        for half in ("tune", "held-out"):
            for p in score.PROTOCOLS:
                out += rule_table(records, kind, half, p)
        out += setting_table(records, kind)
    missing = sum(r["class"] is None for r in records)
    if missing:
        out += [f"**{missing} records not scored: their LR has no cached evaluation (run without --only-score).**", ""]
    edges = [f"{s['task']}/{s['protocol']}: {'; '.join(s['notes'])}" for s in summary if s["notes"]]
    out += ["## Grid edges", ""] + ([f"- {e}" for e in edges] or ["- none: every best LR sat inside its first grid"])
    out += ["", f"(elapsed {elapsed:.0f} s)", ""]
    text = "\n".join(out)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
