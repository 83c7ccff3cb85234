# Shared by the sbatch scripts (sourced; not submitted itself). Everything is set through
# environment variables, with defaults for a GPU cluster:
#
#   CONFIG       stage YAML                         (default launch/<stage>.yaml)
#   SAVE_DIR     this stage's run folder            (default: checkpoint.save of the YAML)
#   PRETRAINED   weights to start from              (default: checkpoint.pretrained of the YAML)
#   OVERRIDES    extra dotted overrides, space separated, e.g. "train.lr=1e-5 model.preset=qwen-merge-72bvit-32b"
#   PYTHON       interpreter with qwen_merge_mcore installed (default: python)
#   MASTER_PORT  rendezvous port (default: derived from the job id)
#
# Node and task counts are sbatch's: `sbatch --nodes=16 slurm/stage3.sbatch`; one task per GPU.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-python}

# --- cluster settings ----------------------------------------------------------------------
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=false
# Megatron's TP communication overlap needs kernels queued in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Report NCCL errors instead of hanging on a dead peer.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand: set NCCL_IB_HCA / NCCL_SOCKET_IFNAME for your fabric (see docs/training.md).
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# --- the run --------------------------------------------------------------------------------
EXIT_INTERRUPTED=75  # qmm train: stopped on a signal after writing a checkpoint

run_stage() {  # run_stage <stage>
  local config=${CONFIG:-launch/$1.yaml}
  local args=(train --config "$config")
  [ -n "${SAVE_DIR:-}" ] && args+=("checkpoint.save=$SAVE_DIR")
  [ -n "${PRETRAINED:-}" ] && args+=("checkpoint.pretrained=$PRETRAINED")
  # shellcheck disable=SC2206  # word splitting of OVERRIDES is intended
  args+=(${OVERRIDES:-})
  echo "[$(date -u +%FT%TZ)] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-1} node(s), ${SLURM_NTASKS:-1} task(s): qmm ${args[*]}"

  # Slurm signals the batch shell (`--signal=B:USR1@...`) before the time limit; pass it to the
  # tasks, which checkpoint and exit, then requeue. SIGTERM (preemption, scancel) is forwarded
  # too; a preempting Slurm requeues the job itself (`--requeue`).
  # --wait: once one task has exited, the others get that long before being killed (a crashed
  # rank does not leave the rest hanging; after a signal every rank exits with 75 together).
  local requeue=0
  srun --wait=120 "$PYTHON" -m qwen_merge_mcore "${args[@]}" &
  local srun_pid=$!
  trap 'echo "time limit near: checkpoint and requeue"; requeue=1; kill -USR1 $srun_pid' USR1
  trap 'echo "SIGTERM: checkpoint and stop"; kill -TERM $srun_pid' TERM
  local rc=0
  while true; do  # `wait` returns early when a trapped signal arrives
    wait "$srun_pid" && rc=0 || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  echo "[$(date -u +%FT%TZ)] training exited with $rc"
  if [ "$rc" -eq "$EXIT_INTERRUPTED" ] && [ "$requeue" -eq 1 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$rc"
}
