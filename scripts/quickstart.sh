#!/usr/bin/env bash
# Install (CPU pins) and run the tiny end-to-end job: fixtures -> build -> hf2mcore (TP=2) ->
# stages 1, 2.1, 2.2, 3 -> mcore2hf -> generate. Extra arguments go to `qmm quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh
exec .venv/bin/qmm quickstart --workdir "${WORKDIR:-work/quickstart}" "$@"
