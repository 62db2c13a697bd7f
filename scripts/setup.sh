#!/usr/bin/env bash
# Make .venv (if it is missing) and install distlr into it with its dev, deepspeed, accelerate
# and data extras; DISTLR_EXTRAS names others (scripts/test.sh adds trackers).
# torch is pinned through constraints.txt to the CPU wheel this machine carries; without the pin
# pip would pull the newest CUDA build (several GB). Re-running is cheap: the install is skipped
# while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DISTLR_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
extras="${DISTLR_EXTRAS:-dev,deepspeed,accelerate,data}"
stamp="$venv/.distlr-install-stamp"
want="$( (cat pyproject.toml constraints.txt; echo "$extras") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing distlr and its dependencies into $venv (about a minute the first time)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c constraints.txt "torch==2.13.0" -e ".[$extras]" 2> >(grep -v "^WARNING: Location" >&2)
    echo "$want" > "$stamp"
fi
