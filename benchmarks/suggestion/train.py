"""One training run and one finder sweep (what the workers execute)."""

from __future__ import annotations

import math
import time

import torch

from tasks import LMData, Task

ONECYCLE = dict(pct_start=0.3, anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4,
                cycle_momentum=False)

FINDER_SETTINGS = {
    "default": dict(min_lr=1e-8, max_lr=1e-1, num_steps=100),
    "wide": dict(min_lr=1e-7, max_lr=10.0, num_steps=100),
    "short50": dict(min_lr=1e-6, max_lr=10.0, num_steps=50),
    "short30": dict(min_lr=1e-8, max_lr=1e-1, num_steps=30),
}
CURVE_SEEDS = (0, 1)
EVAL_SEEDS = (0, 1, 2)


def lr_of(k: int) -> float:
    return 10.0 ** (k / 10.0)


def snap(lr: float) -> int:
    return int(round(10.0 * math.log10(lr)))


def _loss(task: Task, model, batch, criterion):
    if task.is_lm:
        return model(input_ids=batch, labels=batch).loss
    x, y = batch
    return criterion(model(x), y)


@torch.no_grad()
def evaluate(task: Task, model, criterion) -> float:
    model.eval()
    val = task.data()["val"]
    loss = _loss(task, model, val, criterion)
    model.train()
    return float(loss)


def _batches(task: Task, seed: int):
    """Epoch-wise shuffled batches (drop_last), order seeded by ``seed``."""
    train = task.data()["train"]
    n = len(train) if task.is_lm else len(train[0])
    bs = task.batch_size
    g = torch.Generator().manual_seed(10_000 + seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs]
            yield train[idx] if task.is_lm else (train[0][idx], train[1][idx])


def train_run(task: Task, protocol: str, k: int, seed: int) -> dict:
    """Train ``budget`` steps at LR 10**(k/10) (constant, or as the one-cycle peak)."""
    t0 = time.perf_counter()
    lr = lr_of(k)
    model = task.make_model(seed)
    criterion = task.criterion()
    opt = task.opt_fn(model.parameters(), lr)
    init = evaluate(task, model, criterion)
    sched = None
    if protocol == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=task.budget, **ONECYCLE)
    elif protocol != "constant":
        raise ValueError(protocol)
    train_nonfinite = False
    model.train()
    it = _batches(task, seed)
    for step in range(task.budget):
        loss = _loss(task, model, next(it), criterion)
        if not torch.isfinite(loss):
            train_nonfinite = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None and step < task.budget - 1:
            sched.step()
    final = None if train_nonfinite else evaluate(task, model, criterion)
    if final is not None and not math.isfinite(final):
        final = None
    return {"init": init, "final": final, "train_nonfinite": train_nonfinite,
            "secs": round(time.perf_counter() - t0, 3)}


def finder_curve(task: Task, setting: str, seed: int) -> dict:
    from distlr import LRFinder
    t0 = time.perf_counter()
    model = task.make_model(seed)
    criterion = task.criterion()
    opt = task.opt_fn(model.parameters(), 1e-3)
    train = task.data()["train"]
    ds = LMData(train) if task.is_lm else torch.utils.data.TensorDataset(*train)
    loader = torch.utils.data.DataLoader(ds, batch_size=task.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(20_000 + seed))
    kw = FINDER_SETTINGS[setting]
    finder = LRFinder(model, loader, opt, criterion, device="cpu")
    try:
        r = finder.find(**kw)
    finally:
        finder.close()

    def clean(v):
        return [float(x) if math.isfinite(x) else None for x in v]

    return {"lrs": [float(x) for x in r.lrs], "losses": clean(r.losses), "smoothed": clean(r.smoothed_losses),
            "diverged_at": r.diverged_at, "stop_reason": str(r.stop_reason), "num_steps": kw["num_steps"],
            "secs": round(time.perf_counter() - t0, 3)}


def run_job(job: tuple) -> tuple:
    """Worker entry: ("train", task_name, [(protocol, k, seed), ...]) or ("curve", task_name, [(setting, seed)])."""
    import logging
    import warnings
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("distlr").setLevel(logging.ERROR)
    from tasks import BY_NAME
    kind, name, items = job
    task = BY_NAME[name]
    out = []
    for item in items:
        if kind == "train":
            out.append((item, train_run(task, *item)))
        else:
            out.append((item, finder_curve(task, *item)))
    return kind, name, out
