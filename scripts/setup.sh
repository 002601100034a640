#!/usr/bin/env bash
# Create .venv with every pinned dependency (idempotent; about 2-3 minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24" >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
# img2dataset pulls in the old `dataclasses` backport, which shadows the standard library and
# breaks Prefect's local server; the standard library's own module is the one to use.
.venv/bin/python -m pip uninstall -y -q dataclasses 2>/dev/null || true
.venv/bin/python -c "import dataclasses, sys; assert 'site-packages' not in dataclasses.__file__, dataclasses.__file__"
echo "rs5m-curator installed in .venv ($(.venv/bin/python --version))"
