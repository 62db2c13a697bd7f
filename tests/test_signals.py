"""Interrupts in one process: SIGTERM is restored from like Ctrl-C, and a restore or a snapshot,
once begun, finishes before an interrupt is let through."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distlr import LRFinder
from distlr.dist.signals import Terminated
from distlr.train.snapshot import DiskStore, HostStore
from helpers import Faulty, RegressionNet, assert_same_bits, fingerprint, regression_data, warm_up


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = RegressionNet()
    optimizer = torch.optim.AdamW(model.parameters())
    loader = DataLoader(regression_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    warm_up(model, optimizer, loader)
    return model, optimizer, loader


def interrupt_first(monkeypatch, cls, method):
    """Make ``cls.method`` deliver a Ctrl-C to this process as it starts, then do its work."""
    original = getattr(cls, method)
    calls = []

    def patched(self, *args, **kwargs):
        calls.append(method)
        signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)
    return calls


@pytest.mark.parametrize("store, snapshot", [(HostStore, "memory"), (DiskStore, "disk")])
def test_a_second_ctrl_c_during_the_restore_waits_for_the_restore_to_finish(trained, tmp_path, monkeypatch, store,
                                                                            snapshot):
    model, optimizer, loader = trained
    calls = interrupt_first(monkeypatch, store, "load_into")
    before = fingerprint(model, optimizer)
    faulty = Faulty(model, rank=None, at=3, mode="interrupt")  # the first Ctrl-C, mid-sweep
    with LRFinder(faulty, loader, optimizer, nn.MSELoss(), device="cpu", snapshot=snapshot,
                  snapshot_dir=tmp_path) as finder:
        with pytest.raises(KeyboardInterrupt):
            finder.find(num_steps=10)
    assert calls == ["load_into"]  # the second Ctrl-C came during the restore ...
    assert_same_bits(before, fingerprint(model, optimizer))  # ... and the restore finished
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_a_disk_snapshot_is_written_is_a_keyboard_interrupt_and_leaves_nothing(trained, tmp_path,
                                                                                           monkeypatch):
    model, optimizer, loader = trained
    calls = interrupt_first(monkeypatch, DiskStore, "put")
    before = fingerprint(model, optimizer)
    with LRFinder(model, loader, optimizer, nn.MSELoss(), device="cpu", snapshot="disk",
                  snapshot_dir=tmp_path) as finder:
        # Not torch.distributed.checkpoint's CheckpointException wrapping it: the user's Ctrl-C.
        with pytest.raises(KeyboardInterrupt) as info:
            finder.find(num_steps=10)
    assert type(info.value) is KeyboardInterrupt and calls == ["put"]
    assert_same_bits(before, fingerprint(model, optimizer))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("snapshot", ["memory", "disk"])
def test_sigterm_restores_and_removes_the_snapshot(trained, tmp_path, snapshot):
    model, optimizer, loader = trained
    before = fingerprint(model, optimizer)

    class SigtermAtThirdStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # what torchrun, scancel and timeout send
            return self.inner(x)

    previous = signal.getsignal(signal.SIGTERM)
    with LRFinder(SigtermAtThirdStep(), loader, optimizer, nn.MSELoss(), device="cpu", snapshot=snapshot,
                  snapshot_dir=tmp_path) as finder:
        with pytest.raises(Terminated):
            finder.find(num_steps=10)
    assert signal.getsignal(signal.SIGTERM) is previous  # the process's own handler is back
    assert_same_bits(before, fingerprint(model, optimizer))
    assert list(tmp_path.iterdir()) == []
