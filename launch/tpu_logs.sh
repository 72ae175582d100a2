#!/usr/bin/env bash
# Follow the training log on a TPU VM worker (worker 0 by default, or all of them).
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b launch/tpu_logs.sh
#   WORKER=all TPU_NAME=... launch/tpu_logs.sh     # every worker, lines interleaved
#
# Environment:
#   TPU_NAME          (required) name of the TPU VM
#   PROJECT, ZONE     (required) Google Cloud project and zone
#   WORKER            worker index (0, 1, ...) or "all"; default 0 (process 0 logs metrics)
#   TAIL_LINES        lines of history to show first; default 100
#   FOLLOW            1: keep following (tail -F); 0: print and exit; default 1
#   LOG_FILE          log file on each worker, relative to home; default dit_jax_train.log
#   DRY_RUN=1         print the command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME
gcloud_flags
WORKER="${WORKER:-0}"
TAIL_LINES="${TAIL_LINES:-100}"
FOLLOW="${FOLLOW:-1}"
LOG_FILE="${LOG_FILE:-dit_jax_train.log}"
require_bool FOLLOW
if [[ ! "${WORKER}" =~ ^([0-9]+|all)$ ]]; then
  die "WORKER must be a worker index or 'all', got '${WORKER}'"
fi
if [[ ! "${TAIL_LINES}" =~ ^[0-9]+$ ]]; then
  die "TAIL_LINES must be a number, got '${TAIL_LINES}'"
fi

tail_cmd="tail -n ${TAIL_LINES}"
[[ "${FOLLOW}" == 1 ]] && tail_cmd+=" -F"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker="${WORKER}" "${GCLOUD_FLAGS[@]}" \
  --command="${tail_cmd} \$HOME/$(quote_args "${LOG_FILE}")"
