"""Score LR-suggestion rules by what their LR buys (library API of the benchmark).

    import sys; sys.path.insert(0, "benchmarks/suggestion")
    import score
    rows = score.score({"my_rule": fn})          # fn(curve) -> float | None, curve a score.Curve

``score`` trains whatever is missing (cached under cache/) and returns one record per (rule,
task, finder setting, curve seed, protocol). distlr's own numbers (what ``LRFinder.find`` hands
a user, through ``distlr.analysis.build_result`` on the same recorded curve), the anchors and
the no-finder baseline are always included; pass ``include_builtin=False`` to score only yours.
Workers are spawned: call it from a script file under ``if __name__ == "__main__":`` (or n_jobs=1).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent.parent))

import anchors  # noqa: E402
from tasks import CACHE, Task, get_tasks  # noqa: E402
from train import CURVE_SEEDS, EVAL_SEEDS, FINDER_SETTINGS, PROTOCOLS, lr_of, run_job, snap  # noqa: E402

OK_TOLERANCE = 0.10
GRID_POINTS, GRID_STEP = 20, 3          # 20 points, 3 fine-grid steps (0.3 decade) apart
EDGE_MARGIN = 2                         # the best must have >= 2 grid points on each side
MAX_WIDEN = 6                           # at most 6 widenings (3 points each) per side
BASELINE = {"adam": 1e-3, "sgd": 1e-2}
# A run whose final val loss is finite but >= its initial one counts as "diverged" only above the
# grid's best LR and only when it is also more than OK_TOLERANCE worse than the best: below the
# best it is a stall (LR too small to move the loss, e.g. BatchNorm running stats drifting at lr
# 1e-8) and is classed too_low; within the tolerance of the best it is a model that was already
# as good as training makes it (a well-pretrained one, whose best "LR" is the grid's lowest).
DEFAULT = "DISTLR DEFAULT"
DEFAULT_SOURCE = {"constant": "distlr:optimal_lr", "onecycle": "distlr:peak_lr", "wsd": "distlr:wsd_lr"}
"""Which of distlr's numbers a user of the defaults takes for each protocol."""


# ----------------------------------------------------------------------------------------------
# Cache: one JSON file per task for runs and one for curves; the key carries the task version.
# ----------------------------------------------------------------------------------------------

class Store:
    def __init__(self, kind: str):
        self.dir = CACHE / kind
        self.data: dict[str, dict] = {}

    def path(self, task: Task) -> Path:
        return self.dir / f"{task.key}.json"

    def get(self, task: Task) -> dict:
        if task.key not in self.data:
            p = self.path(task)
            self.data[task.key] = json.loads(p.read_text()) if p.exists() else {}
        return self.data[task.key]

    def update(self, task: Task, new: dict) -> None:
        d = self.get(task)
        p = self.path(task)
        if p.exists():                      # merge what another process may have written
            d.update({k: v for k, v in json.loads(p.read_text()).items() if k not in d})
        d.update(new)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d, sort_keys=True))
        os.replace(tmp, p)


RUNS, CURVES = Store("runs"), Store("curves")


def run_key(protocol, k, seed):
    return f"{protocol}|{k}|{seed}"


def curve_key(setting, seed, validation=True):
    return f"{setting}|{seed}" + ("" if validation else "|noval")


CURVE_ITEMS = [(s, seed, True) for s in FINDER_SETTINGS for seed in CURVE_SEEDS] + [("default", 0, False)]
"""Every curve a task records: each setting and seed with validation losses, and one without,
to time what the validation costs."""


# ----------------------------------------------------------------------------------------------
# A recorded curve as a range test would have ended it
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    """One range test as the finder would have returned it, for the rules to read: with the
    range extension (distlr) or without it (what an anchor, or ``extend_range=False``, sees)."""

    task: str
    setting: str
    seed: int
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    diverged_at: int | None
    stop_reason: str
    num_steps: int
    min_lr: float
    max_lr: float
    extended_steps: int
    val_steps: list[int]
    val_losses: list[float]


def _floats(values):
    return [math.nan if v is None else float(v) for v in values]


def as_run(rec: dict, task: str, setting: str, seed: int, *, extend: bool) -> Curve:
    """Cut a curve recorded past max_lr (``train.finder_curve``) where the sweep would have
    stopped: at max_lr without the extension; with it, where ``distlr.suggest.still_open``
    says no more, or the cap, or the loss stop the recording also made."""
    from distlr.core.ladder import Ladder
    from distlr.core.rules import still_open

    lrs, losses, smoothed = rec["lrs"], _floats(rec["losses"]), _floats(rec["smoothed"])
    n = rec["num_steps"]
    base = FINDER_SETTINGS[setting]
    end = len(lrs) if rec["diverged_at"] is None else rec["diverged_at"] + 1  # points recorded
    stop = min(end, n)
    if extend and stop == n and (rec["diverged_at"] is None or rec["diverged_at"] >= n):
        cap = n + Ladder(base["min_lr"], base["max_lr"], n).extension_cap
        while stop < min(end, cap) and still_open(lrs[:stop], losses[:stop]):
            stop += 1
    diverged = rec["diverged_at"] is not None and rec["diverged_at"] < stop
    vals = [(s, v) for s, v in zip(rec.get("val_steps", []), _floats(rec.get("val_losses", []))) if s < stop]
    return Curve(task, setting, seed, lrs[:stop], losses[:stop], smoothed[:stop],
                 rec["diverged_at"] if diverged else None,
                 rec["stop_reason"] if diverged else "completed", n, base["min_lr"], base["max_lr"],
                 max(0, stop - n), [s for s, _ in vals], [v for _, v in vals])


def distlr_numbers(c: Curve, *, val_every: int | None = None) -> dict[str, Any]:
    """What ``LRFinder.find`` would hand the user for this curve: the real analysis, without a
    validation loss (the defaults), or with the one recorded, every ``val_every`` steps."""
    from distlr.core.analysis import build_result
    from distlr.core.history import History
    from distlr.core.options import RangeTestArgs

    steps = [s for s in c.val_steps if val_every is not None and (s + 1) % val_every == 0]
    by_step = dict(zip(c.val_steps, c.val_losses))
    history = History(c.lrs, c.losses, c.smoothed, stop_reason=c.stop_reason, diverged_at=c.diverged_at,
                      extended_steps=c.extended_steps, val_steps=steps, val_losses=[by_step[s] for s in steps])
    r = build_result(history, RangeTestArgs(min_lr=c.min_lr, max_lr=c.max_lr, num_steps=c.num_steps))
    out = {"optimal_lr": r.optimal_lr, "peak_lr": r.peak_lr,
           "wsd_lr": None if r.schedule is None else r.schedule.get("wsd", {}).get("plateau_lr"),
           "band": r.confidence,
           "note": r.suggestion_note}
    for name, lr in r.suggestions.items():
        out[f"rule:{name}"] = lr
    return out


SCORED_ANCHORS = ("fastai_valley", "fastai_minimum", "tlf_steepest", "lightning_new")
"""The anchors scored (anchors.py has more): fastai's default and the rule the issue compares
against, torch-lr-finder's and Lightning's (>= 2.5.3). Fewer rules keep a cold run near 40 min."""

WSD_RULES = ("distlr:optimal_lr", "distlr:peak_lr", "distlr:wsd_lr")
"""Only these are also scored under the WSD protocol: it decides which of distlr's numbers
the plateau is (the others are compared under constant LR and one-cycle)."""


def anchor_numbers(c: Curve) -> dict[str, float | None]:
    return {name: anchors.ANCHORS[name](c.lrs, c.losses, c.smoothed, c.diverged_at, c.num_steps)
            for name in SCORED_ANCHORS}


def protocols_of(rule: str, protocols) -> tuple[str, ...]:
    """The protocols ``rule`` is scored under: all of them for distlr's three numbers and for
    rules passed in, constant and one-cycle for the other built-in rules and the baseline."""
    builtin = rule.startswith("distlr:") or rule in SCORED_ANCHORS or rule == "baseline"
    return tuple(p for p in protocols if p != "wsd" or not builtin or rule in WSD_RULES)


def curves(tasks) -> list[tuple[Task, Curve, Curve]]:
    """(task, distlr's curve with the extension, the base curve) for every stored curve."""
    out = []
    for task in tasks:
        stored = CURVES.get(task)
        for setting in FINDER_SETTINGS:
            for seed in CURVE_SEEDS:
                rec = stored.get(curve_key(setting, seed))
                if rec is not None:
                    out.append((task, as_run(rec, task.name, setting, seed, extend=True),
                                as_run(rec, task.name, setting, seed, extend=False)))
    return out


Rule = Callable[[Curve], "float | None"]


def all_suggestions(tasks, rules: dict[str, Rule], include_builtin: bool, base_rules: dict[str, Rule] | None = None):
    """[(task, setting, seed, rule, lr, band)] for every stored curve, plus the baseline.
    ``rules`` read the extended curve, ``base_rules`` the one cut at max_lr."""
    out = []
    for task, ext, base in curves(tasks):
        found: dict[str, Any] = {}
        bands: dict[str, Any] = {}
        if include_builtin:
            numbers = distlr_numbers(ext)
            for key in ("optimal_lr", "peak_lr", "wsd_lr"):
                found[f"distlr:{key}"] = numbers[key]
            bands["distlr:optimal_lr"] = numbers["band"]
            found.update({f"distlr:{k[5:]}": v for k, v in numbers.items() if k.startswith("rule:")})
            found.update(anchor_numbers(base))
        for name, fn in rules.items():
            found[name] = _call(name, fn, ext)
        for name, fn in (base_rules or {}).items():
            found[name] = _call(name, fn, base)
        for rule, lr in found.items():
            ok = lr is not None and math.isfinite(lr) and lr > 0
            out.append((task, ext.setting, ext.seed, rule, float(lr) if ok else None, bands.get(rule)))
    if include_builtin:
        for task in tasks:
            out.append((task, "-", "-", "baseline", BASELINE[task.opt_family], None))
    return out


def _call(name, fn, curve):
    try:
        return fn(curve)
    except Exception as err:  # a rule in flux must not kill the benchmark
        print(f"rule {name} raised {err!r} on {curve.task}/{curve.setting}/{curve.seed}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------

def _init_worker():
    import torch
    torch.set_num_threads(1)


def _pretrain(name):
    _init_worker()
    from tasks import BY_NAME
    BY_NAME[name].ensure_pretrained()
    return name


def _execute(jobs: list[tuple], n_jobs: int, verbose: bool) -> None:
    if not jobs:
        return
    by_name = {t.name: t for t in get_tasks()}
    t0, done = time.perf_counter(), 0
    total = sum(len(j[2]) for j in jobs)

    def merge(res):
        nonlocal done
        _GRIDS.clear()
        kind, name, out = res
        task = by_name[name]
        if kind == "train":
            RUNS.update(task, {run_key(*item): r for item, r in out})
        else:
            CURVES.update(task, {curve_key(*item): r for item, r in out})
        done += len(out)
        if verbose:
            print(f"  [{time.perf_counter() - t0:6.0f}s] {done}/{total} done ({kind} {name})",
                  file=sys.stderr, flush=True)

    if n_jobs <= 1:
        _init_worker()
        for j in jobs:
            merge(run_job(j))
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_jobs, initializer=_init_worker) as pool:
        for res in pool.imap_unordered(run_job, jobs):
            merge(res)


def _est_secs(task: Task) -> float:
    secs = [r.get("secs", 0.5) for r in RUNS.get(task).values()]
    return statistics.mean(secs) if secs else (1.0 if task.loss != "criterion" else 0.3)


def _chunk_jobs(missing: dict[str, list], kind: str, tasks_by: dict[str, Task], target_s=8.0):
    jobs = []
    for name, items in missing.items():
        per = max(1, int(target_s / max(0.02, _est_secs(tasks_by[name])))) if kind == "train" else 4
        for i in range(0, len(items), per):
            chunk = items[i:i + per]
            cost = len(chunk) * (_est_secs(tasks_by[name]) if kind == "train" else 3 * _est_secs(tasks_by[name]))
            jobs.append((cost, (kind, name, chunk)))
    return jobs


# ----------------------------------------------------------------------------------------------
# Grid, evaluation statistics
# ----------------------------------------------------------------------------------------------

def k_stats(task: Task, protocol: str, k: int) -> dict | None:
    """3-seed statistics at fine-grid point k, or None if some seed is missing."""
    runs = RUNS.get(task)
    rs = [runs.get(run_key(protocol, k, s)) for s in EVAL_SEEDS]
    if any(r is None for r in rs):
        return None
    finals = [r["final"] for r in rs]
    finite = all(f is not None and math.isfinite(f) for f in finals)
    nonfinite = (not finite) or any(r["train_nonfinite"] for r in rs)
    no_gain = finite and any(f >= r["init"] for f, r in zip(finals, rs))
    mean = statistics.mean(finals) if finite else None
    return {"k": k, "lr": lr_of(k), "finals": finals, "mean": mean, "diverged": nonfinite or no_gain,
            "nonfinite": nonfinite, "no_gain": no_gain, "inits": [r["init"] for r in rs]}


def grid_for(task: Task, protocol: str) -> tuple[list[int], list[str]]:
    """The task's grid for this protocol, widened (from cached results) until the best LR is
    at least EDGE_MARGIN points inside. Returns (ks, notes); ks may need runs not yet done."""
    lo, hi = 0, GRID_POINTS            # grid index range [lo, hi)
    notes = []
    for _ in range(2 * MAX_WIDEN + 1):
        ks = [task.grid_lo_k + GRID_STEP * i for i in range(lo, hi)]
        stats = [k_stats(task, protocol, k) for k in ks]
        if any(s is None for s in stats):
            return ks, notes
        valid = [(s["mean"], i) for i, s in enumerate(stats) if s["mean"] is not None]
        if not valid:
            notes.append("no finite grid point")
            return ks, notes
        _, ib = min(valid)
        if ib < EDGE_MARGIN and lo > -3 * MAX_WIDEN:
            notes.append(f"best at low edge (lr {lr_of(ks[ib]):.2g}); widened down")
            lo -= 3
        elif ib > len(ks) - 1 - EDGE_MARGIN and hi < GRID_POINTS + 3 * MAX_WIDEN:
            notes.append(f"best at high edge (lr {lr_of(ks[ib]):.2g}); widened up")
            hi += 3
        else:
            if ib < EDGE_MARGIN or ib > len(ks) - 1 - EDGE_MARGIN:
                notes.append("STILL AT EDGE after max widening")
            return ks, notes
    return ks, notes


_GRIDS: dict[tuple[str, str], dict | None] = {}
"""grid_best's answers; emptied whenever runs are added (``_execute``)."""


def grid_best(task: Task, protocol: str) -> dict | None:
    key = (task.key, protocol)
    if key not in _GRIDS:
        _GRIDS[key] = _grid_best(task, protocol)
    return _GRIDS[key]


def _grid_best(task: Task, protocol: str) -> dict | None:
    ks, notes = grid_for(task, protocol)
    stats = [k_stats(task, protocol, k) for k in ks]
    if any(s is None for s in stats):
        return None
    valid = [s for s in stats if s["mean"] is not None]
    if not valid:
        return None
    best = min(valid, key=lambda s: s["mean"])
    return {"best": best, "ks": ks, "stats": stats, "notes": notes}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def ensure(tasks: list[Task], protocols, rules: dict[str, Rule], include_builtin=True, n_jobs=2,
           verbose=True, train=True, base_rules=None) -> None:
    """Run everything missing: pre-training, curves, grids (with widening), suggestion evals."""
    if not train:
        return
    pre = {t.pretrain.key: t.name for t in tasks if t.pretrain is not None and not t.pretrain.path().exists()}
    if pre:
        if verbose:
            print(f"pre-training {sorted(pre)}", file=sys.stderr, flush=True)
        if n_jobs > 1 and len(pre) > 1:
            with mp.get_context("spawn").Pool(min(n_jobs, len(pre))) as pool:
                pool.map(_pretrain, list(pre.values()))
        else:
            for name in pre.values():
                _pretrain(name)
    by = {t.name: t for t in tasks}
    for rnd in range(50):
        curve_missing: dict[str, list] = {}
        train_missing: dict[str, list] = {}
        for task in tasks:
            stored = CURVES.get(task)
            cm = [item for item in CURVE_ITEMS if curve_key(*item) not in stored]
            if cm:
                curve_missing[task.name] = cm
            runs = RUNS.get(task)
            need = set()
            for p in protocols:
                ks, _ = grid_for(task, p)
                need |= {(p, k) for k in ks}
            if not cm:
                for (_, _, _, rule, lr, _) in all_suggestions([task], rules, include_builtin, base_rules):
                    if lr is not None:
                        need |= {(p, snap(lr)) for p in protocols_of(rule, protocols)}
            tm = sorted((p, k, s) for p, k in need for s in EVAL_SEEDS if run_key(p, k, s) not in runs)
            if tm:
                train_missing[task.name] = tm
        jobs = _chunk_jobs(curve_missing, "curve", by) + _chunk_jobs(train_missing, "train", by)
        if not jobs:
            return
        jobs.sort(key=lambda cj: -cj[0])
        if verbose:
            n = sum(len(j[1][2]) for j in jobs)
            print(f"round {rnd}: {n} runs/curves in {len(jobs)} jobs", file=sys.stderr, flush=True)
        _execute([j for _, j in jobs], n_jobs, verbose)


def classify(stats: dict, best: dict, k: int, tol: float) -> tuple[str, float | None]:
    regret = None if stats["mean"] is None else stats["mean"] / best["mean"] - 1.0
    if stats["nonfinite"] or (stats["no_gain"] and k > best["k"] and regret > tol):
        return "diverged", regret
    if regret <= tol:
        return "ok", regret
    return ("too_high" if k > best["k"] else "too_low"), regret


def score(rules: dict[str, Rule] | None = None, tasks=None, protocols=PROTOCOLS, *, include_builtin=True,
          n_jobs=2, tol=OK_TOLERANCE, verbose=True, train=True, base_rules: dict[str, Rule] | None = None
          ) -> list[dict]:
    """One record per (rule, task, curve, protocol): suggested / snapped LR, regret, class.

    rules: {name: fn(curve) -> float | None} on the curve with distlr's range extension;
    base_rules: the same, on the curve cut at max_lr. tasks: task names (default: all).
    train=False only re-scores what is cached.
    """
    rules = dict(rules or {})
    task_objs = get_tasks(tasks)
    ensure(task_objs, protocols, rules, include_builtin, n_jobs, verbose, train, base_rules)
    records = []
    bests = {(t.name, p): grid_best(t, p) for t in task_objs for p in protocols}
    for task, setting, seed, rule, lr, band in all_suggestions(task_objs, rules, include_builtin, base_rules):
        for p in protocols_of(rule, protocols):
            records.append(record(task, setting, seed, rule, lr, p, bests[(task.name, p)], tol, band))
    if include_builtin:
        records += [{**r, "rule": DEFAULT} for r in records if DEFAULT_SOURCE.get(r["protocol"]) == r["rule"]]
    return records


def record(task, setting, seed, rule, lr, protocol, gb, tol, band=None) -> dict:
    rec = {"rule": rule, "task": task.name, "family": task.family, "kind": task.kind, "setting": setting,
           "curve_seed": seed, "protocol": protocol, "suggested_lr": lr, "snapped_k": None, "snapped_lr": None,
           "best_lr": None if gb is None else gb["best"]["lr"], "mean_val": None,
           "best_val": None if gb is None else gb["best"]["mean"], "regret": None, "class": None, "band": band}
    if lr is None:
        rec["class"] = "none"
    elif gb is not None:
        k = snap(lr)
        st = k_stats(task, protocol, k)
        rec.update(snapped_k=k, snapped_lr=lr_of(k))
        if st is not None:
            rec["mean_val"] = st["mean"]
            rec["class"], rec["regret"] = classify(st, gb["best"], k, tol)
    return rec


def interpolated(task: Task, protocol: str, lr: float | None) -> tuple[float, str] | None:
    """(regret, class) at ``lr`` read off the task's grid without training: the 3-seed mean
    interpolated linearly in log LR between the two grid points around it (3 a decade), and the
    class of the nearest grid point where that one diverged. For searching constants cheaply;
    every reported figure is a real evaluation (``record``). None when the grid is not complete."""
    gb = grid_best(task, protocol)
    if gb is None:
        return None
    best = gb["best"]
    if lr is None:
        return worst_regret(task, protocol), "none"
    stats = gb["stats"]
    ks = [s["k"] for s in stats]
    k = 10.0 * math.log10(lr)
    i = min(range(len(ks)), key=lambda j: abs(ks[j] - k))
    cls, regret = classify(stats[i], best, ks[i], OK_TOLERANCE)
    if cls == "diverged":
        return (math.inf if stats[i]["nonfinite"] else regret), "diverged"
    j = next((j for j in range(1, len(ks)) if ks[j] >= k), None)
    mean = stats[i]["mean"]
    if j is not None and ks[j - 1] <= k and stats[j - 1]["mean"] is not None and stats[j]["mean"] is not None:
        w = (k - ks[j - 1]) / (ks[j] - ks[j - 1])
        mean = math.exp((1 - w) * math.log(stats[j - 1]["mean"]) + w * math.log(stats[j]["mean"]))
    regret = mean / best["mean"] - 1.0
    if regret <= OK_TOLERANCE:
        return regret, "ok"
    return regret, ("too_high" if k > best["k"] else "too_low")


def worst_regret(task: Task, protocol: str) -> float | None:
    """The regret a failed suggestion is charged: the worst of the task's grid (non-finite
    points excluded), at least the regret of not training at all (the initial val loss)."""
    gb = grid_best(task, protocol)
    if gb is None:
        return None
    b = gb["best"]["mean"]
    worst = max((s["mean"] for s in gb["stats"] if s["mean"] is not None and classify(s, gb["best"], s["k"],
                                                                                    OK_TOLERANCE)[0] != "diverged"),
                default=b)
    init = statistics.mean(gb["best"]["inits"])
    return max(worst, init) / b - 1.0


def grid_summary(tasks=None, protocols=PROTOCOLS, tol=OK_TOLERANCE) -> list[dict]:
    """Per (task, protocol): grid range, best LR, seed spread at the best, width of the ok band."""
    out = []
    for task in get_tasks(tasks):
        for p in protocols:
            gb = grid_best(task, p)
            if gb is None:
                continue
            b = gb["best"]
            f = b["finals"]
            ok_pts = [s for s in gb["stats"] if s["mean"] is not None and classify(s, b, s["k"], tol)[0] == "ok"]
            out.append({
                "task": task.name, "family": task.family, "kind": task.kind, "protocol": p,
                "grid_lo": lr_of(gb["ks"][0]), "grid_hi": lr_of(gb["ks"][-1]), "n_grid": len(gb["ks"]),
                "best_lr": b["lr"], "best_val": b["mean"], "init_val": statistics.mean(b["inits"]),
                "seed_cv": statistics.stdev(f) / b["mean"], "seed_range": (max(f) - min(f)) / b["mean"],
                "ok_band_decades": len(ok_pts) * GRID_STEP / 10,
                "ok_band": (lr_of(min(s["k"] for s in ok_pts)), lr_of(max(s["k"] for s in ok_pts))),
                "curve": [(s["k"], s["mean"]) for s in gb["stats"]],
                "notes": gb["notes"],
            })
    return out
