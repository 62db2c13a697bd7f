"""DeepSpeed config handling, in one process: keys, "auto" values, the tuned copy."""

from __future__ import annotations

import json

import pytest
import torch

from distlr.backends.dsconfig import (TOP_LEVEL_KEYS, auto_values, load_ds_config, resolve_auto, sweep_config,
                             total_steps_from, tuned_config, unknown_keys)
from distlr.core.schedule import recommend_schedule

VALUES = auto_values(micro_batch_size=8, accumulation_steps=2, world_size=4, max_grad_norm=None, lr=1e-3,
                     weight_decay=0.01, hidden_size=64, amp="bf16")


def test_auto_values_follow_the_run_and_the_hf_defaults():
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                    "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto"}}
    resolved = resolve_auto(config, VALUES)
    assert resolved["train_batch_size"] == 64 and resolved["train_micro_batch_size_per_gpu"] == 8
    assert resolved["gradient_accumulation_steps"] == 2 and resolved["gradient_clipping"] == 1.0
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    zero = resolved["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (4096, 3686, 640)
    assert config["train_batch_size"] == "auto"  # the input is not changed


def test_an_auto_without_a_value_fails_naming_its_key():
    values = auto_values(micro_batch_size=8, accumulation_steps=1, world_size=1, max_grad_norm=None, lr=1e-3,
                         weight_decay=0.0, hidden_size=None, amp="no")
    with pytest.raises(ValueError, match=r"'zero_optimization.reduce_bucket_size' is \"auto\""):
        resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, values)
    with pytest.raises(ValueError, match=r"'wall_clock_breakdown' is \"auto\""):
        resolve_auto({"wall_clock_breakdown": "auto"}, values)


def test_misspelled_keys_are_named_with_the_closest_valid_key():
    messages = unknown_keys({"gradient_cliping": 1.0, "zero_optimization": {"stage": 2, "overlap_com": True},
                             "bf16": {"enabled": True}},
                            zero_keys=frozenset({"stage", "overlap_comm", "reduce_bucket_size"}))
    assert messages == [
        "unknown DeepSpeed config key 'gradient_cliping' (did you mean 'gradient_clipping'?)",
        "unknown DeepSpeed config key 'zero_optimization.overlap_com' (did you mean 'overlap_comm'?)",
    ]
    assert {"zero_optimization", "optimizer", "scheduler", "bf16", "fp16"} <= TOP_LEVEL_KEYS


def test_every_key_of_the_shipped_deepspeed_configs_is_known():
    pytest.importorskip("deepspeed")
    from distlr.backends.zero import zero_config_keys
    from helpers import REPO

    paths = sorted((REPO / "configs").glob("*.json"))
    assert len(paths) == 4
    for path in paths:
        assert unknown_keys(load_ds_config(path), zero_config_keys()) == [], path.name


def test_the_sweep_copy_sets_the_scheduler_aside_and_leaves_the_users_dict_alone():
    config = {"optimizer": {"type": "SGD", "params": {"lr": "auto"}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}
    copy_ = sweep_config(config, VALUES)
    assert "scheduler" not in copy_ and copy_["optimizer"]["params"]["lr"] == 1e-3
    assert config["scheduler"]["type"] == "WarmupLR"


def test_tuned_config_with_a_known_length_is_warmup_cosine_at_the_peak():
    user = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10000, "warmup_num_steps": 100}},
            "train_batch_size": "auto"}
    assert total_steps_from(user) == 10000
    tuned, notes = tuned_config(user, 1e-4, recommend_schedule(3e-4, total_steps=10000))
    assert tuned["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95]}
    assert tuned["scheduler"]["type"] == "WarmupCosineLR"
    assert tuned["scheduler"]["params"]["total_num_steps"] == 10000
    assert tuned["train_batch_size"] == "auto" and notes == []
    assert user["optimizer"]["params"]["lr"] == 1e-4


def test_tuned_config_without_a_length_falls_back_to_warmup_then_the_constant_lr():
    user = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 300}}}
    tuned, notes = tuned_config(user, 2e-3, recommend_schedule(6e-3))
    assert tuned["optimizer"]["params"]["lr"] == 2e-3
    assert tuned["scheduler"] == {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                                 "warmup_num_steps": 300, "warmup_type": "linear"}}
    assert any("total_steps" in note for note in notes)
    assert json.loads(json.dumps(tuned)) == tuned


def test_tuned_config_without_an_optimizer_block_says_where_the_lr_goes():
    tuned, notes = tuned_config({"zero_optimization": {"stage": 1}}, 1e-3, recommend_schedule(1e-3, total_steps=100))
    assert "optimizer" not in tuned and any("1.000e-03" in note for note in notes)


def test_bad_config_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_ds_config(tmp_path / "list.json")


def test_config_optimizer_blocks_map_to_the_same_torch_optimizer():
    pytest.importorskip("deepspeed")
    from distlr.backends.zero import torch_optimizer_from_block

    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = torch_optimizer_from_block({"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.9]}}, params)
    assert type(adam) is torch.optim.AdamW and adam.defaults["betas"] == (0.8, 0.9)
    plain = torch_optimizer_from_block({"type": "Adam", "params": {"adam_w_mode": False}}, params)
    assert type(plain) is torch.optim.Adam
    sgd = torch_optimizer_from_block({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}, params)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="'Lamb'"):
        torch_optimizer_from_block({"type": "Lamb"}, params)
