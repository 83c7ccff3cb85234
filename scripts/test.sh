#!/usr/bin/env bash
# Install (CPU pins) and run the test suite. Extra arguments go to pytest, e.g. `-k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh
exec .venv/bin/python -m pytest "$@"
