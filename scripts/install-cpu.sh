#!/usr/bin/env bash
# Create .venv (if missing) and install the project with CPU pins. Idempotent and quiet when
# nothing changed. Usage: bash scripts/install-cpu.sh [extra ...]   e.g. `test`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extras="test${1:+,$1}"
stamp=.venv/.installed-$(cat setup.py requirements/cpu.txt | sha1sum | cut -c1-12)-${extras//,/_}
if [ ! -f "$stamp" ]; then
  echo "installing qwen_merge_mcore[$extras] into .venv (CPU pins from requirements/cpu.txt)..."
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -c requirements/cpu.txt -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, megatron.core, transformers, nvidia.dali" # fail loudly if something is missing
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# `qmm data render` draws CJK questions and needs a CJK font (Debian: fonts-noto-cjk).
if ! ls /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq fonts-noto-cjk >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
      apt-get install -y -qq fonts-noto-cjk >/dev/null 2>&1; }) \
      || echo "note: could not install fonts-noto-cjk; \`qmm data render\` needs --font for CJK text"
  else
    echo "note: no CJK font; install fonts-noto-cjk (or pass --font) to render CJK questions"
  fi
fi
