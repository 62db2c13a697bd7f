"""Factories the command line loads by name (``--model cli_factories:...``) in the tests."""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from helpers import mlp, regression_data


class StallingRegression(nn.Module):
    """An MLP that returns its own MSE loss, and hangs on rank 1 at its third forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.calls = mlp(), 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(os.environ.get("RANK", 0)) == 1 and self.calls == 3:
            time.sleep(600)
        return nn.functional.mse_loss(self.inner(x).squeeze(-1), y)


def stalling_regression() -> nn.Module:
    return StallingRegression()


def regression_set() -> Dataset:
    return regression_data(n=1536)


class CrashingRegression(StallingRegression):
    """An MLP with a bug: its third forward on rank 1 divides by zero."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(os.environ.get("RANK", 0)) == 1 and self.calls == 3:
            raise ZeroDivisionError("a bug in the model")
        return nn.functional.mse_loss(self.inner(x).squeeze(-1), y)


def crashing_regression() -> nn.Module:
    return CrashingRegression()


class LogitsOnly(nn.Module):
    """A language model whose forward takes the ids alone and returns logits (no loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8192, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(idx)


def logits_only() -> nn.Module:
    return LogitsOnly()


class TinyLM(nn.Module):
    """A bigram language model of a given width, nanoGPT's convention: ``model(idx, targets)``
    returns the loss (for the command line's width series)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.head = nn.Linear(width, 256)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.embed(idx)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def tiny_lm(width: int = 16) -> nn.Module:
    return TinyLM(width)
