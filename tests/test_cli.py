"""The command line: the demo end to end, outputs, and never overwriting a result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distlr import LRFinderResult
from distlr.__main__ import main

FAST = ["--num-steps", "12", "--batch-size", "4", "--seq-len", "16", "--no-progress"]


def test_demo_with_no_arguments_prints_a_suggestion_and_writes_json_and_png(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "distlr"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "suggested lr:" in proc.stdout
    runs = list((tmp_path / "distlr-runs").iterdir())
    assert len(runs) == 1
    result = LRFinderResult.from_json((runs[0] / "result.json").read_text())
    assert result.optimal_lr is not None and result.min_lr <= result.optimal_lr <= result.max_lr
    assert result.num_steps == 100 and result.steps_run >= 10
    assert f"{result.optimal_lr:.3e}" in proc.stdout
    assert (runs[0] / "lr_finder.png").read_bytes()[:4] == b"\x89PNG"
    assert "min_lr: 1.0e-08" in (runs[0] / "config.yaml").read_text()


def test_config_file_and_flags_drive_the_run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("min_lr: 1e-5\nmax_lr: 1.0\nnum_steps: 40\nsuggestion_method: valley\n")
    out = tmp_path / "out"
    assert main(["--config", str(config), *FAST, "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["num_steps"] == 12 and result["min_lr"] == 1e-5 and result["suggestion_method"] == "valley"
    expected_points = 12 if result["diverged_at"] is None else result["diverged_at"] + 1
    assert len(result["lrs"]) == len(result["losses"]) == expected_points
    assert "num_steps: 12" in (out / "config.yaml").read_text()
    printed = capsys.readouterr().out
    if result["optimal_lr"] is None:
        assert f"no suggestion (valley): {result['suggestion_note']}" in printed
    else:
        assert f"suggested lr: {result['optimal_lr']:.3e}" in printed


def test_an_existing_result_is_never_overwritten_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("my earlier result")
    assert main([*FAST, "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "result.json").read_text() == "my earlier result"
    assert main([*FAST, "--output-dir", str(out), "--overwrite"]) == 0
    assert LRFinderResult.from_json((out / "result.json").read_text()).num_steps == 12


def test_default_output_dirs_are_new_each_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(FAST) == 0
    assert main(FAST) == 0
    runs = sorted(Path("distlr-runs").iterdir())
    assert len(runs) == 2 and all((r / "result.json").exists() for r in runs)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--max-lr", "0"], ["max_lr=0.0"]),
        (["--lr-max", "1"], ["--lr-max", "did you mean"]),
        (["--model", "no/such/dir"], ["model='no/such/dir'"]),
        (["--data", "missing.txt"], ["data='missing.txt'"]),
        (["--deepspeed", "no/ds.json"], ["deepspeed='no/ds.json': no such file"]),
        (["--output-dir", "/proc/distlr-out"], ["output_dir='/proc/distlr-out' cannot be created"]),
        (["--output-dir", "{file}"], ["exists and is not a directory"]),
        (["--device", "cuda"], ["device='cuda' but CUDA is not available"]),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, words):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "a-file").write_text("mine")
    argv = [a.replace("{file}", str(tmp_path / "a-file")) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "o")]
    assert main([*FAST, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distlr: error:") and "Traceback" not in err
    for word in words:
        assert word in err


def test_a_rank_that_raises_ends_the_job_promptly_and_its_traceback_reaches_torchruns_summary(tmp_path):
    # Rank 1's model raises at its third forward; rank 0 must not hang (the harness timeout is
    # 90 s against a job of a few seconds).
    from helpers import torchrun

    job = torchrun(["-m", "distlr", "--model", "cli_factories:crashing_regression", "--data",
                    "cli_factories:regression_set", "--num-steps", "10", "--no-progress",
                    "--output-dir", str(tmp_path / "run")], nproc=2, timeout=90,
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    assert job.returncode not in (0, -9), job.explain()
    # torch elastic's @record wrote the rank's error file: the summary names the exception. It is
    # the "Root Cause" or one of the other "Failures", whichever rank torchrun saw fail first:
    # rank 0's collective fails within milliseconds of rank 1's raise, so either can be first.
    summary = job.output[job.output.index("distlr FAILED"):]
    raised = [block for block in summary.split("\n  rank      : ") if block.startswith("1 (local_rank: 1)")]
    assert raised and "ZeroDivisionError: a bug in the model" in raised[0], job.explain()
    assert "error_file: <N/A>" not in raised[0], job.explain()


def test_help_lists_every_find_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--min-lr", "--max-lr", "--num-steps", "--smooth-factor", "--divergence-threshold",
                 "--suggestion-method", "--config", "--output-dir", "--seed", "--optimizer", "--batch-size"):
        assert flag in text
    assert "Weight on history" in text


def test_text_files_are_tokenized_and_packed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    assert main([*FAST, "--data", str(corpus), "--output-dir", str(out)]) == 0
    assert LRFinderResult.from_json((out / "result.json").read_text()).steps_run >= 2


def test_the_cli_writes_the_result_the_api_returns_field_by_field(tmp_path):
    """One writer: result.json is ``result.to_dict()`` of the same run through the API, plus
    the command line's own key."""
    from distlr import LRFinder
    from distlr.cli.build import build, build_dataloader, build_trainable, seed_everything
    from distlr.cli.parse import parse_cli

    argv = ["--num-steps", "30", "--batch-size", "8", "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    cli = written.pop("cli")
    assert cli["inputs"]["source"].startswith("demo text") and isinstance(cli["notes"], list)

    cfg = parse_cli(argv)
    seed_everything(cfg.seed)
    built = build(cfg.model, seq_len=cfg.seq_len)
    loader, _ = build_dataloader(cfg, built)
    optimizer, _ = build_trainable(cfg, built.model)
    with LRFinder(built.model, loader, optimizer, device="cpu", data_seed=cfg.seed) as finder:
        api = finder.find(**cfg.find_args(), progress=False).to_dict()
    assert set(written) == set(api)
    differ = [key for key in api if key != "elapsed_s" and written[key] != api[key]]
    assert differ == [], {key: (written[key], api[key]) for key in differ}
