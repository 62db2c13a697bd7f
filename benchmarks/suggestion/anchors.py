"""The anchors' suggestion rules (torch-lr-finder, fastai, Lightning), written from the
pseudo-code in /work/shared/ANCHOR_RULES.md (sections D0, D1, D2, D4).

Each rule takes distlr's recorded raw curve (lrs, raw losses up to and including the diverging
point, non-finite tail dropped), applies the anchor's own smoothing, and returns a float LR or
None (too few points, or the anchor's code would raise).

``python anchors.py`` runs the self-check against the "Reference outputs" table (noise 0).
"""

from __future__ import annotations

import math

import numpy as np


# ---- smoothing (D0) ---------------------------------------------------------------------------

def tlf_smooth(raw, f=0.05):
    out, s = [], None
    for k, x in enumerate(raw):
        s = x if k == 0 else f * x + (1 - f) * s
        out.append(s)
    return np.asarray(out, dtype=float)


def debiased_smooth(raw, beta=0.98, offset=1):
    """fastai's EMA, debiased by 1 - beta^(k + offset): offset 1 is fastai's, 2 Lightning's
    (its debias exponent is global_step + 1 with global_step = k + 1, an off-by-one)."""
    out, v = [], 0.0
    for k, x in enumerate(raw):
        v = beta * v + (1 - beta) * x
        out.append(v / (1 - beta ** (k + offset)))
    return np.asarray(out, dtype=float)


def fastai_smooth(raw):
    return debiased_smooth(raw, offset=1)


def lightning_smooth(raw):
    return debiased_smooth(raw, offset=2)


# ---- D1 torch-lr-finder steepest -------------------------------------------------------------

def tlf_steepest_rule(lrs, loss, skip_start=10, skip_end=5):
    lrs, loss = np.asarray(lrs, float), np.asarray(loss, float)
    if len(lrs) < skip_start + skip_end + 2:
        return None
    if skip_end == 0:
        L, X = loss[skip_start:], lrs[skip_start:]
    else:
        L, X = loss[skip_start:len(loss) - skip_end], lrs[skip_start:len(lrs) - skip_end]
    if len(L) < 2:
        return None
    i = int(np.argmin(np.gradient(L)))
    return float(X[i])


# ---- D2 Lightning ---------------------------------------------------------------------------

def lightning_rule(lrs, loss, skip_begin=10, skip_end=1, mode="new"):
    lrs, loss = np.asarray(lrs, float), np.asarray(loss, float)
    idx = np.arange(len(loss))[skip_begin:-skip_end] if skip_end else np.arange(0)
    L = loss[skip_begin:-skip_end] if skip_end else loss[:0]
    X = lrs[skip_begin:-skip_end] if skip_end else lrs[:0]
    keep = np.isfinite(L)
    L, X, idx = L[keep], X[keep], idx[keep]
    if len(L) < 2:
        return None
    if mode == "new":                      # >= 2.5.3: d loss / d lr (raw lr)
        with np.errstate(all="ignore"):
            g = np.gradient(L, X)
        if not np.all(np.isfinite(g)):
            return None
        return float(lrs[idx[int(np.argmin(g))]])
    g = np.gradient(L)                     # < 2.5.3: per index, ignores the finite-filter offset
    j = int(np.argmin(g)) + skip_begin
    if j >= len(lrs):
        return None
    return float(lrs[j])


# ---- D4 fastai --------------------------------------------------------------------------------

def fastai_prepare(rec_lrs, rec_loss, num_it):
    X = np.asarray(rec_lrs, float)[num_it // 10:-5]
    L = np.asarray(rec_loss, float)[num_it // 10:-5]
    nan = np.flatnonzero(np.isnan(L))
    if len(nan):
        X, L = X[:nan[0]], L[:nan[0]]
    return X, L


def fa_minimum(X, L):
    if len(L) == 0:
        return None
    return float(X[int(np.argmin(L))]) / 10


def fa_steep(X, L):
    if len(L) < 2:
        return None
    g = (L[1:] - L[:-1]) / (np.log(X[1:]) - np.log(X[:-1]))
    return float(X[int(np.argmin(g))])


def fa_valley(X, L):
    n = len(L)
    if n == 0:
        return None
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(0, i):
            if L[i] < L[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(X[idx])


def fa_slide(X, L, lr_diff=15, thresh=0.005, adjust_value=1.0):
    if len(L) < 2:
        return None
    g = np.gradient(L)
    r, l = -1, -1 - lr_diff
    if -l > len(X):
        return None                        # X[l] would raise IndexError
    local = X[l]
    while l >= -len(L) and abs(g[r] - g[l]) > thresh:
        local = X[l]
        r -= 1
        l -= 1
    return float(local * adjust_value)


# ---- the rules as the benchmark calls them -------------------------------------------------

def _raw_curve(lrs, losses, diverged_at):
    """distlr's raw losses up to and including the diverging point, non-finite tail dropped."""
    end = len(losses) if diverged_at is None else min(len(losses), diverged_at + 1)
    lrs, raw = list(lrs[:end]), [float("nan") if x is None else float(x) for x in losses[:end]]
    while raw and not math.isfinite(raw[-1]):
        raw.pop()
        lrs.pop()
    return np.asarray(lrs, float), np.asarray(raw, float)


def _safe(fn):
    def wrapped(lrs, losses, smoothed, diverged_at, num_steps):
        try:
            X, raw = _raw_curve(lrs, losses, diverged_at)
            if len(raw) == 0:
                return None
            out = fn(X, raw, num_steps)
        except (IndexError, ValueError, RuntimeError, FloatingPointError):
            return None
        if out is None or not math.isfinite(out) or out <= 0:
            return None
        return float(out)
    wrapped.__name__ = fn.__name__
    return wrapped


def _fastai(rule):
    def f(X, raw, num_it):
        Xs, L = fastai_prepare(X, fastai_smooth(raw), num_it)
        return rule(Xs, L)
    return f


ANCHORS = {
    "tlf_steepest": _safe(lambda X, raw, n: tlf_steepest_rule(X, tlf_smooth(raw))),
    "fastai_valley": _safe(_fastai(fa_valley)),
    "fastai_minimum": _safe(_fastai(fa_minimum)),
    "fastai_steep": _safe(_fastai(fa_steep)),
    "fastai_slide": _safe(_fastai(fa_slide)),
    "lightning_new": _safe(lambda X, raw, n: lightning_rule(X, lightning_smooth(raw), mode="new")),
    "lightning_old": _safe(lambda X, raw, n: lightning_rule(X, lightning_smooth(raw), mode="old")),
}


# ---- self-check against the reference table (noise 0, each anchor end to end) ------------

def _true_loss(lr):
    x = math.log10(lr)
    return 2.3 - 1.8 / (1 + math.exp(-2.5 * (x + 3))) + (3 * (x + 1.5) ** 2 if lr > 10 ** -1.5 else 0.0)


def _run_pipeline(ladder, smooth_step, stop):
    """Record the smoothed loss along the ladder until the anchor's divergence stop."""
    lrs, rec = [], []
    state = {}
    for k, lr in enumerate(ladder):
        s = smooth_step(state, k, _true_loss(lr))
        lrs.append(lr)
        rec.append(s)
        if stop(rec, k):
            break
    return np.asarray(lrs), np.asarray(rec)


def self_check(verbose=True) -> bool:
    N = 100
    ok = True

    def ema_step(f):
        def step(st, k, x):
            st["s"] = x if k == 0 else f * x + (1 - f) * st["s"]
            return st["s"]
        return step

    def debiased_step(offset):
        def step(st, k, x):
            st["v"] = 0.98 * st.get("v", 0.0) + 0.02 * x
            return st["v"] / (1 - 0.98 ** (k + offset))
        return step

    results = {}
    # torch-lr-finder: inclusive exp ladder 1e-7..10, f=0.05, stop at 5x best (point kept)
    ladder = [1e-7 * (1e8) ** (k / (N - 1)) for k in range(N)]
    X, L = _run_pipeline(ladder, ema_step(0.05), lambda r, k: r[-1] > 5 * min(r))
    results["tlf_steepest"] = (tlf_steepest_rule(X, L), 4.04e-3)
    # fastai: lr_k = start*(end/start)^(k/N), beta .98 debiased, stop at 4x best
    ladder = [1e-7 * (1e8) ** (k / N) for k in range(N)]
    X, L = _run_pipeline(ladder, debiased_step(1), lambda r, k: r[-1] > 4 * min(r))
    Xs, Ls = fastai_prepare(X, L, N)
    results["fastai_valley"] = (fa_valley(Xs, Ls), 2.29e-4)
    results["fastai_steep"] = (fa_steep(Xs, Ls), 4.37e-3)
    results["fastai_minimum"] = (fa_minimum(Xs, Ls), 1.00e-2)
    results["fastai_slide"] = (fa_slide(Xs, Ls), 2.51e-3)
    # Lightning: lr_0 = start, lr_k = start*(end/start)^((k+1)/N); 1e-8..1; off-by-one EMA; stop 4x
    ladder = [1e-8] + [1e-8 * (1e8) ** ((k + 1) / N) for k in range(1, N)]
    X, L = _run_pipeline(ladder, debiased_step(2), lambda r, k: k > 0 and r[-1] > 4 * min(r))
    results["lightning_new"] = (lightning_rule(X, L, mode="new"), 1.74e-4)
    results["lightning_old"] = (lightning_rule(X, L, mode="old"), 5.75e-3)
    for name, (got, want) in results.items():
        good = got is not None and abs(math.log10(got / want)) < 0.02
        ok &= good
        if verbose:
            print(f"{name:16s} got {got:.3g}  reference {want:.3g}  {'OK' if good else 'MISMATCH'}")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if self_check() else 1)
