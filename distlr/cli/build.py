"""Building what the CLI runs on: the model, the data loader and the optimizer, from a config.

The demo is a tiny GPT-2-style causal LM built from a transformers config (no download) on
Python's own documentation text (``pydoc_data.topics``, shipped with every CPython), byte-level
tokenized and packed into fixed-length sequences.

A Hugging Face model is loaded through the head it was built with: a causal LM as one, a
masked LM (BERT-style) as one, trained with the standard 15 % masking. Any other head
(seq2seq, classification, ...) needs labelled batches that text alone cannot give, and is
refused before anything runs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distlr.cli.config import BUILTIN_MODELS, RunConfig
from distlr.cli.corpus import MaskedLMCollate, PackedTokens, byte_tokens, read_corpus
from distlr.dist import collectives as D
from distlr.output.files import CONFIG_FILE, Claim, new_output_dir

BYTE_VOCAB = 256
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
ModelKind = Literal["causal", "masked", "custom"]


@dataclass
class BuiltModel:
    """The model a config names, how the CLI trains it, and its tokenizer if it has one."""

    model: nn.Module
    kind: ModelKind
    """"causal" (a Hugging Face causal LM: ``model(input_ids=..., labels=...)``), "masked" (15 % of
    the tokens masked) or "custom" (a factory's own module: on token data it is called as
    ``model(idx, targets)``, nanoGPT's convention, and returns its loss; on a data factory's
    batches, as those batches say)."""
    tokenizer: Any | None = None
    notes: list[str] = field(default_factory=list)


def load_factory(spec: str, what: str) -> Any:
    """Import ``package.module:function`` and return the function.

    Raises:
        ValueError: the module or the function cannot be found (naming which).
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}={spec!r}: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{what}={spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def _tiny_gpt_config(seq_len: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=BYTE_VOCAB, n_positions=max(seq_len, 128), n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=0, eos_token_id=0)


def _gpt2_small_config(seq_len: int) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_positions=max(seq_len, 1024))  # GPT-2 small: 12 layers, 768 wide, 124 M parameters


def build_model(spec: str, *, seq_len: int) -> nn.Module:
    """The model a config names (see ``build``)."""
    return build(spec, seq_len=seq_len).model


def build(spec: str, *, seq_len: int, width: int | None = None) -> BuiltModel:
    """The model a config names: a built-in, a Hugging Face directory/config.json, or a factory
    (called with ``width=`` when one is given, as a width series does).

    A Hugging Face directory with weights is loaded from them (local files only); a config
    alone gives a freshly initialised model. Either way through the head it was built with.

    Raises:
        ValueError: no such model, or a kind the CLI cannot train on text (naming its class and
            what to pass instead).
    """
    if spec in BUILTIN_MODELS:
        from transformers import AutoModelForCausalLM

        config = (_gpt2_small_config if spec == "gpt2-small" else _tiny_gpt_config)(seq_len)
        return BuiltModel(_quiet_lm(AutoModelForCausalLM.from_config(config)), "causal")
    if ":" in spec and not Path(spec).exists():
        model = load_factory(spec, "model")(**({} if width is None else {"width": width}))
        if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
            model = model[0]  # (model, optimizer): a width series' runs take the optimizer; this model is restored
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return BuiltModel(model, _kind_of_module(model))
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model={spec!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), an existing Hugging Face "
            "directory or config.json, nor a 'package.module:function' factory"
        )
    from transformers import AutoConfig

    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"model={spec!r}: a config.json needs a 'model_type' key (e.g. \"gpt2\")")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    elif not (path / "config.json").exists():
        raise ValueError(f"model={spec!r}: the directory has no config.json")
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    kind, auto = _head(spec, config)
    with_weights = path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES)
    model = auto.from_pretrained(path, local_files_only=True) if with_weights else auto.from_config(config)
    built = BuiltModel(_quiet_lm(model) if kind == "causal" else model, kind)
    if path.is_dir() and (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        built.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if kind == "masked":
        if built.tokenizer is None or built.tokenizer.mask_token_id is None:
            raise ValueError(f"model={spec!r} is a masked LM ({type(model).__name__}): its training masks 15 % of "
                             "the tokens with the tokenizer's mask token, and the directory has no such tokenizer")
        built.notes.append(f"masked LM ({type(model).__name__}): trained with 15 % of the tokens masked "
                           "(80 % mask token, 10 % random, 10 % kept), as BERT was")
    return built


def _head(spec: str, config: Any) -> tuple[ModelKind, Any]:
    """The kind and the Auto class of a Hugging Face config: the head it was built with."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = list(getattr(config, "architectures", None) or [])
    name = architectures[0] if architectures else f"a fresh {config.model_type} model"
    if getattr(config, "is_encoder_decoder", False):
        kind = None
    elif architectures:
        arch = architectures[0]
        causal = arch.endswith("ForCausalLM") or (arch.endswith("LMHeadModel") and getattr(config, "is_decoder", True))
        kind = "causal" if causal else "masked" if arch.endswith("ForMaskedLM") else None
    elif config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        kind = "masked"  # an encoder (BERT-style): its language-model head is the masked one
    elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "causal"
    else:
        kind = None
    if kind is None:
        what = "an encoder-decoder (seq2seq) model" if getattr(config, "is_encoder_decoder", False) else "not a language model"
        raise ValueError(f"model={spec!r} is {name}, {what}: text alone cannot train it. Pass a "
                         "'package.module:function' data factory that yields labelled batches, and the model as one too")
    return kind, AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM


def _kind_of_module(model: nn.Module) -> ModelKind:
    from distlr.train.batch import is_causal_lm

    if is_causal_lm(model):
        return "causal"
    return "masked" if type(model).__name__.endswith("ForMaskedLM") else "custom"


def _quiet_lm(model: nn.Module) -> nn.Module:
    # Tells transformers which loss to use instead of guessing and warning about it.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def _tokenizer_fn(built: BuiltModel):
    if built.tokenizer is None:
        return byte_tokens
    tokenizer = built.tokenizer

    def tokenize(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)

    return tokenize


def build_dataloader(cfg: RunConfig, built: BuiltModel | nn.Module) -> tuple[Any, dict[str, Any]]:
    """The loader a config names, and what was read (for the summary and ``result.json``).

    Text is tokenized (the model directory's tokenizer if it has one, else bytes), token files
    and datasets are read as ids, and the stream is packed into ``seq_len`` blocks; a factory
    may return a Dataset or a loader.

    Raises:
        ValueError: ids outside the model's vocabulary, a ``seq_len`` longer than the model's
            positions, data too short for one block; each says what to change.
    """
    if not isinstance(built, BuiltModel):
        built = BuiltModel(built, _kind_of_module(built))
    if ":" in cfg.data and not Path(cfg.data).exists():
        made = load_factory(cfg.data, "data")()
        if isinstance(made, DataLoader) or (not isinstance(made, Dataset) and hasattr(made, "__iter__")):
            return made, {"source": f"factory {cfg.data}"}
        if not isinstance(made, Dataset):
            raise ValueError(f"data={cfg.data!r}: the factory returned {type(made).__name__}, not a Dataset or loader")
        described: dict[str, Any] = {"source": f"factory {cfg.data}", "samples": len(made)}  # type: ignore[arg-type]
        return _loader(cfg, made, collate=None), described
    if built.kind == "custom":
        _check_takes_targets(cfg, built.model)
    _check_positions(cfg, built.model)
    _check_tokenizer(cfg, built)
    corpus = read_corpus(cfg.data, tokenize=_tokenizer_fn(built), text_column=cfg.text_column,
                         token_dtype=cfg.token_dtype, text_encoding=cfg.text_encoding)
    _check_ids(cfg, corpus.tokens, built.model)
    dataset = PackedTokens(corpus.tokens, cfg.seq_len, pairs=built.kind == "custom")
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"data={cfg.data!r} gives {len(dataset)} sequence(s) of {cfg.seq_len} tokens, fewer than "
                         f"batch_size={cfg.batch_size} (a last, partial batch is dropped); use a smaller --batch-size "
                         "or --seq-len, or more data")
    collate = None
    if built.kind == "masked":
        tokenizer = built.tokenizer
        collate = MaskedLMCollate(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                  special_ids=list(tokenizer.all_special_ids))
    described = {**corpus.describe(), "seq_len": cfg.seq_len, "sequences": len(dataset)}
    return _loader(cfg, dataset, collate), described


def _loader(cfg: RunConfig, dataset: Dataset, collate: Any) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.num_workers, generator=generator, collate_fn=collate)


def _check_takes_targets(cfg: RunConfig, model: nn.Module) -> None:
    """A factory's module trained on token data is called as ``model(idx, targets)``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in positional):
        raise ValueError(f"model={cfg.model!r}: {type(model).__name__}.forward takes {len(positional)} positional "
                         f"argument(s), but on token data (--data {cfg.data}) the command line calls "
                         "model(idx, targets) and reads the loss it returns (nanoGPT's convention); give forward a "
                         "targets argument, or pass --data as a 'package.module:function' factory of batches your "
                         "model takes")


def _check_positions(cfg: RunConfig, model: nn.Module) -> None:
    config = getattr(model, "config", None)
    # Hugging Face's names, and nanoGPT's GPTConfig.block_size.
    for key in ("n_positions", "max_position_embeddings", "block_size"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and cfg.seq_len > limit:
            raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's {key}={limit}; "
                             f"use --seq-len {limit} or less")


def _check_tokenizer(cfg: RunConfig, built: BuiltModel) -> None:
    """A tokenizer with more tokens than the model's embedding gives ids the model cannot look up
    (masking also draws random replacements from the whole tokenizer): found mid-sweep before."""
    vocab = getattr(getattr(built.model, "config", None), "vocab_size", None)
    if built.tokenizer is None or not isinstance(vocab, int):
        return
    size = len(built.tokenizer)
    if size > vocab:
        raise ValueError(f"model={cfg.model!r}: its tokenizer has {size:,} tokens but the model's vocab_size is "
                         f"{vocab:,}, so ids {vocab:,} and up have no embedding; use the tokenizer the model was "
                         "trained with, or resize the embeddings (model.resize_token_embeddings(len(tokenizer))) "
                         "and save the model again")


ATTENTION_COPIES = 4
"""Copies of the attention scores (batch x heads x seq_len^2 floats) a training step holds at
once: the scores, the probabilities and their gradients. Measured on the demo GPT on the CPU:
peak memory 1.13 GB at --seq-len 512 and 2.68 GB at 1024, 3.9 copies' worth of the growth."""


def check_activation_memory(cfg: RunConfig, model: nn.Module, device: torch.device) -> None:
    """Refuse a ``seq_len`` x ``batch_size`` whose attention scores alone need more memory than
    the device has free: the kernel kills a process that runs out of CPU memory with no
    message (the demo model at --seq-len 4096 did). Models without a transformer config
    (heads, layers) are not estimated."""
    config = getattr(model, "config", None)
    heads = next((getattr(config, k) for k in ("n_head", "num_attention_heads") if hasattr(config, k)), None)
    layers = next((getattr(config, k) for k in ("n_layer", "num_hidden_layers") if hasattr(config, k)), None)
    if not isinstance(heads, int) or not isinstance(layers, int):
        return
    need = cfg.batch_size * heads * cfg.seq_len ** 2 * layers * 4 * ATTENTION_COPIES
    free, where = _free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"seq_len={cfg.seq_len} with batch_size={cfg.batch_size}: the model's attention alone needs "
                         f"about {need / 2**30:.1f} GiB a step ({cfg.batch_size} x {heads} heads x "
                         f"{cfg.seq_len}^2 x {layers} layers x {ATTENTION_COPIES} copies x 4 bytes), more than the "
                         f"{free / 2**30:.1f} GiB {where}; use a smaller --seq-len or --batch-size")


def _free_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes this rank may use on ``device`` (None: unknown), and where that was read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, ""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # the ranks on this machine share its memory
    share = "" if ranks == 1 else f" (1/{ranks} per rank of this machine)"
    return available // ranks, f"this machine has available{share}"


def _check_ids(cfg: RunConfig, tokens: torch.Tensor, model: nn.Module) -> None:
    if tokens.numel() == 0:
        raise ValueError(f"data={cfg.data!r} holds no tokens")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise ValueError(f"data={cfg.data!r} has a negative token id ({low}); token ids are >= 0 "
                         "(a .bin file of another dtype? see --token-dtype)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and high >= vocab:
        raise ValueError(
            f"data={cfg.data!r} has token id {high} but the model's vocab_size is {vocab}; "
            "give the model directory a tokenizer, use a larger vocabulary, or check --token-dtype"
        )


def width_factory(cfg: RunConfig) -> Any:
    """What a width series calls for each run: ``--model``'s factory at ``width=``, and the
    ``--optimizer`` over it unless the factory returned ``(model, optimizer)`` (muP's own)."""
    make = load_factory(cfg.model, "model")

    def fresh(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        made = make(width=width)
        model, optimizer = made if isinstance(made, tuple) else (made, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={cfg.model!r}: the factory returned {type(made).__name__} for width={width}, "
                             "not a torch.nn.Module or a (module, optimizer) pair")
        return model, optimizer if optimizer is not None else build_optimizer(cfg, model)

    return fresh


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a config names, over the trainable parameters (its LR is set by the range test)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.range_test.min_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.range_test.min_lr, weight_decay=cfg.weight_decay)


def build_trainable(cfg: RunConfig, model: nn.Module) -> tuple[torch.optim.Optimizer | None, dict | None]:
    """The optimizer and the DeepSpeed config the range test runs with: ``(optimizer, None)``,
    or with ``--deepspeed`` ``(optimizer or None, the config)``.

    A DeepSpeed config with its own ``optimizer`` block keeps it (no torch optimizer is made);
    otherwise ``--optimizer`` is used. ``--weight-decay`` fills the block's "auto" weight decay,
    as ``TrainingArguments.weight_decay`` does in the Hugging Face integration; ``LRFinder``
    resolves the other "auto" values from the range test's arguments.
    """
    if cfg.deepspeed is None:
        return build_optimizer(cfg, model), None
    from distlr.backends import read_deepspeed_config

    config = read_deepspeed_config(cfg.deepspeed)
    block = config.get("optimizer")
    if not isinstance(block, dict):
        return build_optimizer(cfg, model), config
    params = block.get("params")
    if isinstance(params, dict) and params.get("weight_decay") == "auto":
        params["weight_decay"] = cfg.weight_decay
    return None, config


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation, data order)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def output_dir(cfg: RunConfig, ctx: D.DistContext, given: Path | None) -> tuple[Path, Path | None, Claim | None]:
    """Rank 0 makes and claims the output directory (never over an earlier result or a live
    run's directory, never over the config file it was given) and tells the others; also the
    directory if rank 0 created it, and rank 0's claim on it (release it when the run ends).
    Collective: every rank must call this."""
    path, created, claim = None, False, None
    with D.agree_on_failure(ctx):
        if cfg.output_dir is not None and given is not None and \
                (Path(cfg.output_dir) / CONFIG_FILE).resolve() == given.resolve():
            raise ValueError(f"--config {str(given)!r} is the config.yaml of output_dir={cfg.output_dir!r}, which "
                             "this run would write; choose another --output-dir (distlr never writes over the "
                             "file it was given)")
        if ctx.is_main:
            path, created, claim = new_output_dir(cfg.output_dir, overwrite=cfg.overwrite)
    path = D.broadcast_object(ctx, path)
    return path, path if created and ctx.is_main else None, claim
