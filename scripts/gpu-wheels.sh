#!/usr/bin/env bash
# Download the wheels the GPU check's machine lacks (requirements/gpu-check.txt, at the versions
# requirements/cpu.txt pins) for CPython 3.12 on x86-64 Linux into .whl/ (git-ignored), write
# .whl/MANIFEST (sha256 and size of each) and print the list with sizes. Needs PyPI, no GPU.
# Then carry .whl with the checkout and run scripts/gpu-check.sh there (docs/gpu-check.md).
#   bash scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
dest=.whl
tmp=$(mktemp -d .whl.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
# --no-deps: their own requirements are on the target image (the list below prints them).
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" \
  -c requirements/cpu.txt -r requirements/gpu-check.txt -d "$tmp" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$PY" scripts/wheelset.py write "$tmp" --name gpu-wheels
rm -rf "$dest"
chmod 755 "$tmp"
mv "$tmp" "$dest"
trap - EXIT
echo "gpu-wheels: $dest/ ready; carry it to the GPU machine with the checkout (docs/gpu-check.md)"
