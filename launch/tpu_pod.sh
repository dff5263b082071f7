#!/usr/bin/env bash
# Run the same `jaxvlm train` command on every worker of a TPU VM slice.
#
#   launch/tpu_pod.sh <tpu-name> <zone> [--project P] -- --config configs/train_tiny.py --set mesh.fsdp=-1
#
# Every worker runs the identical command; jax.distributed.initialize() (called by `jaxvlm train`
# when TPU_WORKER_HOSTNAMES lists more than one host) finds the coordinator from the TPU metadata.
# Assumes the repo is at the same path on every worker (REPO, default: this checkout's path) with its
# venv at $REPO/.venv; sync it first, e.g. with `gcloud compute tpus tpu-vm scp --worker=all`.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 <tpu-name> <zone> [--project P] -- <jaxvlm train args>" >&2
  exit 2
fi
TPU="$1"; ZONE="$2"; shift 2
EXTRA=()
while [[ $# -gt 0 && "$1" != "--" ]]; do EXTRA+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
REPO="${REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${EXTRA[@]}" --worker=all --command \
  "cd $REPO && source .venv/bin/activate && python -m jaxvlm.cli train $ARGS 2>&1 | tee -a train_\$(hostname).log"
