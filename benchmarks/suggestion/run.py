"""CLI: train what is missing, choose the constants (tune.py), score, print the tables.

    python benchmarks/suggestion/run.py [--tasks a,b | --quick] [--jobs 2] [--only-score]

1. the grids, the range tests and every built-in rule's picks are trained (cached);
2. tune.py chooses the constants by leave-one-family-out cross-validation (tuning.md, .json);
3. the held-out picks (each family with the constants chosen without it) are trained;
4. the tables go to results.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import score  # noqa: E402
from tasks import BY_NAME, FAMILIES, get_tasks  # noqa: E402
from train import FINDER_SETTINGS, PROTOCOLS  # noqa: E402

CLASSES = ("diverged", "too_high", "too_low", "ok", "none")
HELD_OUT = "DISTLR DEFAULT, held out"
HELD_OUT_VAL = "distlr + val_loader, held out"
NO_EXTENSION = "distlr, extend_range=False"
SETTING_NAMES = {"default": "seed range 1e-8..1e-1", "wide": "wide range 1e-7..10"}
PROTOCOL_RULES = {"constant": "constant", "onecycle": "peak", "wsd": "wsd"}


def _fmt(x, spec=".2f"):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def heldout_rules(tuning: dict) -> dict[str, dict[str, score.Rule]]:
    """Per protocol: the default with the divisors chosen without the curve's own family, from
    the training loss alone and with the validation loss (val_every=2) too."""
    from distlr.core.analysis import usable_curve, validation_curve
    from distlr.core.rules import below_turn_up

    def train_pick(c, divisor):
        curve = usable_curve(c.lrs, c.losses, c.smoothed, c.diverged_at)
        return curve, below_turn_up(curve, divisor, what="the suggestion").lr

    out = {}
    for protocol in PROTOCOLS:
        folds, val_folds = tuning[protocol]["folds"], tuning["val"]["2"][protocol]["folds"]

        def train_rule(c, folds=folds):
            return train_pick(c, folds[BY_NAME[c.task].family])[1]

        def val_rule(c, folds=folds, val_folds=val_folds):
            family = BY_NAME[c.task].family
            curve, lr = train_pick(c, folds[family])
            if not len(curve):
                return lr
            steps = [s for s in c.val_steps if (s + 1) % 2 == 0]
            by = dict(zip(c.val_steps, c.val_losses))
            val = validation_curve(c.lrs, steps, [by[s] for s in steps], float(curve.lrs[-1]), 0.98)
            from_val = None if val is None else below_turn_up(val, val_folds[family], what="the suggestion").lr
            return lr if from_val is None or (lr is not None and lr <= from_val) else from_val

        out[protocol] = {HELD_OUT: train_rule, HELD_OUT_VAL: val_rule}
    return out


def no_extension_rules() -> dict[str, score.Rule]:
    """What a user of the defaults with extend_range=False is handed, per protocol."""
    def rule(key):
        return lambda c: score.distlr_numbers(c)[key]
    return {f"{NO_EXTENSION}|{p}": rule(score.DEFAULT_SOURCE[p].split(":")[1]) for p in PROTOCOLS}


def collect(names, n_jobs, train) -> list[dict]:
    records = score.score(tasks=names, n_jobs=n_jobs, train=train)
    import tune

    tune.main([] if names is None else ["--tasks", ",".join(names)])
    tuning = json.loads((HERE / "tuning.json").read_text())
    for protocol, rules in heldout_rules(tuning).items():
        records += score.score(rules, tasks=names, protocols=(protocol,), include_builtin=False, n_jobs=n_jobs,
                               train=train)
    for protocol in PROTOCOLS:
        base = {name: fn for name, fn in no_extension_rules().items() if name.endswith(protocol)}
        got = score.score(tasks=names, protocols=(protocol,), include_builtin=False, n_jobs=n_jobs, train=train,
                          base_rules=base)
        records += [{**r, "rule": NO_EXTENSION} for r in got]
    return records


def table_rows(records, kind, protocol, setting):
    rows = defaultdict(list)
    for r in records:
        if r["kind"] == kind and r["protocol"] == protocol and r["setting"] in (setting, "-"):
            rows[r["rule"]].append(r)
    return rows


ORDER = (HELD_OUT, score.DEFAULT, HELD_OUT_VAL, NO_EXTENSION)


def rule_order(name):
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def summary_table(records, kind) -> list[str]:
    """One row per rule; per protocol and range: median / worst regret, failures (diverged + too
    high), no answer. Every figure is a trained evaluation; held-out rows use each family's fold."""
    cols = list(itertools.product(PROTOCOLS, FINDER_SETTINGS))
    cells = defaultdict(dict)
    for protocol, setting in cols:
        for rule, rs in table_rows(records, kind, protocol, setting).items():
            if rule.startswith("distlr:") and rule[7:] in ("optimal_lr", "peak_lr", "wsd_lr"):
                continue  # these are DISTLR DEFAULT, each under its own protocol
            cells[rule][(protocol, setting)] = _cell(rs)
    lines = [f"#### {kind} tasks: median / worst regret · diverged + too high · no answer", "",
             "| rule | " + " | ".join(f"{p}, {SETTING_NAMES[s]}" for p, s in cols) + " |", "|---|" + "--:|" * len(cols)]
    for rule in sorted(cells, key=rule_order):
        lines.append(f"| {rule} | " + " | ".join(cells[rule].get(c, "-") for c in cols) + " |")
    return lines + [""]


def _cell(rs):
    scored = [r for r in rs if r["class"] is not None]
    regs = [math.inf if r["class"] == "none" or r["regret"] is None else r["regret"] for r in scored]
    finite = [r["regret"] for r in scored if r["class"] not in ("none", "diverged") and r["regret"] is not None]
    bad = sum(r["class"] in ("diverged", "too_high") for r in scored)
    none = sum(r["class"] == "none" for r in scored)
    return (f"{_fmt(statistics.median(regs) if regs else None)} / {_fmt(max(finite) if finite else None, '.1f')} · "
            f"{bad} · {none}")


def class_table(records, kind, protocol) -> list[str]:
    rows = defaultdict(list)
    for r in records:
        if r["kind"] == kind and r["protocol"] == protocol and r["setting"] != "-":
            rows[r["rule"]].append(r)
    lines = [f"#### {kind} tasks, {protocol}, both ranges", "",
             "| rule | n | median regret | worst (not diverged) | " + " | ".join(CLASSES) + " |",
             "|---|--:|--:|--:|" + "--:|" * len(CLASSES)]
    for rule in sorted(rows, key=rule_order):
        rs = rows[rule]
        regs = [math.inf if r["class"] == "none" or r["regret"] is None else r["regret"] for r in rs]
        finite = [r["regret"] for r in rs if r["class"] not in ("none", "diverged") and r["regret"] is not None]
        counts = [sum(r["class"] == c for r in rs) for c in CLASSES]
        lines.append(f"| {rule} | {len(rs)} | {_fmt(statistics.median(regs))} | {_fmt(max(finite) if finite else None)} "
                     "| " + " | ".join(map(str, counts)) + " |")
    return lines + [""]


def spread_table(records) -> list[str]:
    """Seed to seed: for each (task, range), max / min of the 3 curve seeds' suggestions."""
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["setting"] == "-" or r["protocol"] != "constant":
            continue
        by[r["rule"]][(r["task"], r["setting"])].append(r["suggested_lr"])
    lines = ["| rule | cases | median max/min | worst | share <= 2 | share <= 4 | cases with a seed unanswered |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for rule in sorted(by, key=rule_order):
        ratios = [max(v) / min(v) for v in by[rule].values() if None not in v and len(v) > 1]
        missing = sum(None in v for v in by[rule].values())
        if not ratios:
            continue
        lines.append(f"| {rule} | {len(ratios)} | {statistics.median(ratios):.2f} | {max(ratios):.1f} | "
                     f"{sum(x <= 2 for x in ratios) / len(ratios):.0%} | {sum(x <= 4 for x in ratios) / len(ratios):.0%} "
                     f"| {missing} |")
    return lines + [""]


def band_table(records) -> list[str]:
    """How often the default's band holds another seed's suggestion (constant LR)."""
    rows = [r for r in records if r["rule"] == "distlr:optimal_lr" and r["protocol"] == "constant"]
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["setting"])].append(r)
    full = noise = total = 0
    for rs in by.values():
        for a, b in itertools.permutations(rs, 2):
            if a["band"] is None or b["suggested_lr"] is None:
                continue
            total += 1
            full += a["band"]["low"] <= b["suggested_lr"] <= a["band"]["high"]
            noise += a["band"]["noise_low"] <= b["suggested_lr"] <= a["band"]["noise_high"]
    if not total:
        return []
    return [f"Of {total} (curve, other seed) pairs, the default's band holds the other seed's suggestion in "
            f"{full / total:.0%}; the bootstrap under the curve's own noise alone, before the widening to "
            f"`SEED_SPREAD`, in {noise / total:.0%}.", ""]


def task_table(summary) -> list[str]:
    lines = ["| task | family | protocol | grid | best lr | best val | init val | seed cv | ok band (decades) | notes |",
             "|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for s in summary:
        lines.append(
            f"| {s['task']} | {s['family']} | {s['protocol']} | {s['grid_lo']:.1e}..{s['grid_hi']:.1e} ({s['n_grid']}) | "
            f"{s['best_lr']:.2e} | {s['best_val']:.4g} | {s['init_val']:.4g} | {100 * s['seed_cv']:.1f}% | "
            f"{s['ok_band_decades']:.1f} ({s['ok_band'][0]:.1e}..{s['ok_band'][1]:.1e}) | {'; '.join(s['notes'])} |")
    return lines + [""]


def cost_lines(names, records) -> list[str]:
    """CPU seconds of what this scoring needs (the grids, every scored pick, the range tests) as the
    cache timed them, one thread each, and what measuring the validation loss costs."""
    tasks = get_tasks(names)
    needed = {(r["task"], r["protocol"], r["snapped_k"]) for r in records if r["snapped_k"] is not None}
    for task in tasks:
        for protocol in PROTOCOLS:
            needed |= {(task.name, protocol, k) for k in score.grid_for(task, protocol)[0]}
    runs = [score.RUNS.get(BY_NAME[name]).get(score.run_key(protocol, k, seed))
            for name, protocol, k in needed for seed in score.EVAL_SEEDS]
    run_s = sum(r["secs"] for r in runs if r is not None)
    curve_s = sum(c.get("secs", 0.0) for t in tasks for c in score.CURVES.get(t).values())
    ratios = []
    for t in tasks:
        curves = score.CURVES.get(t)
        plain, with_val = curves.get(score.curve_key("default", 0, False)), curves.get(score.curve_key("default", 0))
        if plain and with_val and plain["secs"] > 0:
            ratios.append(with_val["secs"] / plain["secs"])
    lines = [f"CPU time of what these tables need, as the cache timed it: {run_s / 60:.0f} min of training runs "
             f"({len(runs)} runs) and {curve_s / 60:.1f} min of range tests ({sum(len(score.CURVES.get(t)) for t in tasks)} "
             f"curves), one thread each. A cold run on 2 workers: about {(run_s + curve_s) / 2 / 60:.0f} min, plus "
             "about 2 min of pre-training and the workers' start-up."]
    if ratios:
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        lines.append(f"A range test measuring the validation loss after every step (4 batches) took {statistics.median(ratios):.2f}x "
                     f"the time of the same range test without (median over {len(ratios)} tasks; quartiles "
                     f"{q[0]:.2f}-{q[2]:.2f}); every second step (the default val_every=2) costs about half that extra.")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--quick", action="store_true", help="one task per family (8 tasks, about a quarter of the time)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only-score", action="store_true", help="no training: score what is cached")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args(argv)
    names = args.tasks.split(",") if args.tasks else None
    if args.quick:
        names = [next(t.name for t in get_tasks() if t.family == family) for family in FAMILIES]
    t0 = time.perf_counter()
    records = collect(names, args.jobs, not args.only_score)
    summary = score.grid_summary(names)
    elapsed = time.perf_counter() - t0

    out = ["# Suggestion benchmark results", "",
           f"OK_TOLERANCE = {score.OK_TOLERANCE}; regret = mean val loss (3 seeds) at the snapped suggestion / best "
           "grid mean - 1. Median regret counts no answer as inf; worst is over records that neither diverged nor "
           "went unanswered. `DISTLR DEFAULT, held out`: each family's records with the constants chosen on the other "
           "7 (tune.py); `DISTLR DEFAULT`: the shipped constants, chosen on all 8 (in-sample).", "",
           "## Summary", ""]
    for kind in ("scratch", "finetune"):
        out += summary_table(records, kind)
    out += ["## Seed to seed (constant LR, 3 curve seeds per task and range)", ""] + spread_table(records)
    out += band_table(records)
    out += ["## Classes", ""]
    for kind in ("scratch", "finetune"):
        for p in PROTOCOLS:
            out += class_table(records, kind, p)
    out += ["## Per task: grid best, seed spread", ""] + task_table(summary)
    missing = sum(r["class"] is None for r in records)
    if missing:
        out += [f"**{missing} records not scored: their LR has no cached evaluation (run without --only-score).**", ""]
    edges = [f"{s['task']}/{s['protocol']}: {'; '.join(s['notes'])}" for s in summary if s["notes"]]
    out += ["## Grid edges", ""] + ([f"- {e}" for e in edges] or ["- none: every best LR sat inside its first grid"])
    out += ["", "## Cost", ""] + cost_lines(names, records) + [f"(this scoring: {elapsed:.0f} s)", ""]
    text = "\n".join(out)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
