#!/usr/bin/env bash
# Set up and start OpenConsult on the embedded default: SQLite under ./data,
# one node, the demo page at http://127.0.0.1:8080/. Extra arguments go to
# `openconsult serve` (e.g. --port 9000, --config deploy/openconsult.sample.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "OpenConsult needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { echo "python3 -m venv failed: install the python3-venv package" >&2; exit 1; }
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.openconsult-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
  touch "$stamp"
fi
exec .venv/bin/openconsult serve "$@"
