"""Hugging Face causal LMs built from a config: dict batches, no labels, no criterion."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from helpers import assert_same_bits, fingerprint
from distlr import LRFinder


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model


def padded_batches(n: int = 64, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 97, (seq,), generator=g)
        mask = torch.ones(seq, dtype=torch.long)
        pad = i % 5  # right padding of 0..4 tokens
        if pad:
            ids[-pad:], mask[-pad:] = 0, 0
        rows.append({"input_ids": ids, "attention_mask": mask})
    return rows


def test_causal_lm_without_labels_learns_from_input_ids_with_padding_masked():
    model = tiny_gpt2()
    loader = DataLoader(padded_batches(), batch_size=8, shuffle=False)
    first = next(iter(loader))
    labels = first["input_ids"].clone()
    labels[first["attention_mask"] == 0] = -100
    with torch.no_grad():
        model.train()
        expected = model(**first, labels=labels).loss.item()
        unmasked = model(**first, labels=first["input_ids"]).loss.item()
    assert abs(expected - unmasked) > 1e-3  # the padding really changes the loss

    before = fingerprint(model)
    result = LRFinder(model, loader, device="cpu").find(min_lr=1e-5, max_lr=1.0, num_steps=20, smooth_factor=0.5)
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)
    assert result.micro_batch_size == 8 and result.steps_run >= 2
    assert_same_bits(before, fingerprint(model))


def test_batches_with_labels_use_the_models_own_loss():
    model = tiny_gpt2()
    rows = [{**row, "labels": row["input_ids"].clone()} for row in padded_batches(16)]
    loader = DataLoader(rows, batch_size=8)
    first = next(iter(loader))
    with torch.no_grad():
        expected = model(**first).loss.item()
    result = LRFinder(model, loader, device="cpu").find(min_lr=1e-6, max_lr=1e-4, num_steps=3)
    assert result.losses[0] == pytest.approx(expected, rel=1e-6)


def test_token_weighted_mean_over_micro_batches_of_different_lengths():
    # Two micro-batches with 15 and 9 scored tokens: the recorded loss is the mean over all 24
    # tokens, not the mean of the two batch means.
    model = tiny_gpt2()
    rows = padded_batches(2)
    a = {"input_ids": rows[0]["input_ids"][None], "attention_mask": rows[0]["attention_mask"][None]}
    b = {"input_ids": rows[1]["input_ids"][None].clone(), "attention_mask": rows[1]["attention_mask"][None].clone()}
    b["attention_mask"][0, 10:] = 0
    def labelled(batch):
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        return labels
    with torch.no_grad():
        la, lb = (model(**x, labels=labelled(x)).loss.item() for x in (a, b))
    na, nb = 15, 9  # scored tokens: the first label of a row is never predicted
    result = LRFinder(model, [a, b], device="cpu").find(min_lr=1e-6, max_lr=1e-5, num_steps=2, accumulation_steps=2)
    assert result.losses[0] == pytest.approx((la * na + lb * nb) / (na + nb), rel=1e-6)
