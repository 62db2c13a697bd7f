"""Command-line parsing: ``RunConfig`` fields become flags; defaults < --config YAML < flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from distlr.args import SweepArgs
from distlr.choices import closest
from distlr.config import BUILTIN_MODELS, RunConfig, field_defaults, field_docs, field_types, load_yaml

DESCRIPTION = """\
LR range test that runs where training runs. With no arguments: the built-in demo (a tiny GPT on
Python's own documentation, CPU, well under a minute). Writes result.json, lr_finder.png and the
resolved config.yaml to --output-dir (default: a new folder under ./distlr-runs)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distlr", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of the keys below (flags override it)")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    docs = {**field_docs(SweepArgs), **field_docs(RunConfig)}
    defaults = field_defaults()
    for name, tp in field_types().items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        doc = docs.get(name, "")
        help_text = doc if "default" in doc else f"{doc} (default: {defaults[name]})"
        if tp is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, metavar="VALUE", default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_cli(argv: list[str] | None = None) -> RunConfig:
    """The run's config from the command line (and the YAML file it names).

    Raises:
        ValueError: an unknown flag or key (with the closest valid name), or a bad value.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        names = [opt for action in parser._actions for opt in action.option_strings]
        typed = flag.split("=")[0]
        starting = sorted({n for n in names if n.startswith(typed) and "_" not in n})
        close = " or ".join(starting) if starting else closest(typed, names)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown argument {flag!r}{hint} (see distlr --help)")
    values = vars(args)
    config_file = values.pop("config", None)
    values.pop("local_rank", None)
    merged = _paths_from(Path(config_file), load_yaml(config_file)) if config_file else {}
    merged.update(values)
    return RunConfig.from_dict(merged, source=f"--config {config_file}" if config_file else "arguments")


def config_file(argv: list[str] | None = None) -> Path | None:
    """The ``--config`` file ``argv`` names, if any (so that it is never written over)."""
    args, _ = build_parser().parse_known_args(argv)
    return None if args.config is None else Path(args.config)


def _paths_from(path: Path, data: dict) -> dict:
    """A YAML file's own paths (``model``, ``data``, ``deepspeed``) are relative to the file, so
    that a config runs from any working directory; built-in names and factories stay as they are."""
    base = path.resolve().parent
    out = dict(data)
    for key in ("model", "data", "deepspeed"):
        value = out.get(key)
        if not isinstance(value, str) or value in BUILTIN_MODELS or value == "demo":
            continue
        if ":" in value and not (base / value).exists() and "/" not in value.split(":")[0]:
            continue  # a package.module:function factory
        parts = value.split(",") if key == "data" else [value]
        out[key] = ",".join(p if Path(p.strip()).is_absolute() else str(base / p.strip()) for p in parts if p.strip())
    return out
