"""Command-line parsing: ``RunConfig`` fields become flags; defaults < what ``accelerate
launch`` set < --config YAML < flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from distlr.cli.config import (ALIASES, BUILTIN_MODELS, RunConfig, base_type, canonical_keys, field_defaults, field_help,
                               field_types, load_yaml)
from distlr.core.options import AMP_MODES, closest

DESCRIPTION = """\
LR range test that runs where training runs. With no arguments: the built-in demo (a tiny GPT on
Python's own documentation, CPU, well under a minute). Writes result.json, lr_finder.png and the
resolved config.yaml to --output-dir (default: a new folder under ./distlr-runs)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, built from the config's fields (``flags`` lists its options)."""
    return _parser_and_flags()[0]


def flags() -> list[str]:
    """Every option the command line takes, as typed (``--min-lr``, ``--min_lr``, ...)."""
    return _parser_and_flags()[1]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (``ValueError``) rather than the usage text
    and ``SystemExit``: the command line says every bad input the same way."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{message} (see distlr --help)")


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class _Switch(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag``, and ``--flag=true|false`` (also yes/no, 1/0, on/off), as
    ``TrainingArguments`` reads a boolean; any other value is refused by name."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.nargs = "?"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        if values is None or option_string is None:
            return super().__call__(parser, namespace, None, option_string)
        word = str(values).strip().lower()
        if option_string.startswith("--no-") or word not in TRUE_WORDS + FALSE_WORDS:
            flag = option_string.replace("--no-", "--", 1)
            raise ValueError(f"{option_string}={values!s}: {self.dest} is a switch; write {flag} or "
                             f"--no-{flag[2:]}, or {flag}=true / {flag}=false")
        setattr(namespace, self.dest, word in TRUE_WORDS)


def _parser_and_flags() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = _Parser(prog="distlr", description=DESCRIPTION, allow_abbrev=False)
    options = ["--config"]
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of the keys below (flags override it)")
    # The deepspeed launcher passes --local_rank; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    docs = field_help()
    defaults = field_defaults()
    for name, tp in field_types().items():
        names = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        doc = docs.get(name, "")
        help_text = doc if "default" in doc else f"{doc} (default: {defaults[name]})"
        if base_type(tp)[0] is bool:
            parser.add_argument(*names, dest=name, action=_Switch,
                                default=argparse.SUPPRESS, help=help_text)
            options += [*names, *(f"--no-{n[2:]}" for n in names)]
        else:
            parser.add_argument(*names, dest=name, metavar="VALUE", default=argparse.SUPPRESS, help=help_text)
            options += names
    for alias, name in ALIASES.items():
        names = [f"--{alias.replace('_', '-')}", f"--{alias}"]
        parser.add_argument(*names, dest=alias, metavar="VALUE", default=argparse.SUPPRESS,
                            help=f"the Hugging Face / Accelerate name of --{name.replace('_', '-')}")
        options += names
    return parser, options


def parse_cli(argv: list[str] | None = None) -> RunConfig:
    """The run's config from the command line (and the YAML file it names).

    Raises:
        ValueError: an unknown flag or key (with the closest valid name), or a bad value.
    """
    return parse_cli_sources(argv)[0]


def parse_cli_sources(argv: list[str] | None = None) -> tuple[RunConfig, dict[str, object]]:
    """``parse_cli``, and the settings it took from ``accelerate launch`` (to say so)."""
    parser, names = _parser_and_flags()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        typed = flag.split("=")[0]
        starting = sorted({n for n in names if n.startswith(typed) and "_" not in n})
        close = " or ".join(starting) if starting else closest(typed, names)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown argument {flag!r}{hint} (see distlr --help)")
    values = vars(args)
    config_file = values.pop("config", None)
    values.pop("local_rank", None)
    values = canonical_keys(values, source="the command line")
    given = {}
    if config_file:
        given = canonical_keys(_paths_from(Path(config_file), load_yaml(config_file)), source=f"--config {config_file}")
    given.update(values)
    launched = from_accelerate_launch(os.environ, given=given.keys())
    merged = {**launched, **given}
    return (RunConfig.from_dict(merged, source=f"--config {config_file}" if config_file else "arguments",
                                flags=values.keys()), launched)


def from_accelerate_launch(env: Mapping[str, str], given: Iterable[str] = ()) -> dict[str, object]:
    """The settings ``accelerate launch`` hands its processes (from its flags or the user's
    ``accelerate config``), as distlr keys: ``--mixed_precision`` is ``amp``, ``--use_deepspeed
    --deepspeed_config_file F`` is ``deepspeed``, ``--use_fsdp`` is ``fsdp``, and
    ``--gradient_accumulation_steps`` is ``accumulation_steps``. Empty outside ``accelerate launch``.
    Keys in ``given`` (set by the YAML file or a flag) are left out, unread.

    Raises:
        ValueError: a setting distlr cannot follow (fp8; DeepSpeed set up from flags alone).
    """
    out: dict[str, object] = {}
    given = set(given)
    precision = env.get("ACCELERATE_MIXED_PRECISION")
    if precision is not None and "amp" not in given:
        if precision.lower() not in AMP_MODES:
            raise ValueError(f"accelerate launch --mixed_precision {precision}: distlr runs "
                             f"{', '.join(AMP_MODES)}; launch with one of those or pass --amp")
        out["amp"] = precision.lower()
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not given & {"deepspeed", "fsdp"}:
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise ValueError("accelerate launch --use_deepspeed without --deepspeed_config_file: distlr builds "
                             "its engine from a DeepSpeed config JSON; pass --deepspeed_config_file FILE "
                             "(or distlr's own --deepspeed FILE)")
        out["deepspeed"] = path
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not given & {"deepspeed", "fsdp"}:
        out["fsdp"] = True
    steps = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps is not None and "accumulation_steps" not in given:
        out["accumulation_steps"] = steps
    return out


def config_file(argv: list[str] | None = None) -> Path | None:
    """The ``--config`` file ``argv`` names, if any (so that it is never written over)."""
    args, _ = build_parser().parse_known_args(argv)
    return None if args.config is None else Path(args.config)


def _paths_from(path: Path, data: dict) -> dict:
    """A YAML file's own paths (``model``, ``data``, ``val_data``, ``deepspeed``) are relative to the file, so
    that a config runs from any working directory; built-in names and factories stay as they are."""
    base = path.resolve().parent
    out = dict(data)
    for key in ("model", "data", "val_data", "deepspeed"):
        value = out.get(key)
        if not isinstance(value, str) or value in BUILTIN_MODELS or value == "demo":
            continue
        if ":" in value and not (base / value).exists() and "/" not in value.split(":")[0]:
            continue  # a package.module:function factory
        parts = value.split(",") if key in ("data", "val_data") else [value]
        out[key] = ",".join(p if Path(p.strip()).is_absolute() else str(base / p.strip()) for p in parts if p.strip())
    return out
