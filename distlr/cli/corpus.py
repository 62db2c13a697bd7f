"""What the command line reads as training data: text, token files, Hugging Face datasets.

Every source ends as one stream of token ids, which ``PackedTokens`` cuts into ``seq_len``
blocks, plus a summary of what was read (files, tokens) for the terminal and ``result.json``:

- ``demo``: Python's own documentation text, byte-tokenized;
- text files (``.txt`` and anything unrecognised), tokenized by the model directory's tokenizer
  if it has one, else as bytes. Decoded strictly: as a byte-order mark says (UTF-8, UTF-16,
  UTF-32), else as ``text_encoding`` (UTF-8 unless told); ``"latin-1:replace"``-style values
  replace what does not decode instead of refusing the file;
- token files: ``.pt`` (a 1-D tensor each, loaded ``weights_only``), ``.npy`` (a 1-D integer
  array each) and raw nanoGPT-style ``.bin`` files (``token_dtype``, uint16 by default);
  several are concatenated;
- Hugging Face ``datasets``: a ``save_to_disk`` directory, or ``.jsonl``/``.json``/
  ``.parquet``/``.csv``/``.arrow`` files; an ``input_ids`` column is used as it is, else the
  ``text_column`` is tokenized, and every row must have one. Loaded in memory, with a temporary
  cache removed afterwards: nothing is written to the user's home.

``--data`` is a file, a comma-separated list, a glob or a directory (read for the files of the
kinds above it holds, all of one kind). A file that is not what its name says is refused with a
``ValueError`` naming it, what is wrong and what to pass: the command line's one-line error.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from distlr.core.options import TOKEN_DTYPES

TOKEN_FILES = {".pt": "torch", ".pth": "torch", ".npy": "numpy", ".bin": "raw"}
TABLE_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
DATA_SUFFIXES = {".txt": "text", **TOKEN_FILES, **TABLE_FILES}
"""What a directory is read for; its other files (and hidden ones) are left out."""
TEXT_ERRORS = ("strict", "replace", "ignore")
"""What may follow the ``:`` of a ``text_encoding``: refuse, U+FFFD, or drop what does not decode."""
# A byte-order mark names the encoding whatever text_encoding says. UTF-32 LE's begins with UTF-16 LE's: first.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
INT64_MAX = int(np.iinfo(np.int64).max)

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
    data = text.encode("utf-8")
    if not data:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def text_codec(text_encoding: str) -> tuple[str, str]:
    """``text_encoding`` as Python's ``(encoding, errors)``: ``"latin-1"`` is ``("latin-1",
    "strict")``; a suffix ``":replace"`` (``"utf-8:replace"``) reads what does not decode as
    U+FFFD, ``":ignore"`` drops it.

    Raises:
        ValueError: an encoding Python does not know, or something else after the ``:``.
    """
    encoding, colon, errors = text_encoding.partition(":")
    errors = errors if colon else "strict"
    if errors not in TEXT_ERRORS:
        raise ValueError(f"text_encoding={text_encoding!r}: after the ':' comes one of {', '.join(TEXT_ERRORS)} "
                         "(e.g. 'utf-8:replace')")
    try:
        b"a".decode(encoding, "ignore")  # an unknown name, or a bytes-to-bytes codec such as base64
    except LookupError:
        raise ValueError(f"text_encoding={text_encoding!r} is not a text encoding Python knows; e.g. 'utf-8', "
                         "'latin-1', 'cp1252', 'utf-16', optionally with ':replace'") from None
    return encoding, errors


def read_corpus(spec: str, *, tokenize: Tokenize, text_column: str = "text", token_dtype: str = "uint16",
                text_encoding: str = "utf-8") -> Corpus:
    """The token stream ``--data spec`` names (see the module docstring).

    Args:
        spec: ``"demo"``, a file, a comma-separated list, a glob, or a directory.
        tokenize: text to a 1-D tensor of token ids.
        text_column: the column of a dataset that holds the text (when it has no ``input_ids``).
        token_dtype: the dtype of raw ``.bin`` token files.
        text_encoding: the encoding of text, ``.jsonl``/``.json`` and ``.csv`` files without a
            byte-order mark, optionally with ``":replace"`` or ``":ignore"`` (see ``text_codec``).

    Raises:
        ValueError: nothing matches; files of different kinds are mixed; a file that is empty,
            a dangling link, not decodable as ``text_encoding``, not the format its suffix
            says, or holding no token ids, ids of another dtype, or pickled code; a dataset
            without ``input_ids`` nor ``text_column``, or with rows lacking it or not holding
            strings. Each names the file, the value or column, and what to pass.
        ImportError: a Hugging Face dataset without the ``datasets`` package, with the install hint.

    Example::

        corpus = read_corpus("notes/*.txt", tokenize=byte_tokens, text_encoding="latin-1")
    """
    encoding, errors = text_codec(text_encoding)
    if spec == "demo":
        return Corpus(byte_tokens(demo_text()), "demo text (Python's documentation, bytes)")
    path = Path(spec)
    if path.is_dir() and _is_saved_dataset(path):
        return _from_datasets([(str(path), _load_from_disk(path))], tokenize, text_column,
                              source="datasets directory")
    files = _files(spec)
    kind = _one_kind(spec, files)
    names = [str(f) for f in files]
    if kind in ("torch", "numpy", "raw"):
        parts = [_token_file(f, kind, token_dtype) for f in files]
        return Corpus(torch.cat(parts), f"token files ({kind})", names)
    if kind in TABLE_FILES.values():
        loaded = [(str(f), _load_table(kind, f, encoding, errors)) for f in files]
        return _from_datasets(loaded, tokenize, text_column, source=f"{kind} files")
    text = "\n\n".join(_read_text(f, encoding, errors)[0] for f in files)
    return Corpus(tokenize(text), "text files", names)


# -- which files ----------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    return DATA_SUFFIXES.get(path.suffix.lower(), "text")


def _files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            files.extend(_directory_files(spec, path))
        elif path.is_file() or path.is_symlink():
            files.append(path)
        elif any(ch in part for ch in "*?["):
            matched = [Path(p) for p in sorted(glob.glob(part))]
            if not matched:
                raise ValueError(f"data={spec!r}: the glob {part!r} matches no files")
            files.extend(matched)
        else:
            raise ValueError(f"data={spec!r}: {part!r} is not a file, a directory (of data files, or a saved "
                             "Hugging Face dataset) or a glob that matches")
    if not files:
        raise ValueError(f"data={spec!r} matched no files")
    for path in files:
        _check_file(spec, path)
    return files


def _directory_files(spec: str, path: Path) -> list[Path]:
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    found = [p for p in entries if p.suffix.lower() in DATA_SUFFIXES and not p.is_dir()]
    if not found:
        held = ", ".join(p.name + "/" * p.is_dir() for p in entries[:5]) + ", ..." * (len(entries) > 5)
        raise ValueError(f"data={spec!r}: the directory {str(path)!r} holds no data files (it holds "
                         f"{held or 'nothing'}); a directory is read for its {', '.join(DATA_SUFFIXES)} files, "
                         "or is a saved Hugging Face dataset")
    return found


def _check_file(spec: str, path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise ValueError(f"data file {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not "
                         "exist; restore its target or remove the link")
    if path.is_dir():
        raise ValueError(f"data={spec!r}: the glob matches the directory {str(path)!r}; a glob must match files")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty (0 bytes)")


def _one_kind(spec: str, files: list[Path]) -> str:
    first_of: dict[str, Path] = {}
    for path in files:
        first_of.setdefault(_kind(path), path)
    if len(first_of) > 1:
        mixed = ", ".join(f"{kind} ({str(path)!r})" for kind, path in sorted(first_of.items()))
        raise ValueError(f"data={spec!r} mixes kinds of files: {mixed}; pass one kind at a time")
    return next(iter(first_of))


# -- text -----------------------------------------------------------------------------------------


def _read_text(path: Path, encoding: str, errors: str) -> tuple[str, bool]:
    """A file's text, decoded as its byte-order mark says, else as ``encoding``; and whether
    the file's bytes are that text's UTF-8 as they stand."""
    raw = path.read_bytes()
    skip = 0
    for bom, codec in BOMS:
        if raw.startswith(bom):
            skip, encoding = len(bom), codec
            break
    name = str(path)
    # Read as text only for want of a known suffix: the file may be a token file misnamed.
    misnamed = "" if _kind(path) != "text" or path.suffix.lower() == ".txt" else (
        f" (read as text for its suffix {path.suffix or '(none)'!r}; token files end in .pt, .npy or .bin)")
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    nul = -1 if wide else raw.find(b"\x00", skip)  # in any other encoding a NUL byte is no text
    if nul >= 0:
        raise ValueError(f"data file {name!r} is not {encoding} text: byte {nul:,} is NUL (0x00), as in UTF-16 "
                         f"without a byte-order mark (pass --text-encoding utf-16-le) or a file not of text{misnamed}")
    try:
        text = str(memoryview(raw)[skip:], encoding, errors)
    except UnicodeDecodeError as err:
        start = skip + err.start
        raise ValueError(f"data file {name!r} is not {encoding} text: byte {start:,} is "
                         f"0x{raw[start:skip + err.end].hex()} ({err.reason}){misnamed}; pass --text-encoding "
                         f"with the file's encoding (e.g. latin-1 or cp1252), or {encoding}:replace to read what "
                         "does not decode as U+FFFD") from None
    if not text.strip():
        raise ValueError(f"data file {name!r} holds no text (only white space or a byte-order mark)")
    plain = skip == 0 and errors == "strict" and codecs.lookup(encoding).name == "utf-8"
    return text, plain


# -- token files ----------------------------------------------------------------------------------


def _token_file(path: Path, kind: str, token_dtype: str) -> torch.Tensor:
    """One token file's ids as int64; a file that is not what its suffix says is refused by name."""
    if kind == "torch":
        ids = _load_torch(path)
    elif kind == "numpy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"data file {str(path)!r} cannot be read as a .npy array: {err}") from None
    else:
        ids = _load_raw(path, token_dtype)
    return _int64_ids(f"data file {str(path)!r}", ids)


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on an unusual pickle protocol; the error below says more
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # whatever a truncated file or another format makes the unpickler raise
        message = str(err)
        if "Weights only load failed" in message:
            named = re.search(r"GLOBAL (\S+)", message)
            raise ValueError(f"data file {str(path)!r} holds pickled Python objects, not only tensors"
                             f"{f' (it names {named.group(1)})' if named else ''}; distlr loads .pt files with "
                             "weights_only=True and never runs what they hold: save the token ids as a 1-D tensor "
                             "with torch.save(ids, path)") from None
        raise ValueError(f"data file {str(path)!r} is not a file torch.save wrote (truncated, or another "
                         f"format?): {_first_sentence(err)}") from None


def _first_sentence(err: BaseException) -> str:
    """The gist of a library's error, for the end of a one-line message."""
    message = str(err).strip()
    return message.splitlines()[0].split(". ")[0] if message else type(err).__name__


def _load_raw(path: Path, token_dtype: str) -> np.ndarray:
    if token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"token_dtype={token_dtype!r} is not supported; allowed: {', '.join(TOKEN_DTYPES)}")
    dtype = np.dtype(token_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"data file {str(path)!r} is {size:,} bytes, not a whole number of {token_dtype} token ids "
                         f"({dtype.itemsize} bytes each); pass --token-dtype with the dtype it was written in "
                         f"({', '.join(TOKEN_DTYPES)})")
    ids = np.fromfile(path, dtype=dtype)
    found = _true_width(ids)
    if found is not None:
        width, high = found
        ratio = width // dtype.itemsize
        which = "every second" if ratio == 2 else "three of every four"
        seen = (f"{which} of its {ids.size:,} ids {'is' if ratio == 2 else 'are'} 0" if high == 0 else
                f"{which} of its {ids.size:,} ids {'is' if ratio == 2 else 'are'} at most {high} while the others "
                f"reach {int(ids.reshape(-1, ratio)[:, 0].max()):,}")
        raise ValueError(f"data file {str(path)!r} read as {token_dtype}: {seen}, so it holds {width}-byte token "
                         "ids (those are their high bytes); pass --token-dtype "
                         f"{'int64' if width == 8 else 'int32 (or uint32)'}")
    return ids


HIGH_PART_LIMIT = 256
"""A raw file read too narrow shows its wide ids' high parts as every second value (every fourth):
zeros for ids that fit the narrow type, and small numbers (1 for ids up to 131,071) beyond it.
Below this bound while the low parts reach this many times higher is how those high parts look;
in a real token stream every position draws from the same vocabulary (a vocabulary of 256 or
fewer, bytes, never reaches above it)."""


def _true_width(ids: np.ndarray) -> tuple[int, int] | None:
    """``(width in bytes, largest high part)`` of the ids a raw file read too narrow really holds:
    each (little-endian) id then reads as its low part followed by its high parts, which are 0 or
    small (``HIGH_PART_LIMIT``). None when the file reads as ids of its own width."""
    for width in (8, 4):
        ratio = width // ids.itemsize
        if ratio < 2 or ids.size % ratio or ids.size // ratio < 8:  # too few to tell
            continue
        rows = ids.reshape(-1, ratio)
        low, high = int(rows[:, 0].max()), int(rows[:, 1:].max())
        if low and not high:
            return width, 0
        if ids.size // ratio >= 64 and high < HIGH_PART_LIMIT and low >= HIGH_PART_LIMIT * (high + 1):
            return width, high  # 64 rows: a real stream's odd positions all that small by chance is nil
    return None


def _int64_ids(what: str, ids: Any) -> torch.Tensor:
    """``ids`` (a tensor or an array) as a 1-D int64 tensor, refused unless it is 1-D integers
    that fit int64."""
    if isinstance(ids, torch.Tensor):
        integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
    elif isinstance(ids, np.ndarray):
        integer = ids.dtype.kind in "iu"
    else:
        raise ValueError(f"{what} holds a {type(ids).__name__}, not a tensor of token ids")
    if ids.ndim != 1 or not integer:
        raise ValueError(f"{what} must hold a 1-D array of integer token ids; got {tuple(ids.shape)} of {ids.dtype}")
    if len(ids) == 0:
        raise ValueError(f"{what} holds no token ids (an empty array)")
    array = ids.numpy(force=True) if isinstance(ids, torch.Tensor) else ids
    if array.dtype == np.uint64 and int(array.max()) > INT64_MAX:
        raise ValueError(f"{what} holds the uint64 token id {int(array.max())}, more than int64 holds "
                         f"({INT64_MAX}); token ids must fit int64")
    return torch.from_numpy(array.astype(np.int64, copy=False))


# -- Hugging Face datasets ------------------------------------------------------------------------


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


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """datasets logs its own error for a file it cannot read; the ValueError raised for it says it once."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


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


def _load_table(kind: str, path: Path, encoding: str, errors: str) -> Any:
    """One jsonl/json/parquet/csv/arrow file as a dataset, each on its own so that an error names its file."""
    datasets = _datasets()
    # The builder writes its cache to a temporary directory, not ~/.cache; the data stays in memory.
    with tempfile.TemporaryDirectory(prefix="distlr-datasets-") as cache, _quiet(datasets):
        text, given = None, path
        if kind in ("json", "csv"):  # decoded here as text files are; datasets gets UTF-8
            text, plain = _read_text(path, encoding, errors)
            if not plain:
                given = Path(cache) / f"utf-8{path.suffix}"
                given.write_text(text, encoding="utf-8")
        try:
            return datasets.load_dataset(kind, data_files=[str(given)], split="train", cache_dir=cache,
                                         keep_in_memory=True)
        except Exception as err:  # pyarrow's, pandas' and datasets' own errors, for one reason: this file
            raise ValueError(f"data file {str(path)!r} {_why_unreadable(kind, path, text, err)}") from err


def _why_unreadable(kind: str, path: Path, text: str | None, err: Exception) -> str:
    if kind == "json" and text is not None:
        where = _json_syntax_error(path, text)
        if where is not None:
            return f"is not valid JSON: {where}"
    cause: BaseException = err
    while type(cause).__name__ == "DatasetGenerationError" and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    detail = _first_sentence(cause)
    if "corresponds to no data" in detail:  # datasets' words for a file of no rows
        return "holds no rows"
    return f"cannot be read as {kind}: {detail}"


def _json_syntax_error(path: Path, text: str) -> str | None:
    """Where JSON or JSON Lines text first fails to parse (``"line 2: Expecting ',' delimiter"``)."""
    try:
        json.loads(text)
        return None  # one JSON document
    except ValueError as err:
        whole = err
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if path.suffix.lower() != ".jsonl" and not _parses(first):
        return f"line {whole.lineno}, column {whole.colno}: {whole.msg}" if isinstance(whole, json.JSONDecodeError) \
            else str(whole)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: {err.msg}"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object"
    return None


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _from_datasets(loaded: list[tuple[str, Any]], tokenize: Tokenize, text_column: str, *, source: str) -> Corpus:
    """The token stream of datasets read from ``(file, dataset)`` pairs: every one's ``input_ids``
    as they are, else its ``text_column`` tokenized."""
    names = [name for name, _ in loaded]
    with_ids = [name for name, dataset in loaded if "input_ids" in dataset.column_names]
    if with_ids and len(with_ids) < len(loaded):
        without = next(name for name in names if name not in with_ids)
        raise ValueError(f"data file {with_ids[0]!r} has an input_ids column and {without!r} has none; pass "
                         "files of one kind")
    if with_ids:
        parts = [_int64_ids(f"column 'input_ids' of {name!r}", _flat_ids(name, _column(name, dataset, "input_ids")))
                 for name, dataset in loaded]
        return Corpus(torch.cat(parts), f"{source}, input_ids column", names)
    texts = [text for name, dataset in loaded for text in _texts(name, dataset, text_column)]
    return Corpus(tokenize("\n\n".join(texts)), f"{source}, column {text_column!r}", names)


def _column(name: str, dataset: Any, column: str) -> list[Any]:
    """A column's values, refused when the column is missing, has no rows, or a row lacks it."""
    columns = list(dataset.column_names)
    if column not in columns:
        raise ValueError(f"data file {name!r} has no column {column!r} (nor 'input_ids'); its columns are "
                         f"{columns}: pass --text-column with the one that holds the text")
    values = dataset[column]
    if not values:
        raise ValueError(f"data file {name!r} holds no rows")
    missing = [i for i, value in enumerate(values) if value is None]
    if missing:
        fix = "or drop the column to read the text" if column == "input_ids" else \
            "or pass --text-column with the column that holds the text"
        raise ValueError(f"data file {name!r}: {len(missing):,} of {len(values):,} rows have no {column!r} (the "
                         f"first: row {missing[0] + 1}); give every row one, {fix} (its columns are {columns})")
    return values


def _texts(name: str, dataset: Any, column: str) -> list[str]:
    texts = _column(name, dataset, column)
    wrong = [value for value in texts if not isinstance(value, str)]
    if wrong:
        raise ValueError(f"data file {name!r}: column {column!r} must hold strings, but {len(wrong):,} of "
                         f"{len(texts):,} rows hold {type(wrong[0]).__name__} (e.g. {wrong[0]!r:.40}); pass "
                         "--text-column with the column that holds the text")
    if not any(text.strip() for text in texts):
        raise ValueError(f"data file {name!r}: column {column!r} holds only empty strings")
    return texts


def _flat_ids(name: str, rows: list[Any]) -> np.ndarray:
    for number, row in enumerate(rows, 1):
        if not isinstance(row, list):
            raise ValueError(f"data file {name!r}: column 'input_ids' must hold lists of token ids, but row "
                             f"{number} holds {type(row).__name__}")
    return np.array([i for row in rows for i in row])


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
