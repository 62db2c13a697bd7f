"""Score LR-suggestion rules by what their LR buys (library API of the benchmark).

    import sys; sys.path.insert(0, "benchmarks/suggestion")
    import score
    rows = score.score({"my_rule": fn})          # fn(lrs, losses, smoothed, diverged_at, num_steps)

``score`` trains whatever is missing (cached under cache/) and returns one record per
(rule, task, curve, protocol). distlr's own rules (``distlr.analysis.rule_outputs``), the anchors
and the no-finder baseline are always included; pass ``include_builtin=False`` to score only yours.
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
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import anchors  # noqa: E402
from tasks import CACHE, Task, get_tasks  # noqa: E402
from train import CURVE_SEEDS, EVAL_SEEDS, FINDER_SETTINGS, lr_of, run_job, snap  # noqa: E402

OK_TOLERANCE = 0.10
PROTOCOLS = ("constant", "onecycle")
GRID_POINTS, GRID_STEP = 20, 3          # 20 points, 3 fine-grid steps (0.3 decade) apart
EDGE_MARGIN = 2                         # the best must have >= 2 grid points on each side
MAX_WIDEN = 6                           # at most 6 widenings (3 points each) per side
BASELINE = {"adam": 1e-3, "sgd": 1e-2}
# A run whose final val loss is finite but >= its initial one counts as "diverged" only above the
# grid's best LR; below it, it is a stall (LR too small to move the loss, e.g. BatchNorm running
# stats drifting at lr 1e-8) and is classed too_low. False = the literal definition.
STALL_BELOW_BEST_IS_TOO_LOW = True

Rule = Callable[..., "float | None"]


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


def curve_key(setting, seed):
    return f"{setting}|{seed}"


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
    return statistics.mean(secs) if secs else (1.5 if task.is_lm else 0.3)


def _chunk_jobs(missing: dict[str, list], kind: str, tasks_by: dict[str, Task], target_s=8.0):
    jobs = []
    for name, items in missing.items():
        per = max(1, int(target_s / max(0.02, _est_secs(tasks_by[name])))) if kind == "train" else 8
        for i in range(0, len(items), per):
            chunk = items[i:i + per]
            cost = len(chunk) * (_est_secs(tasks_by[name]) if kind == "train" else 0.5)
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
            "nonfinite": nonfinite, "no_gain": no_gain,
            "inits": [r["init"] for r in rs]}


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


def grid_best(task: Task, protocol: str) -> dict | None:
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
# Rules
# ----------------------------------------------------------------------------------------------

def _as_float_list(v):
    return [float("nan") if x is None else float(x) for x in v]


def curve_suggestions(curve: dict, rules: dict[str, Rule], include_builtin: bool) -> dict[str, float | None]:
    lrs, losses, smoothed = curve["lrs"], _as_float_list(curve["losses"]), _as_float_list(curve["smoothed"])
    dv, n = curve["diverged_at"], curve["num_steps"]
    out: dict[str, float | None] = {}
    if include_builtin:
        from distlr.analysis import rule_outputs
        try:
            for name, lr in rule_outputs(lrs, losses, smoothed, dv).items():
                out[f"distlr:{name}"] = lr
        except Exception as err:  # a rule in flux must not kill the benchmark
            out["distlr:ERROR"] = None
            print(f"distlr rule_outputs raised {err!r}", file=sys.stderr)
        for name, fn in anchors.ANCHORS.items():
            out[name] = fn(lrs, losses, smoothed, dv, n)
    for name, fn in rules.items():
        try:
            out[name] = fn(lrs, losses, smoothed, dv, n)
        except Exception as err:
            print(f"rule {name} raised {err!r}", file=sys.stderr)
            out[name] = None
    return {k: (float(v) if v is not None and math.isfinite(v) and v > 0 else None) for k, v in out.items()}


def all_suggestions(tasks, rules, include_builtin):
    """[(task, setting, curve_seed, rule, lr)] for every stored curve, plus the baseline."""
    out = []
    for task in tasks:
        curves = CURVES.get(task)
        for setting in FINDER_SETTINGS:
            for seed in CURVE_SEEDS:
                c = curves.get(curve_key(setting, seed))
                if c is None:
                    continue
                for rule, lr in curve_suggestions(c, rules, include_builtin).items():
                    out.append((task, setting, seed, rule, lr))
        if include_builtin:
            out.append((task, "-", "-", "baseline", BASELINE[task.opt_family]))
    return out


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def ensure(tasks: list[Task], protocols, rules: dict[str, Rule], include_builtin=True, n_jobs=2,
           verbose=True, train=True) -> None:
    """Run everything missing: pre-training, curves, grids (with widening), suggestion evals."""
    if not train:
        return
    pre = [t for t in tasks if t.pretrain_fn is not None and not t.pretrained_path().exists()]
    if pre:
        if verbose:
            print(f"pre-training {[t.name for t in pre]}", file=sys.stderr, flush=True)
        if n_jobs > 1 and len(pre) > 1:
            with mp.get_context("spawn").Pool(min(n_jobs, len(pre))) as pool:
                pool.map(_pretrain, [t.name for t in pre])
        else:
            for t in pre:
                _pretrain(t.name)
    by = {t.name: t for t in tasks}
    for rnd in range(50):
        curve_missing: dict[str, list] = {}
        train_missing: dict[str, list] = {}
        for task in tasks:
            curves = CURVES.get(task)
            cm = [(s, seed) for s in FINDER_SETTINGS for seed in CURVE_SEEDS
                  if curve_key(s, seed) not in curves]
            if cm:
                curve_missing[task.name] = cm
            runs = RUNS.get(task)
            need = set()
            for p in protocols:
                ks, _ = grid_for(task, p)
                need |= {(p, k) for k in ks}
            for (t, _, _, _, lr) in all_suggestions([task], rules, include_builtin):
                if lr is not None:
                    need |= {(p, snap(lr)) for p in protocols}
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
    if stats["nonfinite"] or (stats["no_gain"] and not (STALL_BELOW_BEST_IS_TOO_LOW and k < best["k"])):
        return "diverged", regret
    if regret <= tol:
        return "ok", regret
    return ("too_high" if k > best["k"] else "too_low"), regret


def score(rules: dict[str, Rule] | None = None, tasks=None, protocols=PROTOCOLS, *, include_builtin=True,
          n_jobs=2, tol=OK_TOLERANCE, verbose=True, train=True) -> list[dict]:
    """One record per (rule, task, curve, protocol): suggested / snapped LR, regret, class.

    rules: {name: fn(lrs, losses, smoothed, diverged_at, num_steps) -> float | None}.
    tasks: task names (default: all). train=False only re-scores what is cached.
    """
    rules = dict(rules or {})
    task_objs = get_tasks(tasks)
    ensure(task_objs, protocols, rules, include_builtin, n_jobs, verbose, train)
    records = []
    bests = {(t.name, p): grid_best(t, p) for t in task_objs for p in protocols}
    for task, setting, seed, rule, lr in all_suggestions(task_objs, rules, include_builtin):
        for p in protocols:
            gb = bests[(task.name, p)]
            rec = {"rule": rule, "task": task.name, "half": task.half, "kind": task.kind, "setting": setting,
                   "curve_seed": seed, "protocol": p, "suggested_lr": lr, "snapped_k": None, "snapped_lr": None,
                   "best_lr": None if gb is None else gb["best"]["lr"], "mean_val": None,
                   "best_val": None if gb is None else gb["best"]["mean"], "regret": None, "class": None}
            if lr is None:
                rec["class"] = "none"
            elif gb is not None:
                k = snap(lr)
                st = k_stats(task, p, k)
                rec.update(snapped_k=k, snapped_lr=lr_of(k))
                if st is not None:
                    rec["mean_val"] = st["mean"]
                    rec["class"], rec["regret"] = classify(st, gb["best"], k, tol)
            records.append(rec)
    return records


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
            ok_pts = [s for s in gb["stats"] if s["mean"] is not None and not s["diverged"]
                      and s["mean"] / b["mean"] - 1 <= tol]
            out.append({
                "task": task.name, "half": task.half, "kind": task.kind, "protocol": p,
                "grid_lo": lr_of(gb["ks"][0]), "grid_hi": lr_of(gb["ks"][-1]), "n_grid": len(gb["ks"]),
                "best_lr": b["lr"], "best_val": b["mean"], "init_val": statistics.mean(b["inits"]),
                "seed_cv": statistics.stdev(f) / b["mean"], "seed_range": (max(f) - min(f)) / b["mean"],
                "ok_band_decades": len(ok_pts) * GRID_STEP / 10,
                "ok_band": (lr_of(min(s["k"] for s in ok_pts)), lr_of(max(s["k"] for s in ok_pts))),
                "curve": [(s["k"], s["mean"]) for s in gb["stats"]],
                "notes": gb["notes"],
            })
    return out
