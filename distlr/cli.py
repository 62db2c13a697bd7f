"""Command-line parsing: ``RunConfig`` fields become flags; defaults < --config YAML < flags."""

from __future__ import annotations

import argparse

from distlr.args import SweepArgs
from distlr.choices import closest
from distlr.config import RunConfig, field_defaults, field_docs, field_types, load_yaml

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
        help_text = f"{docs.get(name, '')} (default: {defaults[name]})"
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
        close = closest(flag.split("=")[0], names)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown argument {flag!r}{hint} (see distlr --help)")
    values = vars(args)
    config_file = values.pop("config", None)
    values.pop("local_rank", None)
    merged = load_yaml(config_file) if config_file else {}
    merged.update(values)
    return RunConfig.from_dict(merged, source=f"--config {config_file}" if config_file else "arguments")
