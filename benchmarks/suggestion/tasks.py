"""The benchmark's tasks: data, model, optimizer, loss, budget.

Every task is small enough that one training run (budget optimizer steps + two val passes)
takes about a second or less on one CPU thread. Data is generated, comes from scikit-learn's
bundled datasets, or from Python's own stdlib text (pydoc topics, stdlib source). Nothing
downloads.

Bump a task's ``version`` whenever anything that changes its numbers changes: the cache key
includes it.
"""

from __future__ import annotations

import functools
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


# ----------------------------------------------------------------------------------------------
# Task container
# ----------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    version: int
    half: str                      # "tune" or "held-out"
    kind: str                      # "ordinary" or "finetune"
    opt_family: str                # "sgd" or "adam" (for the no-finder baseline)
    description: str
    batch_size: int
    budget: int                    # optimizer steps of one training run
    grid_lo_k: int                 # first grid point, as k in 10**(k/10)
    data_fn: Callable[[], dict]    # -> {"train": tensors/tuple, "val": ...}
    model_fn: Callable[[int], nn.Module]
    opt_fn: Callable[[Any, float], torch.optim.Optimizer]
    criterion_fn: Callable[[], nn.Module | None]
    is_lm: bool = False
    pretrain_fn: Callable[["Task"], dict] | None = None   # -> state_dict (fine-tuning tasks)
    pretrain_version: int = 1      # bump when pretrain_fn changes (independent of version)
    reset_head: bool = False       # fine-tuning with a new (seeded) head: model.head.reset_parameters()
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    # data is built once per process
    def data(self) -> dict:
        return _data_cache(self.name, self.version, self.data_fn)

    def criterion(self):
        return self.criterion_fn()

    def pretrained_path(self) -> Path:
        return CACHE / "pretrained" / f"{self.name}@pre{self.pretrain_version}.pt"

    def ensure_pretrained(self) -> None:
        if self.pretrain_fn is None:
            return
        path = self.pretrained_path()
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.pretrain_fn(self)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self.model_fn(seed)
        if self.pretrain_fn is not None:
            state = _load_pretrained(str(self.pretrained_path()))
            model.load_state_dict(state)
            if self.reset_head:
                torch.manual_seed(seed)
                model.head.reset_parameters()
        return model


_DATA: dict = {}


def _data_cache(name, version, fn):
    k = (name, version)
    if k not in _DATA:
        _DATA[k] = fn()
    return _DATA[k]


@functools.lru_cache(maxsize=None)
def _load_pretrained(path: str) -> dict:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------

def _split(X, y, n_val, seed=0):
    g = np.random.default_rng(seed)
    idx = g.permutation(len(X))
    va, tr = idx[:n_val], idx[n_val:]
    return (X[tr], y[tr]), (X[va], y[va])


def _t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _standardise(tr, va):
    mu, sd = tr.mean(0), tr.std(0) + 1e-8
    return (tr - mu) / sd, (va - mu) / sd


def data_breast_cancer():
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    (Xt, yt), (Xv, yv) = _split(X, y, 170)
    Xt, Xv = _standardise(Xt, Xv)
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


def data_diabetes():
    from sklearn.datasets import load_diabetes
    X, y = load_diabetes(return_X_y=True)
    (Xt, yt), (Xv, yv) = _split(X, y, 130)
    Xt, Xv = _standardise(Xt, Xv)
    mu, sd = yt.mean(), yt.std()
    yt, yv = (yt - mu) / sd, (yv - mu) / sd
    return {"train": (_t(Xt), _t(yt)[:, None]), "val": (_t(Xv), _t(yv)[:, None])}


def data_sum_regression():
    g = np.random.default_rng(3)
    d = 20
    X = g.normal(size=(1400, d))
    y = X.sum(1) / math.sqrt(d) + 0.5 * np.sin(2 * X[:, 0]) + 0.3 * g.normal(size=len(X))
    (Xt, yt), (Xv, yv) = _split(X, y, 400)
    return {"train": (_t(Xt), _t(yt)[:, None]), "val": (_t(Xv), _t(yv)[:, None])}


def data_clusters():
    g = np.random.default_rng(4)
    d, c = 24, 8
    centers = g.normal(size=(c, d)) * 0.9
    y = g.integers(0, c, size=2000)
    X = centers[y] + g.normal(size=(len(y), d))
    (Xt, yt), (Xv, yv) = _split(X, y, 500)
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


def _digits(classes=None):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if classes is not None:
        m = np.isin(y, classes)
        X, y = X[m], y[m]
    return X.reshape(-1, 1, 8, 8), y


def data_digits():
    X, y = _digits()
    (Xt, yt), (Xv, yv) = _split(X, y, 500)
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


def data_digits_ft():
    X, y = _digits(classes=[5, 6, 7, 8, 9])
    (Xt, yt), (Xv, yv) = _split(X, y, 400, seed=5)
    Xt, yt = Xt[:120], yt[:120]            # a small fine-tuning set
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


def data_digits_pre():
    X, y = _digits(classes=[0, 1, 2, 3, 4])
    return {"train": (_t(X), _t(y, torch.long))}


def data_gru_cls():
    g = np.random.default_rng(7)
    n, T, d = 1600, 12, 4
    X = g.normal(size=(n, T, d))
    # label: which of 4 channels has the largest sum over the second half of the sequence
    y = X[:, T // 2:, :].sum(1).argmax(1)
    (Xt, yt), (Xv, yv) = _split(X, y, 400)
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


def data_lstm_reg():
    g = np.random.default_rng(8)
    n, T, d = 1400, 12, 3
    X = g.normal(size=(n, T, d))
    w = 0.75 ** np.arange(T)[::-1]
    y = (X[:, :, 0] * w).sum(1) - 0.5 * (X[:, :, 1] * w[::-1]).sum(1) + 0.2 * g.normal(size=n)
    y = y / y.std()
    (Xt, yt), (Xv, yv) = _split(X, y, 400)
    return {"train": (_t(Xt), _t(yt)[:, None]), "val": (_t(Xv), _t(yv)[:, None])}


def data_moons():
    from sklearn.datasets import make_moons
    X, y = make_moons(n_samples=1200, noise=0.25, random_state=10)
    g = np.random.default_rng(10)
    X = np.concatenate([X, 0.5 * g.normal(size=(len(X), 6))], 1)   # 6 nuisance features
    (Xt, yt), (Xv, yv) = _split(X, y, 400)
    return {"train": (_t(Xt), _t(yt, torch.long)), "val": (_t(Xv), _t(yv, torch.long))}


# ---- text ------------------------------------------------------------------------------------

SEQ = 64


def pydoc_bytes() -> bytes:
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace")


def stdlib_bytes(name: str) -> bytes:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes()


def _chunks(b: bytes, n: int, offset: int = 0) -> torch.Tensor:
    a = np.frombuffer(b, dtype=np.uint8)[offset: offset + n * SEQ]
    return torch.as_tensor(a.astype(np.int64)).view(n, SEQ)


def data_pydoc_lm():
    b = pydoc_bytes()
    return {"train": _chunks(b, 1500), "val": _chunks(b, 48, offset=len(b) - 48 * SEQ - 1)}


def data_pydoc_pre():
    b = pydoc_bytes()
    n = (len(b) - 60_000) // SEQ
    return {"train": _chunks(b, n)}


def data_source_ft():
    # the html5 entity table of the stdlib's html/entities.py: a different, very regular text
    b = stdlib_bytes("html/entities.py")
    return {"train": _chunks(b, 96, offset=14_000), "val": _chunks(b, 48, offset=34_000)}   # 6 KB / 3 KB


class LMData(torch.utils.data.Dataset):
    """Token rows as the dict batches a Hugging Face causal LM takes."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def tiny_gpt(seed: int) -> nn.Module:
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg)
    m.loss_type = "ForCausalLM"
    return m


class SmallCNN(nn.Module):
    def __init__(self, width=8, n_out=10):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width * 16, n_out)

    def forward(self, x):
        return self.head(self.f(x).flatten(1))


class SeqNet(nn.Module):
    def __init__(self, cell: str, d_in: int, hidden: int, n_out: int):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def mlp(d_in, hidden, d_out, depth=2):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def bn_mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(hidden, d_out))


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------

def sgd(p, lr):
    return torch.optim.SGD(p, lr=lr)


def sgd_m(p, lr):
    return torch.optim.SGD(p, lr=lr, momentum=0.9)


def sgd_nesterov(p, lr):
    return torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)


def adam(p, lr):
    return torch.optim.Adam(p, lr=lr)


def adamw(p, lr):
    return torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


# ----------------------------------------------------------------------------------------------
# Pre-training for the fine-tuning tasks (run once, cached under cache/pretrained/)
# ----------------------------------------------------------------------------------------------

def _plain_train(model, opt, batches, steps, loss_fn):
    model.train()
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def pretrain_gpt(task: Task) -> dict:
    torch.manual_seed(1234)
    ids = data_pydoc_pre()["train"]
    model = tiny_gpt(1234)
    steps = 1500
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1234)
    model.train()
    for step in range(steps):
        b = ids[torch.randint(len(ids), (16,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step < steps - 1:
            sched.step()
    return model.state_dict()


def pretrain_cnn(task: Task) -> dict:
    torch.manual_seed(4321)
    X, y = data_digits_pre()["train"]
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(4321)
    model.train()
    for step in range(600):
        i = torch.randint(len(X), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(X[i]), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


# ----------------------------------------------------------------------------------------------
# The task list
# ----------------------------------------------------------------------------------------------

CE, MSE = nn.CrossEntropyLoss, nn.MSELoss

TASKS: list[Task] = [
    Task("logreg_bc", 1, "tune", "ordinary", "sgd", "logistic regression, breast_cancer, SGD, CE",
         batch_size=32, budget=150, grid_lo_k=-40, data_fn=data_breast_cancer,
         model_fn=lambda s: nn.Linear(30, 2), opt_fn=sgd, criterion_fn=CE),
    Task("linreg_diabetes", 2, "held-out", "ordinary", "sgd", "linear regression, diabetes, SGD, MSE",
         batch_size=16, budget=60, grid_lo_k=-40, data_fn=data_diabetes,
         model_fn=lambda s: nn.Linear(10, 1), opt_fn=sgd, criterion_fn=MSE),
    Task("mlp_sum", 1, "tune", "ordinary", "sgd", "MLP regression y~sum(x), SGD momentum 0.9, MSE",
         batch_size=32, budget=200, grid_lo_k=-45, data_fn=data_sum_regression,
         model_fn=lambda s: mlp(20, 64, 1), opt_fn=sgd_m, criterion_fn=MSE),
    Task("bn_dropout_mlp", 1, "held-out", "ordinary", "adam", "BatchNorm+Dropout MLP, clusters, Adam, CE, bs16",
         batch_size=16, budget=200, grid_lo_k=-55, data_fn=data_clusters,
         model_fn=lambda s: bn_mlp(24, 64, 8), opt_fn=adam, criterion_fn=CE),
    Task("cnn_digits_nesterov", 1, "tune", "ordinary", "sgd", "CNN, digits, SGD Nesterov 0.9, CE",
         batch_size=32, budget=150, grid_lo_k=-45, data_fn=data_digits,
         model_fn=lambda s: SmallCNN(), opt_fn=sgd_nesterov, criterion_fn=CE),
    Task("cnn_digits_adamw", 1, "held-out", "ordinary", "adam", "CNN, digits, AdamW wd 0.01, CE",
         batch_size=32, budget=150, grid_lo_k=-55, data_fn=data_digits,
         model_fn=lambda s: SmallCNN(), opt_fn=adamw, criterion_fn=CE),
    Task("gru_cls", 1, "tune", "ordinary", "adam", "GRU sequence classification, Adam, CE",
         batch_size=32, budget=200, grid_lo_k=-50, data_fn=data_gru_cls,
         model_fn=lambda s: SeqNet("gru", 4, 24, 4), opt_fn=adam, criterion_fn=CE),
    Task("lstm_reg", 1, "held-out", "ordinary", "sgd", "LSTM sequence regression, SGD momentum 0.9, MSE",
         batch_size=32, budget=200, grid_lo_k=-45, data_fn=data_lstm_reg,
         model_fn=lambda s: SeqNet("lstm", 3, 24, 1), opt_fn=sgd_m, criterion_fn=MSE),
    Task("gpt_pydoc", 1, "tune", "ordinary", "adam", "tiny GPT-2 causal LM, pydoc bytes, AdamW",
         batch_size=8, budget=150, grid_lo_k=-55, data_fn=data_pydoc_lm,
         model_fn=tiny_gpt, opt_fn=adamw, criterion_fn=lambda: None, is_lm=True),
    Task("mlp_bs2", 1, "held-out", "ordinary", "sgd", "MLP classifier, noisy moons, batch 2, SGD momentum 0.9",
         batch_size=2, budget=300, grid_lo_k=-55, data_fn=data_moons,
         model_fn=lambda s: mlp(8, 32, 2), opt_fn=sgd_m, criterion_fn=CE),
    Task("ft_gpt_source", 2, "tune", "finetune", "adam",
         "FT: tiny GPT-2 pretrained on pydoc, fine-tuned on 6 KB of html/entities.py, AdamW",
         batch_size=8, budget=100, grid_lo_k=-55, data_fn=data_source_ft,
         model_fn=tiny_gpt, opt_fn=adamw, criterion_fn=lambda: None, is_lm=True, pretrain_fn=pretrain_gpt),
    Task("ft_cnn_digits", 2, "held-out", "finetune", "adam",
         "FT: CNN pretrained on digits 0-4, fine-tuned on 120 digits 5-9 (new seeded head), Adam",
         batch_size=16, budget=100, grid_lo_k=-60, data_fn=data_digits_ft,
         model_fn=lambda s: SmallCNN(), opt_fn=adam, criterion_fn=CE, pretrain_fn=pretrain_cnn,
         reset_head=True),
]

BY_NAME = {t.name: t for t in TASKS}


def get_tasks(names=None) -> list[Task]:
    if names is None:
        return list(TASKS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known: {list(BY_NAME)}")
    return [BY_NAME[n] for n in names]
