#!/usr/bin/env bash
# The suggestion benchmark from a fresh clone: set up .venv, add its one extra (scikit-learn's
# bundled datasets), then run. Arguments go to run.py (e.g. --only-score, --tasks a,b, --quick).
#   bash benchmarks/suggestion/run.sh             # ~45 min on 2 cores cold, seconds when cached
#   bash benchmarks/suggestion/run.sh --quick     # one task per family, ~12 min cold
#   bash benchmarks/suggestion/run.sh tune        # only re-choose the constants (tune.py, no training)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
py="${DISTLR_VENV:-.venv}/bin/python"
"$py" -c "import sklearn" 2>/dev/null || "$py" -m pip install --quiet --disable-pip-version-check -c constraints.txt \
    -e ".[bench]" 2> >(grep -v "^WARNING: Location" >&2)
if [ "${1:-}" = "tune" ]; then
    shift
    exec "$py" benchmarks/suggestion/tune.py "$@"
fi
exec "$py" benchmarks/suggestion/run.py "$@"
