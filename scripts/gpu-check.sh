#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md), on one CUDA GPU in about 8 minutes: installs the wheels of
# scripts/gpu-wheels.sh into a private folder, runs the `gpu` tests that need no Transformer Engine
# (the GPU engine: Megatron-Core DDP, distributed optimizer, schedule, save and resume, GPU engine
# == CPU engine), then bench/bench_gpu.py (tokens/s, TFLOP/s, MFU, memory vs the planner).
# Writes gpu-check.log, pytest.log and bench_gpu.json under --out.
#   bash scripts/gpu-check.sh --out "$OUT"    # on the GPU machine, .whl/ carried with the checkout
#   bash scripts/gpu-check.sh --dry-run       # on a CPU machine first: every step validated
# --dry-run: the wheels are present and intact, the GPU path imports with the packages the GPU
# machine lacks blocked (scripts/gpu_image), the test selection is not empty, the benchmark runs
# its code path on CPU, and the device command in docs/gpu-check.md fits 2,000 characters.
# Time limits (seconds): QMM_GPU_TEST_SECONDS (300), QMM_GPU_BENCH_SECONDS (150).
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0 out=gpu-check-out
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
wheels=${QMM_WHEELS:-.whl}
markers="gpu and not te"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ $dry = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "== gpu-check: $*"; }
quiet() { grep -v "UserWarning\|warnings.warn" || true; }  # Megatron's "no TE/Apex" notes

check() {
  set -e  # also inside the pipeline below
  say "wheels ($wheels)"
  "$PY" scripts/wheelset.py verify "$wheels" --name gpu-check
  if [ $dry = 1 ]; then
    # This machine's full install stands in, with what the GPU machine lacks made unimportable.
    export PYTHONPATH="$PWD/scripts/gpu_image:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    site=${TMPDIR:-/tmp}/qmm-gpu-check-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  say "what the GPU path imports"
  "$PY" scripts/wheelset.py installed "$wheels" --name gpu-check $([ $dry = 1 ] || echo --cuda) 2>&1 | quiet

  if [ $dry = 1 ]; then
    say "tests selected by -m \"$markers\""
    "$PY" -m pytest --collect-only -q -p no:randomly -m "$markers" tests >"$out/collect.txt" 2>&1 \
      || { tail -20 "$out/collect.txt"; echo "gpu-check: the GPU tests do not collect" >&2; return 1; }
    grep "^tests/.*::" "$out/collect.txt" || { echo "gpu-check: -m \"$markers\" selects no test" >&2; return 1; }
    grep "^NOT RUN" "$out/collect.txt" || true
    say "the benchmark's code path (bench/bench_gpu.py --device cpu --tiny)"
    "$PY" bench/bench_gpu.py --device cpu --tiny --out "$out/bench_gpu_cpu.json" 2>&1 | quiet
    say "the device command in docs/gpu-check.md"
    command=$(sed -n '/<!-- device command/,/^```$/{/^bash /p}' docs/gpu-check.md)
    [ -n "$command" ] || { echo "gpu-check: docs/gpu-check.md holds no device command" >&2; return 1; }
    [ ${#command} -le 2000 ] || { echo "gpu-check: the device command is ${#command} > 2000 characters" >&2; return 1; }
    echo "${#command} characters: $command"
    say "dry run passed"
    return 0
  fi

  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  local tests=0 bench=0
  say "tests: -m \"$markers\" (at most ${QMM_GPU_TEST_SECONDS:-300} s)"
  # A module that fails to collect here (another library version) must not stop the GPU tests.
  timeout -k 10 "${QMM_GPU_TEST_SECONDS:-300}" "$PY" -m pytest -q -rap -p no:randomly -m "$markers" \
    --continue-on-collection-errors --timeout=240 tests 2>&1 | tee "$out/pytest.log" || tests=$?
  say "bench/bench_gpu.py (at most ${QMM_GPU_BENCH_SECONDS:-150} s)"
  timeout -k 10 "${QMM_GPU_BENCH_SECONDS:-150}" "$PY" bench/bench_gpu.py --out "$out/bench_gpu.json" || bench=$?
  passed=$(grep -c "^PASSED " "$out/pytest.log" || true)
  [ "$passed" -gt 0 ] || [ "$tests" != 0 ] || tests="no test passed"  # a check that passed none proves nothing
  say "tests $([ "$tests" = 0 ] && echo "passed ($passed)" || echo "FAILED ($tests)"), benchmark \
$([ $bench = 0 ] && echo done || echo "FAILED (exit $bench)") in ${SECONDS} s; files in $out: $(ls "$out" | tr '\n' ' ')"
  [ "$tests" = 0 ] && [ $bench = 0 ]
}

mkdir -p "$out"
set +e
check 2>&1 | tee "$out/gpu-check.log"
status=${PIPESTATUS[0]}
exit "$status"
