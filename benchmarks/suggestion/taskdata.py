"""The benchmark's data: generated, scikit-learn's bundled datasets, or Python's own text.

Nothing downloads. Every builder is deterministic (its own seeded generator) and returns
``{"train": split, "val": split}`` where a split is a tuple of tensors ``(inputs, targets)`` or a
dict of tensors (Hugging Face style batches), every tensor with the samples on dim 0.
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from models import SEQ


def split(X, y, n_val, seed=0):
    g = np.random.default_rng(seed)
    idx = g.permutation(len(X))
    va, tr = idx[:n_val], idx[n_val:]
    return (X[tr], y[tr]), (X[va], y[va])


def t(a, dtype=torch.float32):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def standardise(tr, va):
    mu, sd = tr.mean(0), tr.std(0) + 1e-8
    return (tr - mu) / sd, (va - mu) / sd


def _classification(X, y, n_val, seed=0, standard=True):
    (Xt, yt), (Xv, yv) = split(X, y, n_val, seed)
    if standard:
        Xt, Xv = standardise(Xt, Xv)
    return {"train": (t(Xt), t(yt, torch.long)), "val": (t(Xv), t(yv, torch.long))}


def _regression(X, y, n_val, seed=0):
    (Xt, yt), (Xv, yv) = split(X, y, n_val, seed)
    Xt, Xv = standardise(Xt, Xv)
    mu, sd = yt.mean(), yt.std()
    return {"train": (t(Xt), t((yt - mu) / sd)[:, None]), "val": (t(Xv), t((yv - mu) / sd)[:, None])}


# ---- tabular ----------------------------------------------------------------------------------

def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    return _classification(*load_breast_cancer(return_X_y=True), 170)


def diabetes():
    from sklearn.datasets import load_diabetes
    return _regression(*load_diabetes(return_X_y=True), 130)


def wine():
    from sklearn.datasets import load_wine
    return _classification(*load_wine(return_X_y=True), 60)


def friedman():
    from sklearn.datasets import make_friedman1
    X, y = make_friedman1(n_samples=1600, n_features=10, noise=0.5, random_state=11)
    return _regression(X, y, 400)


def sum_regression():
    g = np.random.default_rng(3)
    d = 20
    X = g.normal(size=(1400, d))
    y = X.sum(1) / math.sqrt(d) + 0.5 * np.sin(2 * X[:, 0]) + 0.3 * g.normal(size=len(X))
    (Xt, yt), (Xv, yv) = split(X, y, 400)
    return {"train": (t(Xt), t(yt)[:, None]), "val": (t(Xv), t(yv)[:, None])}


def _cluster_points(seed, n=2000, d=24, c=8, spread=0.9):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(c, d)) * spread
    y = g.integers(0, c, size=n)
    return centers[y] + g.normal(size=(n, d)), y


def clusters():
    return _classification(*_cluster_points(4), 500, standard=False)


def clusters_pre():
    """Eight clusters (the pretraining task of ft_mlp_newhead)."""
    X, y = _cluster_points(21, n=3000)
    return {"train": (t(X), t(y, torch.long))}


def clusters_super():
    """The same eight clusters as ``clusters_pre``, new points, labelled by which of 4 pairs of
    clusters they come from: a new 4-way head on a body that already separates the clusters."""
    X, y = _cluster_points(21, n=3400)
    X, y = X[3000:], (y[3000:] * 5 + 3) % 8 // 2
    return _classification(X, y, 200, standard=False)


def moons():
    from sklearn.datasets import make_moons
    X, y = make_moons(n_samples=1200, noise=0.25, random_state=10)
    g = np.random.default_rng(10)
    X = np.concatenate([X, 0.5 * g.normal(size=(len(X), 6))], 1)   # 6 nuisance features
    return _classification(X, y, 400, standard=False)


def _wave(X, shift=0.0):
    return np.sin(X[:, 0] * 1.5 + shift) + 0.5 * X[:, 1] * X[:, 2] + 0.3 * np.cos(2 * X[:, 3])


def wave_pre():
    g = np.random.default_rng(31)
    X = g.normal(size=(4000, 6))
    return {"train": (t(X), t(_wave(X) + 0.1 * g.normal(size=len(X)))[:, None])}


def wave_shifted():
    """The pretraining function, slightly changed (a phase shift), new points: a model that is
    already nearly right, whose curve is flat and then rises."""
    g = np.random.default_rng(32)
    X = g.normal(size=(900, 6))
    y = _wave(X, shift=0.3) + 0.1 * g.normal(size=len(X))
    (Xt, yt), (Xv, yv) = split(X, y, 300)
    return {"train": (t(Xt), t(yt)[:, None]), "val": (t(Xv), t(yv)[:, None])}


# ---- images -----------------------------------------------------------------------------------

def _digits(classes=None):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if classes is not None:
        m = np.isin(y, classes)
        X, y = X[m], y[m]
    return X.reshape(-1, 1, 8, 8), y


def digits():
    X, y = _digits()
    return _classification(X, y, 500, standard=False)


def digits_flat():
    X, y = _digits()
    return _classification(X.reshape(len(X), -1), y, 500)


def digits_ft():
    X, y = _digits(classes=[5, 6, 7, 8, 9])
    (Xt, yt), (Xv, yv) = split(X, y, 400, seed=5)
    Xt, yt = Xt[:120], yt[:120]            # a small fine-tuning set
    return {"train": (t(Xt), t(yt - 5, torch.long)), "val": (t(Xv), t(yv - 5, torch.long))}


def digits_pre():
    X, y = _digits(classes=[0, 1, 2, 3, 4])
    return {"train": (t(X), t(y, torch.long))}


def digits04_noisy():
    """Digits 0-4 with strong pixel noise: the task the model was pretrained on, shifted."""
    X, y = _digits(classes=[0, 1, 2, 3, 4])
    g = np.random.default_rng(9)
    X = np.clip(X + 0.45 * g.normal(size=X.shape), 0.0, 1.5)
    (Xt, yt), (Xv, yv) = split(X, y, 400, seed=9)
    return {"train": (t(Xt[:200]), t(yt[:200], torch.long)), "val": (t(Xv), t(yv, torch.long))}


SHAPES_A = ("disc", "square", "cross", "bar")
SHAPES_B = ("ring", "diagonal", "corner", "dots")


def _shape(kind: str, g: np.random.Generator, side: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    cx, cy = g.uniform(5, side - 5, size=2)
    r = g.uniform(2.5, 4.5)
    dx, dy = xx - cx, yy - cy
    img = {
        "disc": (dx ** 2 + dy ** 2 <= r ** 2),
        "square": (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8),
        "cross": ((np.abs(dx) <= 1) & (np.abs(dy) <= r)) | ((np.abs(dy) <= 1) & (np.abs(dx) <= r)),
        "bar": (np.abs(dy) <= 1) & (np.abs(dx) <= r + 1),
        "ring": np.abs(np.sqrt(dx ** 2 + dy ** 2) - r) <= 0.8,
        "diagonal": (np.abs(dx - dy) <= 1) & (np.abs(dx) <= r),
        "corner": ((np.abs(dx) <= 1) & (dy >= 0) & (dy <= r)) | ((np.abs(dy) <= 1) & (dx >= 0) & (dx <= r)),
        "dots": ((dx - r / 2) ** 2 + dy ** 2 <= 2.5) | ((dx + r / 2) ** 2 + dy ** 2 <= 2.5),
    }[kind].astype(np.float64)
    return img + 0.35 * g.normal(size=img.shape)


def _shapes(kinds, n, seed):
    g = np.random.default_rng(seed)
    y = g.integers(0, len(kinds), size=n)
    X = np.stack([_shape(kinds[k], g) for k in y])[:, None]
    return X, y


def shapes():
    return _classification(*_shapes(SHAPES_A, 1600, 41), 400, standard=False)


def shapes_pre():
    X, y = _shapes(SHAPES_A, 3000, 42)
    return {"train": (t(X), t(y, torch.long))}


def shapes_ft():
    X, y = _shapes(SHAPES_B, 700, 43)
    return _classification(X, y, 300, standard=False)


# ---- sequences --------------------------------------------------------------------------------

def gru_cls():
    g = np.random.default_rng(7)
    n, steps, d = 1600, 12, 4
    X = g.normal(size=(n, steps, d))
    # label: which of 4 channels has the largest sum over the second half of the sequence
    y = X[:, steps // 2:, :].sum(1).argmax(1)
    return _classification(X, y, 400, standard=False)


def lstm_reg():
    g = np.random.default_rng(8)
    n, steps, d = 1400, 12, 3
    X = g.normal(size=(n, steps, d))
    w = 0.75 ** np.arange(steps)[::-1]
    y = (X[:, :, 0] * w).sum(1) - 0.5 * (X[:, :, 1] * w[::-1]).sum(1) + 0.2 * g.normal(size=n)
    y = y / y.std()
    (Xt, yt), (Xv, yv) = split(X, y, 400)
    return {"train": (t(Xt), t(yt)[:, None]), "val": (t(Xv), t(yv)[:, None])}


# ---- text -------------------------------------------------------------------------------------

def pydoc_bytes() -> bytes:
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace")


def stdlib_bytes(name: str) -> bytes:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_bytes()


PYDOC_PRE_END = 360_000
"""Pretraining reads pydoc text before this byte; the in-domain fine-tuning set lies after it."""


def _rows(b: bytes, n: int, offset: int = 0, length: int = SEQ) -> torch.Tensor:
    a = np.frombuffer(b, dtype=np.uint8)[offset: offset + n * length]
    if len(a) < n * length:
        raise ValueError(f"text too short: {len(a)} bytes for {n} rows of {length}")
    return torch.as_tensor(a.astype(np.int64)).view(n, length)


def _lm(ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _next_token(rows: torch.Tensor) -> tuple:
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def pydoc_lm():
    b = pydoc_bytes()
    return {"train": _lm(_rows(b, 1500)), "val": _lm(_rows(b, 48, offset=len(b) - 48 * SEQ - 1))}


def pydoc_pre(length: int = SEQ):
    n = PYDOC_PRE_END // length
    return _rows(pydoc_bytes(), n, length=length)


def pydoc_tail_next(length=SEQ + 1):
    """pydoc text after the pretraining part, as (inputs, next-byte targets)."""
    b = pydoc_bytes()
    return {"train": _next_token(_rows(b, 120, offset=PYDOC_PRE_END + 10_000, length=length)),
            "val": _next_token(_rows(b, 48, offset=PYDOC_PRE_END + 40_000, length=length))}


def pydoc_next(n_train=1500, length=SEQ + 1):
    """(inputs, next-byte targets) rows of pydoc text, for models that take ``(idx, targets)``."""
    b = pydoc_bytes()
    train = _next_token(_rows(b, n_train, length=length))
    val = _next_token(_rows(b, 48, offset=len(b) - 48 * length - 1, length=length))
    return {"train": train, "val": val}


def source_ft():
    # the html5 entity table of the stdlib's html/entities.py: a different, very regular text
    b = stdlib_bytes("html/entities.py")
    return {"train": _lm(_rows(b, 96, offset=14_000)), "val": _lm(_rows(b, 48, offset=34_000))}   # 6 KB / 3 KB


def pydoc_tail_ft():
    """pydoc text after the pretraining part: the same domain, new sentences."""
    b = pydoc_bytes()
    return {"train": _lm(_rows(b, 96, offset=PYDOC_PRE_END + 10_000)),
            "val": _lm(_rows(b, 48, offset=PYDOC_PRE_END + 40_000))}


def code_ft_next():
    """Python source (the stdlib's argparse.py) as (inputs, next-byte targets)."""
    b = stdlib_bytes("argparse.py")
    length = SEQ + 1
    return {"train": _next_token(_rows(b, 120, offset=2_000, length=length)),
            "val": _next_token(_rows(b, 48, offset=40_000, length=length))}


def license_ft_next(length=33):
    """A licence text from the stdlib (the Python licence, in LICENSE.txt) as character rows."""
    b = stdlib_bytes("LICENSE.txt")
    return {"train": _next_token(_rows(b, 200, offset=0, length=length)),
            "val": _next_token(_rows(b, 60, offset=200 * length + 500, length=length))}


def pydoc_tail_char(length=33):
    """pydoc text after the pretraining part, as character rows (inputs, next byte)."""
    b = pydoc_bytes()
    return {"train": _next_token(_rows(b, 200, offset=PYDOC_PRE_END + 10_000, length=length)),
            "val": _next_token(_rows(b, 64, offset=PYDOC_PRE_END + 40_000, length=length))}


def pydoc_char(length=33):
    b = pydoc_bytes()
    return {"train": _next_token(_rows(b, 2000, length=length)),
            "val": _next_token(_rows(b, 64, offset=len(b) - 64 * length - 1, length=length))}


def pydoc_char_pre(length=33):
    return _rows(pydoc_bytes(), PYDOC_PRE_END // length, length=length)


MASK_ID, CLS_ID = 1, 2
"""BERT-style special ids; bytes are offset by 4 (ids 4..259)."""


def _mlm(rows: torch.Tensor, seed: int) -> dict:
    """15 % of the positions masked (fixed per row, so every epoch sees the same task): the
    input there becomes MASK_ID, the label the byte; other labels are -100."""
    ids = rows + 4
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}


def pydoc_mlm():
    b = pydoc_bytes()
    return {"train": _mlm(_rows(b, 1500), 51), "val": _mlm(_rows(b, 48, offset=len(b) - 48 * SEQ - 1), 52)}


def pydoc_mlm_pre():
    return _mlm(pydoc_pre(), 53)


def _cls_rows(rows: torch.Tensor) -> torch.Tensor:
    ids = rows + 4
    ids[:, 0] = CLS_ID
    return ids


def bag_of_tokens():
    """Rows of random bytes; class 1 rows draw a fifth of their bytes from a small set of
    letters: a bag-of-words task a small encoder learns."""
    g = np.random.default_rng(61)
    n = 1400
    y = g.integers(0, 2, size=n)
    rows = g.integers(32, 127, size=(n, SEQ))
    marked = g.random(size=(n, SEQ)) < 0.2
    letters = np.frombuffer(b"qxzj", dtype=np.uint8)
    rows = np.where(marked & (y[:, None] == 1), letters[g.integers(0, 4, size=(n, SEQ))], rows)
    ids = _cls_rows(torch.as_tensor(rows, dtype=torch.int64))
    labels = torch.as_tensor(y, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return _split_dict(batch, 400, 62)


def prose_or_code():
    """Rows of pydoc prose (label 0) or stdlib Python source (label 1), for a classifier on an
    encoder pretrained on the prose."""
    prose = _rows(pydoc_bytes(), 300, offset=PYDOC_PRE_END + 5_000)
    code = _rows(stdlib_bytes("inspect.py"), 300, offset=5_000)
    ids = _cls_rows(torch.cat([prose, code]))
    labels = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return _split_dict(batch, 200, 63, n_train=160)


def _split_dict(batch: dict, n_val: int, seed: int, n_train: int | None = None) -> dict:
    n = len(batch["labels"])
    idx = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    va, tr = idx[:n_val], idx[n_val:]
    if n_train is not None:
        tr = tr[:n_train]
    return {"train": {k: v[tr] for k, v in batch.items()}, "val": {k: v[va] for k, v in batch.items()}}
