"""Inputs as users have them: saved configs, token files, Hugging Face datasets and model
directories, and the batches and arguments the API is given. One test per finding of issue 11."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from distlr import LRFinder, LRFinderResult
from distlr.__main__ import main
from distlr.train.data import shard_loader
from distlr.dist.collectives import DistContext
from distlr.output.progress import ProgressReporter
from helpers import RegressionNet, regression_data

FAST = ["--num-steps", "12", "--batch-size", "4", "--seq-len", "16", "--no-progress"]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(tmp_path, *argv: str, out: str = "out") -> tuple[int, Path]:
    path = tmp_path / out
    return main([*FAST, *argv, "--output-dir", str(path)]), path


# -- saved configs never overwrite a run --------------------------------------------------------


def test_rerunning_a_runs_saved_config_leaves_the_run_untouched(tmp_path, capsys):
    run_a = tmp_path / "runA"
    assert main([*FAST, "--output-dir", str(run_a), "--overwrite"]) == 0
    saved = (run_a / "config.yaml").read_text()
    assert "overwrite" not in saved  # a saved config never carries it
    before = digests(run_a)
    capsys.readouterr()
    # The saved config names runA as its output_dir: refused, with or without --overwrite.
    for extra in ([], ["--overwrite"]):
        assert main(["--config", str(run_a / "config.yaml"), "--seed", "7", *extra]) == 2
        assert "never writes over the file it was given" in capsys.readouterr().err
    # A copy of it elsewhere is refused too: runA already holds a result, and no overwrite was saved.
    copy = tmp_path / "copy.yaml"
    copy.write_text(saved)
    assert main(["--config", str(copy), "--seed", "7"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert digests(run_a) == before


def test_a_yamls_paths_are_read_from_its_own_directory(tmp_path, monkeypatch):
    from distlr.cli.parse import parse_cli

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(tmp_path)  # not the repository root
    cfg = parse_cli(["--config", str(repo / "configs" / "zero2.yaml")])
    assert cfg.deepspeed == str(repo / "configs" / "ds_zero2.json")


# -- token files and datasets -------------------------------------------------------------------


def ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def read_inputs(out: Path) -> dict:
    """What the command line read: result.json's own key beside the result."""
    return json.loads((out / "result.json").read_text())["cli"]["inputs"]


def test_several_pt_token_files_are_concatenated_not_read_as_text(tmp_path, capsys):
    torch.save(torch.as_tensor(ids(3000, 0)), tmp_path / "a.pt")
    torch.save(torch.as_tensor(ids(2000, 1)), tmp_path / "b.pt")
    code, out = run(tmp_path, "--data", f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}")
    assert code == 0
    inputs = read_inputs(out)
    assert inputs["tokens"] == 5000 and inputs["source"] == "token files (torch)" and len(inputs["files"]) == 2
    assert "5,000 tokens from 2 file(s)" in capsys.readouterr().out
    code, out = run(tmp_path, "--data", str(tmp_path / "*.pt"), out="glob")  # a glob reads the same
    assert code == 0 and read_inputs(out)["tokens"] == 5000


def test_npy_and_uint16_bin_token_files(tmp_path):
    np.save(tmp_path / "ids.npy", ids(4000, 2))
    code, out = run(tmp_path, "--data", str(tmp_path / "ids.npy"))
    assert code == 0 and read_inputs(out)["tokens"] == 4000
    ids(4000, 3).astype(np.uint16).tofile(tmp_path / "train.bin")
    code, out = run(tmp_path, "--data", str(tmp_path / "train.bin"), out="bin")
    assert code == 0 and read_inputs(out)["tokens"] == 4000 and read_inputs(out)["source"] == "token files (raw)"


@pytest.mark.parametrize("make, words", [
    (lambda d: np.save(d / "neg.npy", np.array([1, 2, -3] * 100)), ["negative token id (-3)", "--token-dtype"]),
    (lambda d: torch.save(torch.arange(300) + 250, d / "big.pt"), ["token id 549", "vocab_size is 256"]),
])
def test_token_ids_outside_the_vocabulary_are_refused_before_any_step(tmp_path, capsys, make, words):
    make(tmp_path)
    (path,) = [p for p in tmp_path.iterdir()]
    code, out = run(tmp_path, "--data", str(path))
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err
    assert not out.exists()  # a failed run leaves no empty output directory


def test_a_saved_datasets_directory_and_jsonl_files(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    home_cache = Path.home() / ".cache" / "huggingface" / "datasets"
    before = sorted(home_cache.rglob("*")) if home_cache.exists() else []
    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    code, out = run(tmp_path, "--data", str(tmp_path / "saved"))
    assert code == 0
    inputs = read_inputs(out)
    assert inputs["source"] == "datasets directory, column 'text'" and inputs["tokens"] > 10_000
    with (tmp_path / "rows.jsonl").open("w") as fh:
        for t in texts:
            fh.write(json.dumps({"body": t}) + "\n")
    code, out = run(tmp_path, "--data", str(tmp_path / "rows.jsonl"), "--text-column", "body", out="jsonl")
    assert code == 0 and read_inputs(out)["tokens"] == inputs["tokens"]
    assert "tokens from 1 file(s)" in capsys.readouterr().out
    code, _ = run(tmp_path, "--data", str(tmp_path / "rows.jsonl"), out="missing-column")
    err = capsys.readouterr().err
    assert code == 2 and "no column 'text'" in err and "'body'" in err and "--text-column" in err
    assert (sorted(home_cache.rglob("*")) if home_cache.exists() else []) == before  # nothing in the home


def test_an_input_ids_column_is_used_as_it_is(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [list(range(i, i + 40)) for i in range(100)]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "tok"))
    code, out = run(tmp_path, "--data", str(tmp_path / "tok"))
    assert code == 0 and read_inputs(out)["tokens"] == 4000


# -- model kinds --------------------------------------------------------------------------------


def bert_dir(tmp_path: Path, *, tokenizer: bool = True, head: str = "BertForMaskedLM", vocab_size: int = 100) -> Path:
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    path = tmp_path / "bert"
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    getattr(transformers, head)(config).save_pretrained(path)
    if tokenizer:
        chars = "abcdefghijklmnopqrstuvwxyz.,:0123456789"
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
        vocab += "the quick brown fox jumps over lazy dog line".split()
        BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    return path


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join("the quick brown fox jumps over the lazy dog line 42." for _ in range(300)))
    return path


def test_a_bert_directory_trains_as_a_masked_lm(tmp_path, capsys):
    code, out = run(tmp_path, "--model", str(bert_dir(tmp_path)), "--data", str(corpus(tmp_path)))
    assert code == 0, capsys.readouterr().err
    result = LRFinderResult.load(out / "result.json")
    # What the command line built is told in result.json's own key, beside the result.
    notes = json.loads((out / "result.json").read_text())["cli"]["notes"]
    assert any("masked LM (BertForMaskedLM)" in note and "15 %" in note for note in notes)
    assert all(np.isfinite(result.losses[:3]))


@pytest.mark.parametrize("make, words", [
    (lambda d: bert_dir(d, tokenizer=False), ["masked LM (BertForMaskedLM)", "no such tokenizer"]),
    (lambda d: bert_dir(d, head="BertForSequenceClassification"), ["BertForSequenceClassification", "not a language model"]),
])
def test_a_model_without_what_text_training_needs_is_refused(tmp_path, capsys, make, words):
    code, _ = run(tmp_path, "--model", str(make(tmp_path)), "--data", str(corpus(tmp_path)))
    err = capsys.readouterr().err
    assert code == 2 and all(w in err for w in words), err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_the_first_step(tmp_path, capsys):
    # Was: the id check passed (the text uses low ids), then masking drew an id past the embedding: IndexError.
    code, out = run(tmp_path, "--model", str(bert_dir(tmp_path, vocab_size=60)), "--data", str(corpus(tmp_path)))
    err = capsys.readouterr().err
    assert code == 2 and "its tokenizer has 92 tokens but the model's vocab_size is 60" in err, err
    assert "resize_token_embeddings" in err and "Traceback" not in err and not (out / "result.json").exists()


def test_a_t5_directory_is_refused_in_two_lines(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    path = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16)).save_pretrained(path)
    capsys.readouterr()
    code, _ = run(tmp_path, "--model", str(path))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) <= 2 and len(err) < 400, err
    assert "T5ForConditionalGeneration" in err and "encoder-decoder" in err and "factory" in err


def test_a_sequence_longer_than_the_model_positions_is_refused(tmp_path, capsys):
    from transformers import GPT2Config

    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2", **{k: v for k, v in GPT2Config(
        vocab_size=256, n_positions=32, n_embd=16, n_layer=1, n_head=2).to_dict().items() if k != "model_type"}}))
    code, _ = run(tmp_path, "--model", str(path), "--seq-len", "64")
    assert code == 2 and "seq_len=64 is longer than the model's n_positions=32" in capsys.readouterr().err


# -- the API takes what users pass --------------------------------------------------------------


def test_a_one_shot_generator_that_runs_out_says_so():
    model = RegressionNet()
    batches = (b for b in DataLoader(regression_data(n=64), batch_size=16))  # 4 batches, once
    with pytest.raises(ValueError, match="one-shot iterator"):
        LRFinder(model, batches, criterion=nn.MSELoss(), device="cpu").find(num_steps=10)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(log_every=0), ValueError, "log_every=0"), (dict(log_every=-3), ValueError, "log_every=-3"),
    (dict(log_every=2.5), ValueError, "log_every=2.5"), (dict(progress="yes"), TypeError, "progress='yes'"),
])
def test_display_arguments_are_checked_like_every_other(kwargs, error, words):
    finder = LRFinder(RegressionNet(), DataLoader(regression_data(n=64), batch_size=16), criterion=nn.MSELoss(),
                      device="cpu")
    with pytest.raises(error, match=words):
        finder.find(num_steps=5, **kwargs)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    model.loss_type = "ForCausalLM"
    return model


def test_a_datasets_dataset_without_a_torch_format_is_read_as_tensors():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"input_ids": [[(i + j) % 64 for j in range(16)] for i in range(64)]})
    result = LRFinder(tiny_gpt2(), DataLoader(rows, batch_size=8), device="cpu").find(num_steps=6)
    assert result.steps_run >= 2 and result.global_batch_size == 8


def test_ragged_rows_say_how_to_make_them_tensors():
    batches = [{"input_ids": [[1, 2, 3], [4, 5]]}] * 4
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] holds rows of different lengths"):
        LRFinder(tiny_gpt2(), batches, device="cpu").find(num_steps=3)


def test_a_criterion_beside_a_hugging_face_output_says_what_to_do():
    batches = [{"input_ids": torch.randint(0, 64, (4, 8)), "labels": torch.randint(0, 64, (4, 8))}] * 4
    with pytest.raises(TypeError, match="criterion=None") as info:
        LRFinder(tiny_gpt2(), batches, criterion=nn.CrossEntropyLoss(), device="cpu").find(num_steps=3)
    assert "CausalLMOutputWithCrossAttentions" in str(info.value) and "logits" in str(info.value)


class TupleOutput(nn.Module):
    """Returns ``(loss, logits)`` like a Hugging Face model with ``return_dict=False``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x, labels):
        out = self.linear(x).squeeze(-1)
        return nn.functional.mse_loss(out, labels), out


def test_a_loss_logits_tuple_is_read_when_the_batch_has_labels():
    data = regression_data(n=64)
    batches = [{"x": data.tensors[0][i:i + 16], "labels": data.tensors[1][i:i + 16]} for i in range(0, 64, 16)]
    result = LRFinder(TupleOutput(), batches, device="cpu").find(num_steps=6, max_lr=1e-2, extend_range=False)
    assert result.steps_run == 6


class ReadsText(nn.Module):
    """Takes a list of strings (its own tokenizer inside) and returns a prediction per string."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.weight * torch.tensor([float(len(t)) for t in texts])


def test_a_list_of_strings_is_one_input_not_many():
    batches = [(["a", "bb", "ccc"], torch.tensor([1.0, 2.0, 3.0]))] * 4
    result = LRFinder(ReadsText(), batches, criterion=nn.MSELoss(), device="cpu").find(num_steps=5, max_lr=1e-3, extend_range=False)
    assert result.steps_run == 5


def test_a_snapshot_dir_that_cannot_be_made_is_named_with_the_way_around_it():
    with pytest.raises(OSError) as info:
        LRFinder(RegressionNet(), DataLoader(regression_data(n=64), batch_size=16), criterion=nn.MSELoss(),
                 device="cpu", snapshot="disk", snapshot_dir="/proc/distlr-x")
    assert "snapshot_dir='/proc/distlr-x' cannot be created" in str(info.value) and "snapshot='memory'" in str(info.value)


def test_data_too_short_for_one_batch_says_how_short(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("just a few words here")
    code, _ = run(tmp_path, "--data", str(tmp_path / "tiny.txt"), "--seq-len", "8")
    assert code == 2 and "gives 2 sequence(s) of 8 tokens, fewer than batch_size=4" in capsys.readouterr().err


def test_sharding_that_leaves_a_rank_no_batch_says_so():
    loader = DataLoader(regression_data(n=20), batch_size=16, drop_last=True)
    with pytest.raises(ValueError, match=r"20 samples, shared by 2 ranks, give each rank 10: fewer than batch_size=16"):
        shard_loader(loader, DistContext(rank=0, world_size=2))


# -- rough edges ----------------------------------------------------------------------------------


def test_output_files_are_readable_by_colleagues(tmp_path):
    old = os.umask(0o022)
    try:
        code, out = run(tmp_path)
    finally:
        os.umask(old)
    assert code == 0
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}


def test_the_cycling_warning_gets_a_line_of_its_own(caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    reporter = ProgressReporter(10, bar=True, stream=stream)
    reporter.step(0, 1e-3, 2.0, 2.0)
    drawn = stream.getvalue()
    with caplog.at_level(logging.WARNING, logger="distlr"):
        reporter.warn("train_dataloader ran out after 4 batches")
    # The bar is wiped from its line before the warning is logged, and drawn again after it.
    after = stream.getvalue()[len(drawn):]
    assert after.startswith("\r" + " " * 10) and after.rstrip().endswith("lr 1.00e-03 loss 2.0000]")
    assert caplog.messages == ["train_dataloader ran out after 4 batches"]
    reporter.close()


def test_a_yaml_true_is_no_number(tmp_path):
    from distlr.cli.parse import parse_cli

    path = tmp_path / "c.yaml"
    path.write_text("num_steps: true\n")
    with pytest.raises(ValueError, match="num_steps=True is not a valid int"):
        parse_cli(["--config", str(path)])


def test_a_flag_prefix_suggests_the_flags_it_starts(capsys):
    assert main(["--num", "10"]) == 2
    assert "did you mean --num-steps or --num-steps-series or --num-workers?" in capsys.readouterr().err


def test_the_global_batch_is_measured_not_taken_from_the_first_batch():
    # 40 samples in batches of 16: 16, 16 and 8, cycled.
    loader = DataLoader(regression_data(n=40), batch_size=16)
    result = LRFinder(RegressionNet(), loader, criterion=nn.MSELoss(), device="cpu").find(num_steps=9, max_lr=1e-3)
    assert result.micro_batch_size == 16 and result.global_batch_size == 16
    assert any("varied between 8 and 16 samples" in note for note in result.notes)


def test_plotting_into_a_missing_directory_names_the_path(tmp_path, regression):
    model, loader = regression
    finder = LRFinder(model, loader, criterion=nn.MSELoss(), device="cpu")
    finder.find(num_steps=5)
    with pytest.raises(FileNotFoundError, match="cannot write 'nodir/a.png': there is no directory 'nodir'"):
        finder.plot("nodir/a.png")


def test_help_states_each_default_once_and_what_data_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the system temp directory). (default: None)" not in text
    assert ".pt/.npy/.bin" in text and "glob" in text and "datasets directory" in text


def test_result_json_says_where_it_came_from(tmp_path):
    code, out = run(tmp_path)
    assert code == 0
    data = json.loads((out / "result.json").read_text())
    assert data["schema_version"] >= 2
    assert data["provenance"]["torch"] == torch.__version__.split("+")[0] or data["provenance"]["torch"]
    assert data["provenance"]["launcher"] == "single" and data["provenance"]["world_size"] == 1
    assert {"distlr", "transformers", "deepspeed"} <= set(data["provenance"])
