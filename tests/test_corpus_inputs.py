"""--data is what it says, or refused: text decoded strictly, token files checked against their
dtype, rows that lack their text counted, directories of any data kind, and one line naming the
file and what is wrong for each bad input (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distlr.cli.corpus import byte_tokens, read_corpus

TEXT = "Crème brûlée, naïve café: the quick brown fox jumps over the lazy dog. " * 20


def read(spec: Path | str, **kwargs):
    return read_corpus(str(spec), tokenize=byte_tokens, **kwargs)


def refusal(spec: Path | str, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        read(spec, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# -- text is decoded strictly ---------------------------------------------------------------------


def test_latin_1_text_is_refused_naming_the_byte_and_read_when_its_encoding_is_given(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(TEXT.encode("latin-1"))
    message = refusal(path)
    offset = TEXT.encode("latin-1").index("è".encode("latin-1"))
    for words in (str(path), f"byte {offset}", "0xe8", "utf-8", "--text-encoding", "latin-1", "utf-8:replace"):
        assert words in message, message
    assert torch.equal(read(path, text_encoding="latin-1").tokens, byte_tokens(TEXT))  # the accents survive
    replaced = read(path, text_encoding="utf-8:replace").tokens  # only when asked
    assert "\ufffd" in bytes(replaced.tolist()).decode("utf-8")


@pytest.mark.parametrize("encoding, bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                           ("utf-16-be", b"\xfe\xff"), ("utf-32-le", b"\xff\xfe\x00\x00")])
def test_a_byte_order_mark_says_the_encoding(tmp_path, encoding, bom):
    path = tmp_path / "marked.txt"
    path.write_bytes(bom + TEXT.encode(encoding))
    assert torch.equal(read(path).tokens, byte_tokens(TEXT))  # no NULs, no mark, every accent


def test_utf_16_without_a_mark_is_refused_not_read_with_nuls(tmp_path):
    path = tmp_path / "wide.txt"
    path.write_bytes(TEXT.encode("utf-16-le"))
    message = refusal(path)
    assert str(path) in message and "NUL" in message and "--text-encoding utf-16-le" in message
    assert torch.equal(read(path, text_encoding="utf-16-le").tokens, byte_tokens(TEXT))


@pytest.mark.parametrize("value, words", [("no-such-codec", "not a text encoding"), ("base64", "not a text encoding"),
                                          ("utf-8:loose", "after the ':'")])
def test_an_unknown_text_encoding_is_refused_naming_it(tmp_path, value, words):
    path = tmp_path / "plain.txt"
    path.write_text("plain ascii text " * 10)
    message = refusal(path, text_encoding=value)
    assert f"text_encoding={value!r}" in message and words in message


# -- token files against their dtype --------------------------------------------------------------


@pytest.mark.parametrize("written, read_as, hint", [("int32", "uint16", "int32"), ("int64", "uint16", "int64"),
                                                    ("int64", "int32", "int64")])
def test_a_bin_of_wider_ids_is_refused_with_the_dtype_to_pass(tmp_path, written, read_as, hint):
    path = tmp_path / "train.bin"
    np.arange(1, 1001).astype(written).tofile(path)
    message = refusal(path, token_dtype=read_as)
    assert str(path) in message and f"read as {read_as}" in message and f"--token-dtype {hint}" in message
    assert read(path, token_dtype=written).tokens.tolist() == list(range(1, 1001))  # not 2,000 ids half zeros


def test_int32_ids_beyond_uint16_read_as_uint16_are_refused_too(tmp_path):
    """A vocabulary over 65,536 (Llama 3, 128k): the high halves are 0 or 1, not all 0."""
    path = tmp_path / "big.bin"
    ids = np.random.default_rng(0).integers(0, 100_000, 5000).astype(np.int32)
    ids.tofile(path)
    message = refusal(path)
    assert str(path) in message and "every second of its 10,000 ids is at most 1 while the others reach" in message
    assert "--token-dtype int32" in message
    assert read(path, token_dtype="int32").tokens.tolist() == ids.tolist()


@pytest.mark.parametrize("vocab", [256, 50_000, 65_536])
def test_real_uint16_streams_are_read_whatever_their_vocabulary(tmp_path, vocab):
    ids = np.random.default_rng(1).integers(0, vocab, 5000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    assert read(tmp_path / "train.bin").tokens.tolist() == ids.tolist()


def test_uint16_ids_with_zeros_among_them_are_still_read(tmp_path):
    ids = np.random.default_rng(0).integers(0, 3, 1000).astype(np.uint16)  # a third of them 0
    ids.tofile(tmp_path / "train.bin")
    assert read(tmp_path / "train.bin").tokens.tolist() == ids.tolist()


def test_a_bin_that_is_not_whole_ids_is_refused_naming_its_size(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(bytes(range(1, 202)))
    message = refusal(path)
    assert str(path) in message and "201 bytes" in message and "uint16" in message and "--token-dtype" in message


def test_uint64_ids_are_read_when_they_fit_int64_and_refused_by_value_when_not(tmp_path):
    np.save(tmp_path / "fits.npy", np.arange(10, dtype=np.uint64))
    assert read(tmp_path / "fits.npy").tokens.tolist() == list(range(10))
    np.save(tmp_path / "huge.npy", np.array([1, 2, 2**63 + 5], dtype=np.uint64))
    message = refusal(tmp_path / "huge.npy")
    assert "huge.npy" in message and "uint64" in message and str(2**63 + 5) in message
    assert "negative" not in message


# -- empty, truncated and pickled files -----------------------------------------------------------


class Payload:
    """Pickles to a call that creates a file: loading it must never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("make, words", [
    (lambda p: p.with_suffix(".txt").write_bytes(b""), ["is empty (0 bytes)"]),
    (lambda p: p.with_suffix(".txt").write_bytes(b"\xef\xbb\xbf  \n"), ["holds no text"]),
    (lambda p: p.with_suffix(".pt").write_bytes(b""), ["is empty (0 bytes)"]),
    (lambda p: p.with_suffix(".pt").write_bytes(_saved(torch.arange(500))[:300]), ["not a file torch.save wrote"]),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(0, dtype=np.int64)), ["holds no token ids"]),
])
def test_an_empty_or_truncated_file_is_refused_naming_it(tmp_path, make, words):
    make(tmp_path / "data")
    (path,) = tmp_path.iterdir()
    message = refusal(path)
    assert str(path) in message and all(w in message for w in words), message


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pt_holding_a_pickle_payload_is_refused_and_never_run(tmp_path, protocol):
    import pickle

    marker = tmp_path / "ran"
    path = tmp_path / "tokens.pt"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    message = refusal(path)
    assert str(path) in message and "pickled Python objects" in message and "weights_only" in message
    assert not marker.exists()


# -- files and directories ------------------------------------------------------------------------


def test_a_dangling_symlink_in_a_directory_is_named_with_its_target(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(TEXT)
    (tmp_path / "d" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    message = refusal(tmp_path / "d")
    assert str(tmp_path / "d" / "gone.txt") in message and str(tmp_path / "nowhere.txt") in message
    assert "Errno" not in message


def test_a_directory_of_no_data_files_lists_what_it_holds_and_what_is_read(tmp_path):
    (tmp_path / "notes.md").write_text(TEXT)
    message = refusal(tmp_path)
    assert "notes.md" in message and ".jsonl" in message and ".parquet" in message and ".bin" in message


def test_a_directory_of_token_files_is_read_and_one_of_mixed_kinds_is_refused_naming_them(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100))
    np.save(tmp_path / "b.npy", np.arange(50))
    assert read(tmp_path).tokens.numel() == 150
    (tmp_path / "c.txt").write_text(TEXT)
    message = refusal(tmp_path)
    assert "mixes kinds" in message and "a.npy" in message and "c.txt" in message


def test_a_glob_among_several_that_matches_nothing_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    message = refusal(f"{tmp_path / 'a.txt'},{tmp_path / '*.text'}")
    assert f"the glob {str(tmp_path / '*.text')!r} matches no files" in message


# -- datasets: rows, columns and directories ------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_rows_without_the_text_are_counted_and_refused(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"text": f"row {i} " * 5} if i % 2 else {"body": "elsewhere"} for i in range(10)]
    path = write_jsonl(tmp_path / "half.jsonl", rows)
    message = refusal(path)
    assert str(path) in message and "5 of 10 rows have no 'text'" in message and "'body'" in message


def test_a_text_column_of_numbers_is_refused_naming_the_type(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "nums.parquet"
    datasets.Dataset.from_dict({"text": list(range(20))}).to_parquet(str(path))
    message = refusal(path)
    assert str(path) in message and "column 'text' must hold strings" in message and "int" in message
    assert "buffer" not in message


def test_a_bad_jsonl_line_is_named_and_an_empty_jsonl_is_refused(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    message = refusal(path)
    assert str(path) in message and "line 2" in message
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in refusal(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "holds no text" in refusal(tmp_path / "blank.jsonl")


def test_latin_1_jsonl_is_refused_then_read_with_its_encoding(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(("".join(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n" for _ in range(3)))
                     .encode("latin-1"))
    message = refusal(path)
    assert str(path) in message and "byte" in message and "--text-encoding" in message
    assert read(path, text_encoding="latin-1").tokens.numel() == len("\n\n".join([TEXT] * 3).encode("utf-8"))


def test_directories_of_jsonl_parquet_and_arrow_are_read_as_the_files_they_hold(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"line {i}: the quick brown fox" for i in range(30)]
    expected = len("\n\n".join(texts).encode("utf-8"))
    import pyarrow as pa

    for folder in ("j", "p", "a"):
        (tmp_path / folder).mkdir()
    for part in range(3):
        rows = texts[part * 10:part * 10 + 10]
        write_jsonl(tmp_path / "j" / f"{part}.jsonl", [{"text": t} for t in rows])
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / "p" / f"{part}.parquet"))
        table = pa.table({"text": rows})
        with pa.ipc.new_stream(str(tmp_path / "a" / f"{part}.arrow"), table.schema) as stream:  # as datasets writes
            stream.write_table(table)
    for folder, kind in (("j", "json"), ("p", "parquet"), ("a", "arrow")):
        corpus = read(tmp_path / folder)
        assert corpus.tokens.numel() == expected and len(corpus.files) == 3 and corpus.source.startswith(kind)


# -- through the command line: one line, exit 2, before any step ----------------------------------


def bad_pt(d: Path) -> tuple[Path, list[str]]:
    import pickle

    (d / "tokens.pt").write_bytes(pickle.dumps(Payload(d / "ran"), protocol=2))
    return d / "tokens.pt", ["pickled Python objects"]


def empty_txt(d: Path) -> tuple[Path, list[str]]:
    (d / "empty.txt").write_bytes(b"")
    return d / "empty.txt", ["is empty (0 bytes)"]


def bad_jsonl(d: Path) -> tuple[Path, list[str]]:
    pytest.importorskip("datasets")
    (d / "bad.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    return d / "bad.jsonl", ["is not valid JSON: line 2"]


def int32_bin(d: Path) -> tuple[Path, list[str]]:
    np.arange(1, 2001, dtype=np.int32).tofile(d / "train.bin")
    return d / "train.bin", ["every second of its 4,000 ids is 0", "--token-dtype int32"]


FAST = ["--num-steps", "12", "--batch-size", "4", "--seq-len", "16", "--no-progress"]


def assert_refused_in_one_line(path: Path, words: list[str], code: int, out: str, err: str) -> None:
    assert code == 2, out + err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"distlr: error: data file {str(path)!r}") and all(w in err for w in words), err
    assert "step " not in out and not (path.parent / "out").exists() and not (path.parent / "ran").exists()


@pytest.mark.parametrize("make", [empty_txt, bad_pt])
def test_python_m_distlr_refuses_bad_data_in_one_line_before_any_step(tmp_path, make):
    path, words = make(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "distlr", *FAST, "--data", str(path), "--output-dir",
                           str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert_refused_in_one_line(path, words, proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize("make", [bad_jsonl, int32_bin])
def test_main_refuses_bad_data_in_one_line_before_any_step(tmp_path, capfd, make):
    from distlr.__main__ import main

    path, words = make(tmp_path)
    code = main([*FAST, "--data", str(path), "--output-dir", str(tmp_path / "out")])
    out, err = capfd.readouterr()  # the file descriptors: a library's own log line would show here
    assert_refused_in_one_line(path, words, code, out, err)
