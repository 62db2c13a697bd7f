"""The benchmark's tasks: data, model, optimizer, loss, budget, and the family each belongs to.

34 tasks in 8 families (the unit of leave-one-family-out cross-validation): 20 trained from
scratch (linear models, MLPs, CNNs, recurrent nets, transformers) and 14 fine-tuned from a
model pretrained here, once, deterministically (cached under cache/pretrained/). Every task is
small enough that one training run takes about a second or less on one CPU thread. Data is
generated, comes from scikit-learn's bundled datasets, or from Python's own text (``taskdata``).

Bump a task's ``version`` whenever anything that changes its numbers changes: the cache key
includes it. ``pretrain`` keys are shared: tasks fine-tuned from the same model name the same one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import models as M
import taskdata as D

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"

SCRATCH_FAMILIES = ("linear", "mlp", "cnn", "rnn", "transformer")
FINETUNE_FAMILIES = ("ft_lm", "ft_vision", "ft_other")


@dataclass(frozen=True)
class Pretraining:
    """How a fine-tuning task's starting model is made: ``steps`` of AdamW at ``lr`` (one-cycle)
    on ``data()`` batches of ``batch_size``, from ``model()`` seeded with ``seed``."""

    key: str
    model: Callable[[], nn.Module]
    data: Callable[[], Any]
    steps: int
    lr: float
    batch_size: int = 32
    loss: str = "criterion"           # as Task.loss
    criterion: Callable[[], nn.Module] | None = nn.CrossEntropyLoss
    seed: int = 1234
    version: int = 2

    def path(self) -> Path:
        return CACHE / "pretrained" / f"{self.key}@pre{self.version}.pt"


@dataclass
class Task:
    name: str
    version: int
    family: str
    description: str
    batch_size: int
    budget: int                    # optimizer steps of one training run
    grid_lo_k: int                 # first grid point, as k in 10**(k/10)
    data_fn: Callable[[], dict]    # -> {"train": split, "val": split}
    model_fn: Callable[[], nn.Module]
    opt_fn: Callable[[nn.Module, float], torch.optim.Optimizer]
    opt_family: str                # "sgd" or "adam" (for the no-finder baseline)
    loss: str = "criterion"        # "criterion": criterion(model(x), y); "model": model(**batch).loss;
                                   # "targets": model(x, y) -> (logits, loss)
    criterion_fn: Callable[[], nn.Module] | None = None
    pretrain: Pretraining | None = None
    new_head: bool = False         # fine-tuning with a new (seeded) head: model.head is re-initialised
    frozen_body: bool = False      # only the head trains
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def kind(self) -> str:
        return "finetune" if self.family.startswith("ft_") else "scratch"

    def data(self) -> dict:
        return _data_cache(self.name, self.version, self.data_fn)

    def criterion(self) -> nn.Module | None:
        return None if self.criterion_fn is None else self.criterion_fn()

    def ensure_pretrained(self) -> None:
        if self.pretrain is None or self.pretrain.path().exists():
            return
        path = self.pretrain.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = run_pretraining(self.pretrain)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self.model_fn()
        if self.pretrain is not None:
            saved = _load_pretrained(str(self.pretrain.path()))
            head_keys = {f"{_head_name(model)}.{k}" for k in _head(model).state_dict()} if self.new_head else set()
            # A new head may differ in shape; anything else must load as pretrained, or fail.
            state = {k: v for k, v in saved.items() if k not in head_keys}
            missing, _ = model.load_state_dict(state, strict=False)
            unexplained = [k for k in missing if k not in head_keys and ".pooler." not in k]
            if unexplained:
                raise RuntimeError(f"{self.name}: the pretrained {self.pretrain.key} lacks {unexplained[:4]}")
            head = _head(model) if self.new_head or self.frozen_body else None
            if self.new_head:
                torch.manual_seed(seed)
                for m in head.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            if self.frozen_body:
                head_params = {id(p) for p in head.parameters()}
                for p in model.parameters():
                    p.requires_grad_(id(p) in head_params)
        return model

    def optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return self.opt_fn(model, lr)


def _head_name(model: nn.Module) -> str:
    for name in ("head", "classifier"):
        if hasattr(model, name):
            return name
    raise AttributeError(f"{type(model).__name__} has no head or classifier")


def _head(model: nn.Module) -> nn.Module:
    return getattr(model, _head_name(model))


_DATA: dict = {}


def _data_cache(name, version, fn):
    k = (name, version)
    if k not in _DATA:
        _DATA[k] = fn()
    return _DATA[k]


@functools.lru_cache(maxsize=None)
def _load_pretrained(path: str) -> dict:
    return torch.load(path, weights_only=True)


# ---- losses, batches --------------------------------------------------------------------------

def loss_of(kind: str, model: nn.Module, batch: Any, criterion: nn.Module | None) -> torch.Tensor:
    if kind == "model":
        return model(**batch).loss
    if kind == "targets":
        return model(*batch)[1]
    x, y = batch
    return criterion(model(x), y)


def n_samples(split: Any) -> int:
    return len(next(iter(split.values()))) if isinstance(split, dict) else len(split[0])


def take(split: Any, idx: torch.Tensor) -> Any:
    if isinstance(split, dict):
        return {k: v[idx] for k, v in split.items()}
    return tuple(v[idx] for v in split)


class SplitDataset(torch.utils.data.Dataset):
    """A split as a Dataset: rows of a tuple of tensors, or of a dict of tensors (which the
    default collate turns back into dict batches)."""

    def __init__(self, split: Any):
        self.split = split

    def __len__(self):
        return n_samples(self.split)

    def __getitem__(self, i):
        if isinstance(self.split, dict):
            return {k: v[i] for k, v in self.split.items()}
        return tuple(v[i] for v in self.split)


# ---- optimizers -------------------------------------------------------------------------------

def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def sgd(model, lr):
    return torch.optim.SGD(trainable(model), lr=lr)


def sgd_m(model, lr):
    return torch.optim.SGD(trainable(model), lr=lr, momentum=0.9)


def sgd_nesterov(model, lr):
    return torch.optim.SGD(trainable(model), lr=lr, momentum=0.9, nesterov=True)


def adam(model, lr):
    return torch.optim.Adam(trainable(model), lr=lr)


def adamw(model, lr):
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.01)


def nanogpt_adamw(model, lr):
    return M.nanogpt_optimizer(model, lr)


# ---- pre-training (run once per key, cached) --------------------------------------------------

def run_pretraining(pre: Pretraining) -> dict:
    torch.manual_seed(pre.seed)
    model = pre.model()
    data = pre.data()
    criterion = pre.criterion() if pre.criterion is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=pre.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pre.lr, total_steps=pre.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(pre.seed)
    n = n_samples(data)
    model.train()
    for step in range(pre.steps):
        batch = take(data, torch.randint(n, (pre.batch_size,), generator=g))
        loss = loss_of(pre.loss, model, batch, criterion)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step < pre.steps - 1:
            sched.step()
    return model.state_dict()


def _lm_pre():
    return D._lm(D.pydoc_pre())


PRE_GPT = Pretraining("gpt_pydoc", M.tiny_gpt2, _lm_pre, steps=1500, lr=3e-3, batch_size=16, loss="model",
                      criterion=None)
PRE_NANOGPT = Pretraining("nanogpt_pydoc", M.NanoGPT, lambda: D._next_token(D.pydoc_pre(M.SEQ + 1)), steps=1500,
                          lr=3e-3, batch_size=16, loss="targets", criterion=None)
PRE_CHARLSTM = Pretraining("charlstm_pydoc", M.CharLSTM, lambda: D._next_token(D.pydoc_char_pre()), steps=1500,
                           lr=1e-2, batch_size=32, criterion=M.FlatTargets)
PRE_BERT = Pretraining("bert_mlm_pydoc", M.tiny_bert_mlm, D.pydoc_mlm_pre, steps=1500, lr=2e-3, batch_size=16,
                       loss="model", criterion=None)
PRE_CNN = Pretraining("cnn_digits04", lambda: M.SmallCNN(n_out=5), lambda: D.digits_pre()["train"], steps=600,
                      lr=2e-3)
PRE_VIT = Pretraining("vit_digits04", lambda: M.TinyViT(n_out=5), lambda: D.digits_pre()["train"], steps=800,
                      lr=2e-3)
PRE_RESCNN = Pretraining("rescnn_shapesA", M.ResCNN, lambda: D.shapes_pre()["train"], steps=500, lr=3e-3)
PRE_CLUSTERS = Pretraining("mlp_clusters8", lambda: M.HeadMLP(24, 64, 8), lambda: D.clusters_pre()["train"],
                           steps=800, lr=3e-3)
PRE_WAVE = Pretraining("mlp_wave", lambda: M.HeadMLP(6, 64, 1), lambda: D.wave_pre()["train"], steps=2000, lr=3e-3,
                       batch_size=64, criterion=nn.MSELoss)


# ---- the task list ----------------------------------------------------------------------------

CE, MSE = nn.CrossEntropyLoss, nn.MSELoss


def T(name, family, description, *, bs, budget, lo, data, model, opt, loss="criterion", crit=None, version=1,
      **kw) -> Task:
    family_opt = "sgd" if opt in (sgd, sgd_m, sgd_nesterov) else "adam"
    return Task(name, version, family, description, batch_size=bs, budget=budget, grid_lo_k=lo, data_fn=data,
                model_fn=model, opt_fn=opt, opt_family=family_opt, loss=loss, criterion_fn=crit, **kw)


TASKS: list[Task] = [
    # -- from scratch ------------------------------------------------------------------------
    T("logreg_bc", "linear", "logistic regression, breast_cancer, SGD, CE", bs=32, budget=150, lo=-40,
      data=D.breast_cancer, model=lambda: nn.Linear(30, 2), opt=sgd, crit=CE),
    T("linreg_diabetes", "linear", "linear regression, diabetes, SGD, MSE", bs=16, budget=60, lo=-40,
      data=D.diabetes, model=lambda: nn.Linear(10, 1), opt=sgd, crit=MSE),
    T("softmax_digits", "linear", "softmax regression, digits (64 pixels), Adam, CE, bs64", bs=64, budget=100,
      lo=-50, data=D.digits_flat, model=lambda: nn.Linear(64, 10), opt=adam, crit=CE),
    T("mlp_sum", "mlp", "MLP regression y~sum(x), SGD momentum 0.9, MSE", bs=32, budget=200, lo=-45,
      data=D.sum_regression, model=lambda: M.mlp(20, 64, 1), opt=sgd_m, crit=MSE),
    T("bn_dropout_mlp", "mlp", "BatchNorm+Dropout MLP, 8 clusters, Adam, CE, bs16", bs=16, budget=200, lo=-55,
      data=D.clusters, model=lambda: M.bn_mlp(24, 64, 8), opt=adam, crit=CE),
    T("mlp_moons_bs8", "mlp", "MLP classifier, noisy moons + nuisance dims, SGD momentum 0.9, bs8", bs=8,
      budget=200, lo=-50, data=D.moons, model=lambda: M.mlp(8, 32, 2), opt=sgd_m, crit=CE),
    T("mlp_wide_bs256", "mlp", "wide MLP (2x256), 8 clusters, AdamW, CE, bs256", bs=256, budget=60, lo=-55,
      data=D.clusters, model=lambda: M.mlp(24, 256, 8), opt=adamw, crit=CE),
    T("mlp_friedman", "mlp", "3-layer MLP regression, Friedman #1, Adam, MSE, bs64", bs=64, budget=150, lo=-55,
      data=D.friedman, model=lambda: M.mlp(10, 64, 1, depth=3), opt=adam, crit=MSE),
    T("cnn_digits_nesterov", "cnn", "CNN, digits, SGD Nesterov 0.9, CE", bs=32, budget=150, lo=-45,
      data=D.digits, model=lambda: M.SmallCNN(), opt=sgd_nesterov, crit=CE),
    T("cnn_digits_adamw", "cnn", "CNN, digits, AdamW wd 0.01, CE", bs=32, budget=150, lo=-55,
      data=D.digits, model=lambda: M.SmallCNN(), opt=adamw, crit=CE),
    T("cnn_bn_sgd", "cnn", "CNN with BatchNorm, digits, plain SGD, CE, bs64", bs=64, budget=100, lo=-40,
      data=D.digits, model=lambda: M.SmallCNN(batch_norm=True), opt=sgd, crit=CE),
    T("rescnn_shapes", "cnn", "residual CNN with BatchNorm, 16x16 shapes, Adam, CE, bs128", bs=128, budget=60,
      lo=-55, data=D.shapes, model=M.ResCNN, opt=adam, crit=CE),
    T("gru_cls", "rnn", "GRU sequence classification, Adam, CE", bs=32, budget=200, lo=-50,
      data=D.gru_cls, model=lambda: M.SeqNet("gru", 4, 24, 4), opt=adam, crit=CE),
    T("lstm_reg", "rnn", "LSTM sequence regression, SGD momentum 0.9, MSE", bs=32, budget=200, lo=-45,
      data=D.lstm_reg, model=lambda: M.SeqNet("lstm", 3, 24, 1), opt=sgd_m, crit=MSE),
    T("charlstm_pydoc", "rnn", "byte-level LSTM language model, pydoc text, Adam, bs32", bs=32, budget=120,
      lo=-50, data=D.pydoc_char, model=M.CharLSTM, opt=adam, crit=M.FlatTargets),
    T("gpt_pydoc", "transformer", "Hugging Face GPT-2 (2x32) causal LM, pydoc bytes, AdamW, dict batches",
      bs=8, budget=150, lo=-55, data=D.pydoc_lm, model=M.tiny_gpt2, opt=adamw, loss="model"),
    T("nanogpt_pydoc", "transformer", "nanoGPT-style decoder, model(idx, targets) -> (logits, loss), AdamW "
      "(nanoGPT's groups), bs16", bs=16, budget=120, lo=-55, data=D.pydoc_next, model=M.NanoGPT,
      opt=nanogpt_adamw, loss="targets"),
    T("bert_mlm_pydoc", "transformer", "Hugging Face BERT (2x32) masked LM, pydoc bytes, AdamW, dict batches",
      bs=16, budget=120, lo=-55, data=D.pydoc_mlm, model=M.tiny_bert_mlm, opt=adamw, loss="model"),
    T("vit_digits", "transformer", "vision transformer on 2x2 patches, digits, Adam, CE", bs=32, budget=150,
      lo=-55, data=D.digits, model=lambda: M.TinyViT(), opt=adam, crit=CE),
    T("bert_cls_tokens", "transformer", "Hugging Face BERT sequence classifier, bag-of-tokens task, AdamW, "
      "dict batches with labels", bs=32, budget=100, lo=-55, data=D.bag_of_tokens, model=M.tiny_bert_cls,
      opt=adamw, loss="model"),
    # -- fine-tuning ---------------------------------------------------------------------------
    T("ft_gpt_source", "ft_lm", "GPT-2 pretrained on pydoc, tuned on 6 KB of html/entities.py, AdamW", bs=8,
      budget=100, lo=-55, data=D.source_ft, model=M.tiny_gpt2, opt=adamw, loss="model", pretrain=PRE_GPT),
    T("ft_gpt_pydoc_tail", "ft_lm", "GPT-2 pretrained on pydoc, tuned on unseen pydoc text (same domain), AdamW",
      bs=8, budget=100, lo=-60, data=D.pydoc_tail_ft, model=M.tiny_gpt2, opt=adamw, loss="model",
      pretrain=PRE_GPT),
    T("ft_nanogpt_code", "ft_lm", "nanoGPT pretrained on pydoc, tuned on argparse.py source, AdamW", bs=16,
      budget=80, lo=-55, data=D.code_ft_next, model=M.NanoGPT, opt=nanogpt_adamw, loss="targets",
      pretrain=PRE_NANOGPT),
    T("ft_charlstm_license", "ft_lm", "byte LSTM pretrained on pydoc, tuned on the Python licence text, Adam",
      bs=16, budget=80, lo=-55, data=D.license_ft_next, model=M.CharLSTM, opt=adam, crit=M.FlatTargets,
      pretrain=PRE_CHARLSTM),
    T("ft_nanogpt_pydoc_tail", "ft_lm", "nanoGPT pretrained on pydoc, tuned on unseen pydoc text (same domain), "
      "AdamW", bs=16, budget=80, lo=-60, data=D.pydoc_tail_next, model=M.NanoGPT, opt=nanogpt_adamw,
      loss="targets", pretrain=PRE_NANOGPT),
    T("ft_charlstm_pydoc_tail", "ft_lm", "byte LSTM pretrained on pydoc, tuned on unseen pydoc text (same domain), "
      "Adam", bs=16, budget=80, lo=-60, data=D.pydoc_tail_char, model=M.CharLSTM, opt=adam, crit=M.FlatTargets,
      pretrain=PRE_CHARLSTM),
    T("ft_cnn_digits", "ft_vision", "CNN pretrained on digits 0-4, new head, 120 digits 5-9, Adam", bs=16,
      budget=100, lo=-60, data=D.digits_ft, model=lambda: M.SmallCNN(n_out=5), opt=adam, crit=CE,
      pretrain=PRE_CNN, new_head=True),
    T("ft_cnn_frozen", "ft_vision", "CNN pretrained on digits 0-4, frozen backbone, new head, SGD momentum",
      bs=16, budget=100, lo=-50, data=D.digits_ft, model=lambda: M.SmallCNN(n_out=5), opt=sgd_m, crit=CE,
      pretrain=PRE_CNN, new_head=True, frozen_body=True),
    T("ft_rescnn_shapes", "ft_vision", "residual CNN pretrained on 4 shapes, new head for 4 others, SGD momentum",
      bs=32, budget=60, lo=-50, data=D.shapes_ft, model=M.ResCNN, opt=sgd_m, crit=CE, pretrain=PRE_RESCNN,
      new_head=True),
    T("ft_vit_digits", "ft_vision", "ViT pretrained on digits 0-4, new head, 120 digits 5-9, AdamW", bs=16,
      budget=100, lo=-60, data=D.digits_ft, model=lambda: M.TinyViT(n_out=5), opt=adamw, crit=CE,
      pretrain=PRE_VIT, new_head=True),
    T("ft_cnn_noisy_digits", "ft_vision", "CNN pretrained on digits 0-4, tuned with its own head on 200 noisy "
      "copies of them, Adam", bs=16, budget=80, lo=-60, data=D.digits04_noisy, model=lambda: M.SmallCNN(n_out=5),
      opt=adam, crit=CE, pretrain=PRE_CNN),
    T("ft_mlp_newhead", "ft_other", "MLP pretrained on 8 clusters, new 4-way head on pairs of them, Adam",
      bs=16, budget=80, lo=-60, data=D.clusters_super, model=lambda: M.HeadMLP(24, 64, 4), opt=adam, crit=CE,
      pretrain=PRE_CLUSTERS, new_head=True),
    T("ft_mlp_wave_shift", "ft_other", "MLP regression pretrained on a function, tuned to it phase-shifted, "
      "SGD momentum", bs=32, budget=80, lo=-55, data=D.wave_shifted, model=lambda: M.HeadMLP(6, 64, 1),
      opt=sgd_m, crit=MSE, pretrain=PRE_WAVE),
    T("ft_bert_prose_code", "ft_other", "BERT pretrained (masked LM) on pydoc, new classifier: prose or code, "
      "AdamW, dict batches", bs=16, budget=60, lo=-60, data=D.prose_or_code, model=M.tiny_bert_cls,
      opt=adamw, loss="model", pretrain=PRE_BERT, new_head=True),
]

BY_NAME = {t.name: t for t in TASKS}
FAMILIES = tuple(dict.fromkeys(t.family for t in TASKS))


def get_tasks(names=None) -> list[Task]:
    if names is None:
        return list(TASKS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known: {list(BY_NAME)}")
    return [BY_NAME[n] for n in names]
