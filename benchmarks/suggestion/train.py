"""One training run and one range test (what the workers execute)."""

from __future__ import annotations

import math
import time

import torch

from tasks import SplitDataset, Task, loss_of, n_samples, take

ONECYCLE = dict(pct_start=0.3, anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4,
                cycle_momentum=False)
WSD = dict(warmup=0.05, decay=0.2)
"""Warmup-stable-decay: linear warmup from 0 over the first 5 % of the budget, the LR held, then
a linear decay to 0 over the last 20 % (Hägele et al. 2024's cooldown share)."""
PROTOCOLS = ("constant", "onecycle", "wsd")

FINDER_SETTINGS = {
    "default": dict(min_lr=1e-8, max_lr=1e-1, num_steps=100),   # the seed's range
    "wide": dict(min_lr=1e-7, max_lr=10.0, num_steps=100),
}
"""The ranges a new user tries. Each curve is recorded past max_lr as far as distlr's range
extension may go (``distlr.ladder.Ladder.extension_cap``), with the loss stop as usual; what a
run without the extension, or an anchor, would have seen is the first ``num_steps`` points."""
CURVE_SEEDS = (0, 1, 2)
EVAL_SEEDS = (0, 1, 2)


def lr_of(k: int) -> float:
    return 10.0 ** (k / 10.0)


def snap(lr: float) -> int:
    return int(round(10.0 * math.log10(lr)))


@torch.no_grad()
def evaluate(task: Task, model, criterion) -> float:
    model.eval()
    loss = loss_of(task.loss, model, task.data()["val"], criterion)
    model.train()
    return float(loss)


def batches(task: Task, seed: int):
    """Epoch-wise shuffled batches (drop_last), order seeded by ``seed``."""
    train = task.data()["train"]
    n, bs = n_samples(train), task.batch_size
    g = torch.Generator().manual_seed(10_000 + seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            yield take(train, perm[i:i + bs])


def wsd_factor(step: int, total: int) -> float:
    warm = max(1, round(WSD["warmup"] * total))
    decay = max(1, round(WSD["decay"] * total))
    if step < warm:
        return (step + 1) / warm
    if step >= total - decay:
        return (total - step) / (decay + 1)
    return 1.0


def train_run(task: Task, protocol: str, k: int, seed: int) -> dict:
    """Train ``budget`` steps at LR 10**(k/10): constant, the one-cycle peak, or the WSD plateau."""
    t0 = time.perf_counter()
    lr = lr_of(k)
    model = task.make_model(seed)
    criterion = task.criterion()
    opt = task.optimizer(model, lr)
    init = evaluate(task, model, criterion)
    sched = None
    if protocol == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=task.budget, **ONECYCLE)
    elif protocol == "wsd":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: wsd_factor(step, task.budget))
    elif protocol != "constant":
        raise ValueError(protocol)
    train_nonfinite = False
    model.train()
    it = batches(task, seed)
    for step in range(task.budget):
        loss = loss_of(task.loss, model, next(it), criterion)
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


def finder_curve(task: Task, setting: str, seed: int, *, validation: bool = True) -> dict:
    """One range test with distlr's ``LRFinder``, recorded as far as the extension may go.

    With ``validation``, the loss on the whole validation set (4 batches) is measured after
    every step (``val_every=1``; a coarser ``val_every`` is read off it)."""
    from distlr import LRFinder
    from distlr.core.ladder import Ladder

    t0 = time.perf_counter()
    model = task.make_model(seed)
    criterion = task.criterion()
    opt = task.optimizer(model, 1e-3)
    loader = torch.utils.data.DataLoader(SplitDataset(task.data()["train"]), batch_size=task.batch_size,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(20_000 + seed))
    base = FINDER_SETTINGS[setting]
    ladder = Ladder(base["min_lr"], base["max_lr"], base["num_steps"])
    steps = base["num_steps"] + ladder.extension_cap
    kw = dict(min_lr=base["min_lr"], max_lr=ladder.lr(steps - 1), num_steps=steps, extend_range=False)
    val = task.data()["val"]
    val_bs = math.ceil(n_samples(val) / 4)
    if validation:
        kw.update(val_loader=torch.utils.data.DataLoader(SplitDataset(val), batch_size=val_bs), val_every=1,
                  val_batches=4)
    loss_fn = (lambda m, b: loss_of("targets", m, b, None)) if task.loss == "targets" else None
    finder = LRFinder(model, loader, opt, None if loss_fn else criterion, device="cpu", loss_fn=loss_fn)
    try:
        r = finder.find(**kw)
    finally:
        finder.close()

    def clean(v):
        return [float(x) if math.isfinite(x) else None for x in v]

    return {"lrs": [float(x) for x in r.lrs], "losses": clean(r.losses), "smoothed": clean(r.smoothed_losses),
            "diverged_at": r.diverged_at, "stop_reason": str(r.stop_reason), "num_steps": base["num_steps"],
            "val_steps": list(r.val_steps), "val_losses": clean(r.val_losses),
            "secs": round(time.perf_counter() - t0, 3)}


def run_job(job: tuple) -> tuple:
    """Worker entry: ("train", task_name, [(protocol, k, seed), ...]) or ("curve", task_name,
    [(setting, seed, validation)])."""
    import logging
    import warnings
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("distlr").setLevel(logging.ERROR)
    from tasks import BY_NAME
    kind, name, items = job
    task = BY_NAME[name]
    task.ensure_pretrained()
    out = []
    for item in items:
        if kind == "train":
            out.append((item, train_run(task, *item)))
        else:
            setting, seed, validation = item
            out.append((item, finder_curve(task, setting, seed, validation=validation)))
    return kind, name, out
