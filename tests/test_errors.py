"""Bad input: a clear error before the first training step, and nothing changed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import RegressionNet, assert_same_bits, fingerprint, regression_data
from distlr import LRFinder

# (find() keyword arguments, exception type, text the message must contain)
BAD_FIND_ARGS = [
    (dict(min_lr=0.0), ValueError, ["min_lr=0.0", "> 0"]),
    (dict(min_lr=-1e-3), ValueError, ["min_lr=-0.001", "> 0"]),
    (dict(min_lr=math.nan), ValueError, ["min_lr=nan", "finite"]),
    (dict(max_lr=math.inf), ValueError, ["max_lr=inf", "finite"]),
    (dict(min_lr="1e-3"), TypeError, ["min_lr='1e-3'", "number"]),
    (dict(min_lr=1e-2, max_lr=1e-3), ValueError, ["max_lr=0.001", "min_lr=0.01", "increase max_lr"]),
    (dict(min_lr=1e-3, max_lr=1e-3), ValueError, ["max_lr=0.001", "greater than min_lr"]),
    (dict(num_steps=1), ValueError, ["num_steps=1", ">= 2"]),
    (dict(num_steps=10.5), TypeError, ["num_steps=10.5", "int"]),
    (dict(num_steps=True), TypeError, ["num_steps=True", "int"]),
    (dict(smooth_factor=1.0), ValueError, ["smooth_factor=1.0", "[0, 1)"]),
    (dict(smooth_factor=-0.1), ValueError, ["smooth_factor=-0.1", "[0, 1)"]),
    (dict(divergence_threshold=1.0), ValueError, ["divergence_threshold=1.0", "> 1"]),
    (dict(divergence_threshold=0.5), ValueError, ["divergence_threshold=0.5", "> 1"]),
    (dict(suggestion_method="steepest"), ValueError, ["suggestion_method='steepest'", "steepest_gradient", "valley"]),
    (dict(step_mode="log"), ValueError, ["step_mode='log'", "'exp'", "'linear'"]),
    (dict(accumulation_steps=0), ValueError, ["accumulation_steps=0", ">= 1"]),
    (dict(max_grad_norm=0.0), ValueError, ["max_grad_norm=0.0", "> 0"]),
    (dict(amp="fp8"), ValueError, ["amp='fp8'", "'bf16'"]),
    (dict(amp="fp16"), ValueError, ["amp='fp16'", "CUDA"]),
    (dict(total_steps=0), ValueError, ["total_steps=0", ">= 1"]),
]


@pytest.fixture
def untouched():
    torch.manual_seed(0)
    model = RegressionNet()
    optimizer = torch.optim.AdamW(model.parameters())
    loader = DataLoader(regression_data(n=64), batch_size=16)
    before = fingerprint(model, optimizer)
    yield model, optimizer, loader
    assert_same_bits(before, fingerprint(model, optimizer))
    assert optimizer.state_dict()["state"] == {}  # not one optimizer step was taken


@pytest.mark.parametrize("kwargs, error, words", BAD_FIND_ARGS, ids=[str(r[0]) for r in BAD_FIND_ARGS])
def test_bad_find_argument_is_rejected_by_name_before_any_step(untouched, kwargs, error, words):
    model, optimizer, loader = untouched
    finder = LRFinder(model, loader, optimizer, nn.MSELoss(), device="cpu")
    with pytest.raises(error) as info:
        finder.find(**kwargs)
    for word in words:
        assert word in str(info.value)


BAD_CONSTRUCTOR_ARGS = [
    (lambda m, o, l: dict(model="not a model", train_dataloader=l), TypeError, ["model", "torch.nn.Module", "str"]),
    (lambda m, o, l: dict(model=m, train_dataloader=42), TypeError, ["train_dataloader", "int"]),
    (lambda m, o, l: dict(model=m, train_dataloader=DataLoader(regression_data(n=8), batch_size=16, drop_last=True)),
     ValueError, ["train_dataloader is empty"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, optimizer="adam"), TypeError, ["optimizer", "str"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, criterion="mse"), TypeError, ["criterion", "callable"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, device="tpu"), ValueError, ["device='tpu'", "auto", "cpu"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, device="cuda"), ValueError, ["device='cuda'", "CUDA is not available"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, snapshot="tape"), ValueError, ["snapshot='tape'", "'memory'", "'disk'"]),
    (lambda m, o, l: dict(model=m, train_dataloader=l, dist_backend="mpi"), ValueError, ["dist_backend='mpi'", "'gloo'"]),
    (lambda m, o, l: dict(model=m.requires_grad_(False), train_dataloader=l), ValueError, ["no trainable parameters"]),
]


@pytest.mark.parametrize("make, error, words", BAD_CONSTRUCTOR_ARGS, ids=[r[2][0] for r in BAD_CONSTRUCTOR_ARGS])
def test_bad_constructor_argument_is_rejected_by_name(untouched, make, error, words):
    if "cuda" in words[0] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(error) as info:
        LRFinder(**make(*untouched))
    for word in words:
        assert word in str(info.value)


def test_output_without_a_loss_is_rejected_before_the_first_optimizer_step(untouched):
    model, optimizer, loader = untouched
    finder = LRFinder(model, loader, optimizer, device="cpu")  # no criterion, model returns predictions
    with pytest.raises(TypeError, match="batch has 2 elements") as info:
        finder.find(num_steps=5)
    assert "criterion" in str(info.value)


def test_non_scalar_loss_is_rejected(untouched):
    model, optimizer, loader = untouched
    finder = LRFinder(model, loader, optimizer, nn.MSELoss(reduction="none"), device="cpu")
    with pytest.raises(TypeError, match="scalar"):
        finder.find(num_steps=5)


def test_model_output_without_loss_names_what_to_pass(untouched):
    model, optimizer, _ = untouched
    loader = DataLoader(regression_data(n=64).tensors[0], batch_size=16)  # bare tensors: model(x)
    with pytest.raises(TypeError, match="cannot find a loss") as info:
        LRFinder(model, loader, optimizer, device="cpu").find(num_steps=5)
    assert "criterion=" in str(info.value) and "(16,)" in str(info.value)


def test_iterable_without_batches_is_rejected(untouched):
    model, optimizer, _ = untouched
    with pytest.raises(ValueError, match="yielded no batches"):
        LRFinder(model, iter([]), optimizer, nn.MSELoss(), device="cpu").find(num_steps=5)
