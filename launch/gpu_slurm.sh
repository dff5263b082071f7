#!/usr/bin/env bash
# Multi-node GPU jobs under SLURM (training by default): one process per node, all local GPUs per process.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh --config configs/train_tiny.py --set mesh.fsdp=-1
#
# JAXVLM_COMMAND picks another subcommand, e.g. decoding a question file split over the nodes (each node
# answers its shard on its own GPUs and writes answers.shardK-of-N.jsonl; `jaxvlm eval --predictions
# answers.shard*.jsonl` scores them together):
#
#   JAXVLM_COMMAND=generate sbatch --nodes=4 --gpus-per-node=1 launch/gpu_slurm.sh --checkpoint ckpt/llava-7b \
#       --questions pope.jsonl --image-folder val2014/ --shard auto --output answers.jsonl --resume
#
# The first node of the allocation is the coordinator; each task gets its process id from
# SLURM_PROCID. `jaxvlm train` calls jax.distributed.initialize() with these when
# JAX_NUM_PROCESSES > 1. For multi-node meshes set e.g. --set mesh.dcn_data=$SLURM_NNODES so the
# data axis spans nodes (DCN) and fsdp/tensor stay inside a node (NVLink).
#SBATCH --job-name=jaxvlm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
PORT="${JAX_COORDINATOR_PORT:-12355}"
# sed reads the whole list: `head -n 1` could exit first, and the SIGPIPE would fail the job under pipefail
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export JAX_COORDINATOR_ADDRESS="$HEAD:$PORT"
export JAX_NUM_PROCESSES="${SLURM_NNODES:-1}"
cd "$REPO"
# shellcheck disable=SC1091
source .venv/bin/activate
# JAX_PROCESS_ID must be read inside each task (srun sets SLURM_PROCID per task).
export JAXVLM_COMMAND="${JAXVLM_COMMAND:-train}"
srun --ntasks-per-node=1 bash -c 'JAX_PROCESS_ID=$SLURM_PROCID exec python -m jaxvlm.cli "$JAXVLM_COMMAND" "$@"' _ "$@"
