"""Shared fixtures: small real models and loaders, and a bitwise state fingerprint."""

from __future__ import annotations

import os
import random

# Set before anything imports transformers/deepspeed: no hub calls, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class RegressionNet(nn.Module):
    """A small MLP with a BatchNorm (buffers) and dropout (RNG), for restore tests."""

    def __init__(self, n_in: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def regression_data(n: int = 256, n_in: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    w = torch.randn(n_in, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, generator=g))


@pytest.fixture
def regression():
    torch.manual_seed(0)
    model = RegressionNet()
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    return model, loader


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Every bit a restore must bring back: parameters, buffers, grads, optimizer state and
    settings, and the next draw of every RNG (taken without consuming it)."""
    fp = {f"param/{k}": v.detach().clone() for k, v in model.named_parameters()}
    fp.update({f"buffer/{k}": v.detach().clone() for k, v in model.named_buffers()})
    fp.update({f"grad/{k}": None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()})
    fp["training"] = [m.training for m in model.modules()]
    if optimizer is not None:
        sd = optimizer.state_dict()
        for pid, state in sd["state"].items():
            for key, value in state.items():
                fp[f"opt/{pid}/{key}"] = value.clone() if isinstance(value, torch.Tensor) else value
        fp["opt/groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    fp["rng/torch"] = torch.get_rng_state().clone()
    fp["rng/numpy"] = np.random.get_state()[1].copy()
    fp["rng/python"] = random.getstate()
    return fp


def assert_same_bits(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), set(before) ^ set(after)
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(_bits(a), _bits(b)), key
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b), key
        else:
            assert a == b, key


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare bit patterns, not values: NaN == NaN and -0.0 != 0.0 here, as "bit for bit" means.
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def warm_up(model: nn.Module, optimizer: torch.optim.Optimizer, loader, steps: int = 3) -> None:
    """A few real training steps so the optimizer has state (moments, step counts) to restore."""
    model.train()
    for _, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
