#!/usr/bin/env bash
# Set up the environment if needed, then lint (ruff), type-check (mypy) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MPLBACKEND=Agg
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
