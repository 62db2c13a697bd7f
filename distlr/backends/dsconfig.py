"""DeepSpeed configs: reading the user's, preparing the range test's copy, writing the tuned one.

Pure dict work (no engine, no I/O but reading the file): unknown keys get a warning naming
the closest valid key, the ``"auto"`` values that the Hugging Face integration writes are
resolved from the run's settings (or fail naming the key), the config's own ``scheduler`` is
set aside for the range test, and the tuned copy carries the suggested LR and a schedule.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distlr.core.options import closest

logger = logging.getLogger(__name__)

# Top-level keys DeepSpeed 0.16-0.19 reads (collected from its config parser and constants).
TOP_LEVEL_KEYS = frozenset("""
activation_checkpointing aio amp autotuning bf16 checkpoint comet comms_logger communication_data_type
compile compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last
disable_allgather disable_python_gc dump_state eigenvalue elasticity expert_parallel flops_profiler fp16
fp32_reduce_scatter gradient_accumulation_steps gradient_allreduce_op gradient_clipping gradient_predivide_factor
graph_harvesting hybrid_engine legacy_fusion load_universal log_level lower_precision_safe_modules
managed_gradient_accumulation memory_breakdown mics_hierarchical_params_gather mics_shard_size monitor_config
nebula optimizer pipeline prescale_gradients progressive_layer_drop quantize_training scheduler
seq_parallel_communication_data_type sequence_parallel_size sparse_attention sparse_gradients steps_per_print
tensor_parallel tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu
use_data_before_expert_parallelism use_node_local_storage vocabulary_size wall_clock_breakdown wandb
weight_quantization zenflow zero_allow_comm_data_type_fp32 zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer zero_optimization
""".split())


def load_ds_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the user's config (the file or dict itself is never changed).

    Raises:
        ValueError: no such file, not JSON, or not a JSON object.
    """
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"deepspeed_config={str(path)!r}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed_config={str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"deepspeed_config={str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def unknown_keys(config: Mapping[str, Any], zero_keys: frozenset[str] | None = None) -> list[str]:
    """Messages for keys DeepSpeed would silently ignore, each with the closest valid key."""
    messages = []
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            close = closest(key, TOP_LEVEL_KEYS)
            messages.append(f"unknown DeepSpeed config key {key!r}" + (f" (did you mean {close!r}?)" if close else ""))
    zero = config.get("zero_optimization")
    if zero_keys and isinstance(zero, Mapping):
        for key in zero:
            if key not in zero_keys:
                close = closest(key, zero_keys)
                messages.append(f"unknown DeepSpeed config key 'zero_optimization.{key}'"
                                + (f" (did you mean {close!r}?)" if close else ""))
    return messages


def resolve_auto(config: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Replace every ``"auto"`` by the run's value for its dotted key (``optimizer.params.lr``).

    Raises:
        ValueError: an ``"auto"`` that the run has no value for, naming its key.
    """
    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if node == "auto":
            if path not in values or values[path] is None:
                known = ", ".join(sorted(k for k, v in values.items() if v is not None))
                raise ValueError(
                    f"DeepSpeed config key {path!r} is \"auto\" and distlr has no value for it; set it in the "
                    f"config (distlr resolves \"auto\" for: {known})"
                )
            return values[path]
        return node

    return walk(config, "")


def auto_values(
    *,
    micro_batch_size: int | None,
    accumulation_steps: int,
    world_size: int,
    max_grad_norm: float | None,
    lr: float,
    weight_decay: float,
    hidden_size: int | None,
    amp: str,
) -> dict[str, Any]:
    """What the run says for each key the Hugging Face integration may leave as ``"auto"``.

    Defaults follow ``transformers.TrainingArguments`` (betas 0.9/0.999, eps 1e-8, clipping 1.0).
    """
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": None if micro_batch_size is None else micro_batch_size * accumulation_steps * world_size,
        "gradient_clipping": 1.0 if max_grad_norm is None else max_grad_norm,
        "optimizer.params.lr": lr,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": weight_decay,
        "fp16.enabled": amp == "fp16",
        "bf16.enabled": amp == "bf16",
    }
    if hidden_size is not None:
        values.update({
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        })
    return values


def sweep_config(config: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The copy of the user's config the range test's engine is built from.

    The ``scheduler`` block is set aside (the range test sets the LR itself; a scheduler stepping
    inside ``engine.step()`` would overwrite it) and ``"auto"`` values are resolved. The
    scheduler's own "auto" values are not needed and are not resolved.
    """
    config = copy.deepcopy(config)
    config.pop("scheduler", None)
    return resolve_auto(config, values)


def total_steps_from(config: Mapping[str, Any]) -> int | None:
    """The training length the user's scheduler block names, if it names one."""
    params = (config.get("scheduler") or {}).get("params") or {}
    total = params.get("total_num_steps")
    return total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else None


def tuned_config(config: Mapping[str, Any], constant_lr: float, schedule: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The user's config with the suggested LR in ``optimizer.params.lr`` and a scheduler.

    With a known training length the scheduler is ``schedule``'s WarmupCosineLR, and the
    optimizer's lr is the schedule's peak (``result.peak_lr``: WarmupCosineLR scales it). Without
    one it is a WarmupLR (warm up, then hold) to ``constant_lr`` (``result.optimal_lr``), with the
    user's warmup steps or DeepSpeed's default of 1000. Everything else, "auto" values included,
    is kept as written.
    """
    tuned = copy.deepcopy(dict(config))
    notes = []
    block = copy.deepcopy(dict(schedule["deepspeed"]["scheduler"]))
    lr = float(schedule["peak_lr"])
    if block["params"].get("total_num_steps") is None:
        lr = constant_lr
        old = ((config.get("scheduler") or {}).get("params") or {}).get("warmup_num_steps")
        warmup = old if isinstance(old, int) and not isinstance(old, bool) and old > 0 else 1000
        block = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                "warmup_num_steps": warmup, "warmup_type": "linear"}}
        notes.append("no training length known (total_steps, or the config's scheduler total_num_steps): the tuned "
                     "scheduler is WarmupLR (warmup, then the constant suggestion); pass total_steps for "
                     "WarmupCosineLR to the one-cycle peak")
    optimizer = tuned.get("optimizer")
    if isinstance(optimizer, dict):
        optimizer.setdefault("params", {})["lr"] = lr
    else:
        notes.append(f"the config has no optimizer block: set your optimizer's lr to {lr:.3e}")
    tuned["scheduler"] = block
    return tuned, notes
