#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all local GPUs per process.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh --config configs/train_tiny.py --set mesh.fsdp=-1
#
# The first node of the allocation is the coordinator; each task gets its process id from
# SLURM_PROCID. `jaxvlm train` calls jax.distributed.initialize() with these when
# JAX_NUM_PROCESSES > 1. For multi-node meshes set e.g. --set mesh.dcn_data=$SLURM_NNODES so the
# data axis spans nodes (DCN) and fsdp/tensor stay inside a node (NVLink).
#SBATCH --job-name=jaxvlm-train
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
PORT="${JAX_COORDINATOR_PORT:-12355}"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="$HEAD:$PORT"
export JAX_NUM_PROCESSES="${SLURM_NNODES:-1}"
cd "$REPO"
# shellcheck disable=SC1091
source .venv/bin/activate
# JAX_PROCESS_ID must be read inside each task (srun sets SLURM_PROCID per task).
srun --ntasks-per-node=1 bash -c 'JAX_PROCESS_ID=$SLURM_PROCID exec python -m jaxvlm.cli train "$@"' _ "$@"
