#!/usr/bin/env bash
# Run one colorjax command on every host of a Cloud TPU pod slice (multi-host: each host runs the same command;
# jax.distributed.initialize() finds the pod from the TPU environment).
#
#   TPU=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh --config configs/pretrain.py:150m \
#       --config.data.train_store=gs://bucket/stores/c4 --config.workdir=gs://bucket/runs/prior
#
# First time: launch/tpu_pod.sh --setup   (clones nothing; copies this checkout and installs jax[tpu] + pins)
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
REPO_DIR="${REPO_DIR:-colorjax}"
if [[ "${1:-}" == "--setup" ]]; then
  gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$(dirname "$0")/.." "$TPU:$REPO_DIR"
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "cd $REPO_DIR && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==0.10.2'"
  exit 0
fi
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && python3 -m colorjax.main$args"
