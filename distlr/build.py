"""Building what the CLI runs on: the model, the data loader and the optimizer, from a config.

The demo is a tiny GPT-2-style causal LM built from a transformers config (no download) on
Python's own documentation text (``pydoc_data.topics``, shipped with every CPython), byte-level
tokenized and packed into fixed-length sequences.
"""

from __future__ import annotations

import glob
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distlr.config import RunConfig

BYTE_VOCAB = 256
BUILTIN_MODELS = ("demo", "tiny-gpt", "gpt2-small")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


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
    """The model a config names: a built-in, a Hugging Face directory/config.json, or a factory.

    A Hugging Face directory with weights is loaded from them (local files only); a config
    alone gives a freshly initialised model.
    """
    if spec in BUILTIN_MODELS:
        from transformers import AutoModelForCausalLM

        config = (_gpt2_small_config if spec == "gpt2-small" else _tiny_gpt_config)(seq_len)
        return _quiet_lm(AutoModelForCausalLM.from_config(config))
    if ":" in spec and not Path(spec).exists():
        model = load_factory(spec, "model")()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model={spec!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), an existing Hugging Face "
            "directory or config.json, nor a 'package.module:function' factory"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    if path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ValueError(f"model={spec!r}: a config.json needs a 'model_type' key (e.g. \"gpt2\")")
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        return _quiet_lm(AutoModelForCausalLM.from_config(config))
    if any((path / name).exists() for name in WEIGHT_FILES):
        return _quiet_lm(AutoModelForCausalLM.from_pretrained(path, local_files_only=True))
    if not (path / "config.json").exists():
        raise ValueError(f"model={spec!r}: the directory has no config.json")
    return _quiet_lm(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True)))


def _quiet_lm(model: nn.Module) -> nn.Module:
    # Tells transformers which loss to use instead of guessing and warning about it.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


class PackedTokens(Dataset):
    """A 1-D token stream cut into ``seq_len`` blocks, served as causal-LM dict samples."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        n = tokens.numel() // seq_len
        if n == 0:
            raise ValueError(f"the text is too short: {tokens.numel()} tokens for seq_len={seq_len}")
        self.blocks = tokens[: n * seq_len].view(n, seq_len).long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def demo_text() -> str:
    """About 465 k characters of English prose that ships with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def _text_files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            files.extend(sorted(path.glob("*.txt")))
        elif any(ch in part for ch in "*?["):
            files.extend(Path(p) for p in sorted(glob.glob(part)))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data={spec!r}: {part!r} is not a file, a directory of .txt files or a glob that matches")
    if not files:
        raise ValueError(f"data={spec!r} matched no files")
    return files


def _tokens_for(cfg: RunConfig) -> torch.Tensor:
    if cfg.data == "demo":
        return byte_tokens(demo_text())
    files = _text_files(cfg.data)
    if len(files) == 1 and files[0].suffix in (".pt", ".pth"):
        tokens = torch.load(files[0], weights_only=True)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise ValueError(f"data={cfg.data!r}: a .pt file must hold a 1-D tensor of token ids")
        return tokens
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    tokenizer_dir = Path(cfg.model)
    if tokenizer_dir.is_dir() and (tokenizer_dir / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return byte_tokens(text)


def build_dataloader(cfg: RunConfig, model: nn.Module) -> Any:
    """The loader a config names. Text is tokenized (the model directory's tokenizer if it has
    one, else bytes) and packed into ``seq_len`` blocks; a factory may return a Dataset or a loader.
    """
    if ":" in cfg.data and not Path(cfg.data).exists():
        made = load_factory(cfg.data, "data")()
        if isinstance(made, DataLoader) or (not isinstance(made, Dataset) and hasattr(made, "__iter__")):
            return made
        if not isinstance(made, Dataset):
            raise ValueError(f"data={cfg.data!r}: the factory returned {type(made).__name__}, not a Dataset or loader")
        dataset: Dataset = made
    else:
        tokens = _tokens_for(cfg)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and int(tokens.max()) >= vocab:
            raise ValueError(
                f"data={cfg.data!r} has token id {int(tokens.max())} but the model's vocab_size is {vocab}; "
                "give the model directory a tokenizer or use a larger vocabulary"
            )
        dataset = PackedTokens(tokens, cfg.seq_len)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.num_workers, generator=generator)


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a config names, over the trainable parameters (its LR is set by the sweep)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.sweep.min_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.sweep.min_lr, weight_decay=cfg.weight_decay)


def build_trainable(cfg: RunConfig, model: nn.Module) -> tuple[torch.optim.Optimizer | None, dict | None]:
    """The optimizer and the DeepSpeed config the range test runs with: ``(optimizer, None)``,
    or with ``--deepspeed`` ``(optimizer or None, the config)``.

    A DeepSpeed config with its own ``optimizer`` block keeps it (no torch optimizer is made);
    otherwise ``--optimizer`` is used. ``--weight-decay`` fills the block's "auto" weight decay,
    as ``TrainingArguments.weight_decay`` does in the Hugging Face integration; ``LRFinder``
    resolves the other "auto" values from the sweep.
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
