#!/usr/bin/env bash
# Install Slurm (Debian's slurm-wlm) for tests/train/test_slurm.py, which starts a one-node
# cluster of its own from it. Idempotent; needs root and apt-get when Slurm is missing.
# Usage: bash scripts/install-slurm.sh      (scripts/test.sh runs it; QMM_SKIP_SLURM=1 skips it there)
set -euo pipefail
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
missing=()
for exe in slurmctld slurmd sbatch scontrol squeue; do have "$exe" || missing+=("$exe"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: Slurm (${missing[*]}) is not installed, and installing slurm-wlm needs root and apt-get;" \
       "install it (apt-get install slurm-wlm) or set QMM_SKIP_SLURM=1" >&2
  exit 1
fi
echo "installing slurm-wlm with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq slurm-wlm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq slurm-wlm >/dev/null; }
for exe in "${missing[@]}"; do
  have "$exe" || { echo "error: slurm-wlm installed but $exe is still missing" >&2; exit 1; }
done
