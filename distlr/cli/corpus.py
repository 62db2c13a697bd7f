"""What the command line reads as training data: text, token files, Hugging Face datasets.

Every source ends as one stream of token ids, which ``PackedTokens`` cuts into ``seq_len``
blocks, plus a summary of what was read (files, tokens) for the terminal and ``result.json``:

- ``demo``: Python's own documentation text, byte-tokenized;
- text files (``.txt`` and anything unrecognised; comma-separated, a glob, a directory of
  ``.txt`` files), tokenized by the model directory's tokenizer if it has one, else as bytes;
- token files: ``.pt`` (a 1-D tensor each), ``.npy`` (a 1-D integer array each) and raw
  nanoGPT-style ``.bin`` files (``token_dtype``, uint16 by default); several are concatenated;
- Hugging Face ``datasets``: a ``save_to_disk`` directory, or ``.jsonl``/``.json``/
  ``.parquet``/``.csv``/``.arrow`` files; an ``input_ids`` column is used as it is, else the
  ``text_column`` is tokenized. Loaded in memory, with a temporary cache removed afterwards:
  nothing is written to the user's home.
"""

from __future__ import annotations

import glob
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distlr.core.options import TOKEN_DTYPES

TOKEN_FILES = {".pt": "torch", ".pth": "torch", ".npy": "numpy", ".bin": "raw"}
TABLE_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

Tokenize = Callable[[str], torch.Tensor]


@dataclass
class Corpus:
    """One stream of token ids and where it came from."""

    tokens: torch.Tensor
    """1-D int64 token ids."""
    source: str
    """What the stream was read as: "demo text", "text files", "token files", "datasets" ..."""
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "files": self.files, "tokens": int(self.tokens.numel())}


def demo_text() -> str:
    """About 465 k characters of English prose that ships with CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def read_corpus(spec: str, *, tokenize: Tokenize, text_column: str = "text", token_dtype: str = "uint16") -> Corpus:
    """The token stream ``--data spec`` names (see the module docstring).

    Raises:
        ValueError: nothing matches, files of different kinds are mixed, a file holds no
            token ids, or a dataset has neither ``input_ids`` nor ``text_column``; each names
            the file or column and what is allowed.
        ImportError: a Hugging Face dataset without the ``datasets`` package, with the install hint.
    """
    if spec == "demo":
        return Corpus(byte_tokens(demo_text()), "demo text (Python's documentation, bytes)")
    path = Path(spec)
    if path.is_dir() and _is_saved_dataset(path):
        return _from_dataset(_load_from_disk(path), tokenize, text_column, source="datasets directory",
                             files=[str(path)])
    files = _files(spec)
    kinds = {_kind(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data={spec!r} mixes kinds of files ({', '.join(sorted(kinds))}); pass one kind at a time")
    kind = kinds.pop()
    names = [str(f) for f in files]
    if kind in ("torch", "numpy", "raw"):
        parts = [_token_file(f, kind, token_dtype) for f in files]
        return Corpus(torch.cat(parts), f"token files ({kind})", names)
    if kind in TABLE_FILES.values():
        return _from_dataset(_load_table(kind, files), tokenize, text_column, source=f"{kind} files", files=names)
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return Corpus(tokenize(text), "text files", names)


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return TOKEN_FILES.get(suffix) or TABLE_FILES.get(suffix) or "text"


def _files(spec: str) -> list[Path]:
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
            raise ValueError(f"data={spec!r}: {part!r} is not a file, a directory (of .txt files, or a saved "
                             "Hugging Face dataset) or a glob that matches")
    if not files:
        raise ValueError(f"data={spec!r} matched no files")
    return files


def _token_file(path: Path, kind: str, token_dtype: str) -> torch.Tensor:
    if kind == "torch":
        ids = torch.load(path, weights_only=True)
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"data file {str(path)!r} holds a {type(ids).__name__}, not a tensor of token ids")
    elif kind == "numpy":
        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype={token_dtype!r} is not supported; allowed: {', '.join(TOKEN_DTYPES)}")
        ids = torch.from_numpy(np.fromfile(path, dtype=np.dtype(token_dtype)).astype(np.int64))
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"data file {str(path)!r} must hold a 1-D array of integer token ids; got "
                         f"{tuple(ids.shape)} of {ids.dtype}")
    return ids.long()


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("reading a Hugging Face dataset needs the datasets package: "
                          "pip install 'distlr[data]'") from err
    datasets.disable_progress_bars()
    return datasets


def _load_from_disk(path: Path) -> Any:
    loaded = _datasets().load_from_disk(str(path), keep_in_memory=True)
    if hasattr(loaded, "keys"):  # a DatasetDict: the training split
        splits = list(loaded.keys())
        if "train" in splits:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise ValueError(f"data={str(path)!r} holds the splits {splits} and none is 'train'; save the one to use")
    return loaded


def _load_table(kind: str, files: list[Path]) -> Any:
    datasets = _datasets()
    # The builder writes its cache to a temporary directory, not ~/.cache; the data stays in memory.
    with tempfile.TemporaryDirectory(prefix="distlr-datasets-") as cache:
        return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache,
                                     keep_in_memory=True)


def _from_dataset(dataset: Any, tokenize: Tokenize, text_column: str, *, source: str, files: list[str]) -> Corpus:
    columns = list(dataset.column_names)
    if "input_ids" in columns:
        rows = dataset["input_ids"]
        ids = torch.tensor([i for row in rows for i in row], dtype=torch.long)
        return Corpus(ids, f"{source}, input_ids column", files)
    if text_column not in columns:
        raise ValueError(f"the dataset has no column {text_column!r} (nor 'input_ids'); its columns are {columns}: "
                         "pass --text-column with the one that holds the text")
    texts = [t for t in dataset[text_column] if isinstance(t, str)]
    return Corpus(tokenize("\n\n".join(texts)), f"{source}, column {text_column!r}", files)


class PackedTokens(Dataset):
    """A 1-D token stream cut into ``seq_len`` blocks, served as language-model dict samples
    (``{"input_ids", "attention_mask"}``), or, with ``pairs=True``, as nanoGPT's ``(idx,
    targets)``: ``seq_len`` tokens and the same shifted by one, the next token of each."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, *, pairs: bool = False) -> None:
        # A pair needs one token past its block for the last target.
        n = (tokens.numel() - pairs) // seq_len
        if n <= 0:
            raise ValueError(f"the data is too short: {tokens.numel()} tokens for seq_len={seq_len}")
        self.tokens, self.seq_len, self.pairs = tokens.long(), seq_len, pairs
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        if self.pairs:
            return self.tokens[start:start + self.seq_len], self.tokens[start + 1:start + self.seq_len + 1]
        ids = self.tokens[start:start + self.seq_len]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class MaskedLMCollate:
    """Batches for a masked language model: BERT's masking of ``probability`` (15 %) of the
    tokens, of which 80 % become the mask token, 10 % a random token and 10 % stay; the labels
    hold the original ids there and -100 elsewhere. Special tokens are never masked.

    Draws from the torch RNG, which the range test's snapshot restores.
    """

    def __init__(self, *, mask_token_id: int, vocab_size: int, special_ids: list[int], probability: float = 0.15):
        self.mask_token_id, self.vocab_size, self.probability = mask_token_id, vocab_size, probability
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([s["input_ids"] for s in samples])
        labels = ids.clone()
        chosen = torch.bernoulli(torch.full(ids.shape, self.probability)).bool() & ~torch.isin(ids, self.special)
        labels[~chosen] = -100
        masked = ids.clone()
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & chosen
        masked[to_mask] = self.mask_token_id
        to_random = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & chosen & ~to_mask
        masked[to_random] = torch.randint(self.vocab_size, ids.shape)[to_random]
        return {"input_ids": masked, "attention_mask": torch.ones_like(ids), "labels": labels}
