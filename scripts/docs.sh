#!/usr/bin/env bash
# Build the documentation site into site/ with warnings as errors (tutorials are executed).
# Sets up .venv if needed (the `test` extra includes the `docs` extra); extra arguments go to
# `mkdocs build`, e.g. `bash scripts/docs.sh -d /tmp/site`.  Open site/index.html afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python, markdown_exec" 2>/dev/null; then
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[docs]' 2>&1 | grep -v '^WARNING: Location' || true
fi
# one torch thread: the tutorials are small, and on a loaded 2-core machine two threads spin
# against each other (a 150-step training loop took 17x longer with two)
export MPLBACKEND=Agg NO_MKDOCS_2_WARNING=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/mkdocs build --strict "$@"
