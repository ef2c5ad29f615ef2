#!/usr/bin/env bash
# Set up the environment if needed, then run the built-in demo (extra arguments go to `ntkscope run`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ntkscope run "$@"
