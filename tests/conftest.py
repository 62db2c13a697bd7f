"""Shared fixtures (helpers.py holds what worker processes need too)."""

from __future__ import annotations

import os

# Set before anything imports transformers/deepspeed: no hub calls, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture
def regression():
    # Imported here: the pure tests (suggestion rules, ladder, schedule) never load torch.
    import torch
    from torch.utils.data import DataLoader

    from helpers import RegressionNet, regression_data

    torch.manual_seed(0)
    model = RegressionNet()
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    return model, loader


