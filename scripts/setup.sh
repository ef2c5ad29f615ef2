#!/usr/bin/env bash
# Create .venv with ntkscope, every optional extra (the demo and the tests use them all) and the test
# tools, torch pinned (idempotent, quiet when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.ntkscope-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all,test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import torch, ntkscope, typer, rich, matplotlib, sklearn, mnist1d; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch "$stamp"
