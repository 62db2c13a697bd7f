"""Every shipped config loads and validates (a typo in one fails here, not on a cluster)."""

from pathlib import Path

import pytest

from distlr.cli.parse import parse_cli

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid_and_says_how_to_run_it(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and "distlr" in header
    # The command in the header runs this very file (a renamed config would keep a stale one).
    assert f"--config configs/{path.name}" in header
    parse_cli(["--config", str(path)])  # raises on any bad key or value
