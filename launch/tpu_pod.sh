#!/usr/bin/env bash
# Run a jaxvlm command on every worker of a TPU VM slice (`jaxvlm train` by default).
#
#   launch/tpu_pod.sh <tpu-name> <zone> [--project P] -- --config configs/train_tiny.py --set mesh.fsdp=-1
#
# Training: every worker runs the identical command; jax.distributed.initialize() (called by `jaxvlm train`
# when TPU_WORKER_HOSTNAMES lists more than one host) finds the coordinator from the TPU metadata.
#
# JAXVLM_COMMAND=generate splits a decode over the workers instead: worker K of N runs
# `jaxvlm generate ... --shard K/N` on its own chips, writing its own --output with '.shardK-of-N' before the
# suffix (`jaxvlm eval --predictions answers.shard*.jsonl` scores them together). N is WORKERS, else the
# slice's network endpoints (gcloud compute tpus tpu-vm describe):
#
#   JAXVLM_COMMAND=generate launch/tpu_pod.sh my-v5p-32 us-east5-a -- --checkpoint ckpt/llava-7b \
#       --questions pope.jsonl --image-folder val2014/ --output answers.jsonl --resume
#
# Assumes the repo is at the same path on every worker (REPO, default: this checkout's path) with its
# venv at $REPO/.venv; sync it first, e.g. with `gcloud compute tpus tpu-vm scp --worker=all`.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 <tpu-name> <zone> [--project P] -- <jaxvlm command args>" >&2
  exit 2
fi
TPU="$1"; ZONE="$2"; shift 2
EXTRA=()
while [[ $# -gt 0 && "$1" != "--" ]]; do EXTRA+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
LOG_DIR="${LOG_DIR:-$REPO}"      # each worker appends to <command>_<hostname>.log there
COMMAND="${JAXVLM_COMMAND:-train}"
ARGS=$(printf '%q ' "$@")
if [[ "$COMMAND" != "generate" ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${EXTRA[@]}" --worker=all --command \
    "set -o pipefail; cd $REPO && source .venv/bin/activate && python -m jaxvlm.cli $COMMAND $ARGS 2>&1 | tee -a $LOG_DIR/${COMMAND}_\$(hostname).log"
  exit
fi
WORKERS="${WORKERS:-$(gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" "${EXTRA[@]}" \
  --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .)}"
if [[ ! "$WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: cannot tell how many workers $TPU has (got '$WORKERS'); set WORKERS=N" >&2
  exit 2
fi
pids=()
for ((k = 0; k < WORKERS; k++)); do
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${EXTRA[@]}" --worker="$k" --command \
    "set -o pipefail; cd $REPO && source .venv/bin/activate && JAX_PROCESS_ID=$k JAX_NUM_PROCESSES=$WORKERS python -m jaxvlm.cli generate $ARGS --shard auto 2>&1 | tee -a $LOG_DIR/generate_\$(hostname)_$k.log" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
