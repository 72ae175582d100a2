#!/usr/bin/env bash
# Create a Cloud TPU VM: a single host (v4-8, v5litepod-8, v6e-8) or a pod slice (v4-32,
# v5p-64, v5litepod-16, ...).
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_create.sh
#
# Environment:
#   TPU_NAME          (required) name of the TPU VM
#   PROJECT, ZONE     (required) Google Cloud project and zone
#   ACCELERATOR_TYPE  (required) e.g. v4-8, v4-32, v5litepod-8, v5p-64, v6e-16
#   RUNTIME_VERSION   TPU VM software version; default by generation: tpu-ubuntu2204-base
#                     (v2-v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
#                     v2-alpha-tpuv6e (v6e)
#   SPOT=1            Spot VM (cheaper, preemptible at any time; pair with tpu_watch.sh)
#   PREEMPTIBLE=1     legacy preemptible VM (tpu-vm create only; exclusive with SPOT)
#   QUEUED=1          request the TPU as a queued resource (waits in the queue until capacity
#                     exists, then this script waits for the node to be READY)
#   QUEUED_RESOURCE   queued resource id (QUEUED=1); default: $TPU_NAME
#   POLL_SECONDS      seconds between state checks while waiting (QUEUED=1); default 60
#   CREATE_FLAGS      extra gcloud flags, space separated (e.g. "--network=my-net")
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME ACCELERATOR_TYPE
gcloud_flags
tpu_size "${ACCELERATOR_TYPE}" >/dev/null
RUNTIME_VERSION="${RUNTIME_VERSION:-$(tpu_default_runtime_version "${ACCELERATOR_TYPE}")}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}}"
POLL_SECONDS="${POLL_SECONDS:-60}"
require_bool SPOT
require_bool PREEMPTIBLE
require_bool QUEUED
if [[ "${SPOT}" == 1 && "${PREEMPTIBLE}" == 1 ]]; then
  die "SPOT=1 and PREEMPTIBLE=1 are exclusive; choose one (Spot is the current offering)"
fi
if [[ "${QUEUED}" == 1 && "${PREEMPTIBLE}" == 1 ]]; then
  die "PREEMPTIBLE=1 is not available for queued resources (QUEUED=1); use SPOT=1"
fi

provisioning=()
[[ "${SPOT}" == 1 ]] && provisioning+=(--spot)
[[ "${PREEMPTIBLE}" == 1 ]] && provisioning+=(--preemptible)
# Deliberately word-split: a list of flags.
# shellcheck disable=SC2206
extra=(${CREATE_FLAGS:-})

if [[ "${QUEUED}" == 1 ]]; then
  run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE}" \
    --node-id="${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" \
    ${provisioning[@]+"${provisioning[@]}"} ${extra[@]+"${extra[@]}"}
  describe=(gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE}"
            "${GCLOUD_FLAGS[@]}" "--format=value(state.state)")
  if is_dry_run; then
    run "${describe[@]}"
    exit 0
  fi
  while true; do
    state="$("${describe[@]}")"
    case "${state}" in
      ACTIVE) log "queued resource ${QUEUED_RESOURCE} is ACTIVE: ${TPU_NAME} is ready"; break ;;
      FAILED|SUSPENDED) die "queued resource ${QUEUED_RESOURCE} is ${state}" ;;
      *) log "queued resource ${QUEUED_RESOURCE} is ${state:-unknown}; next check in ${POLL_SECONDS}s"
         sleep "${POLL_SECONDS}" ;;
    esac
  done
else
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" \
    ${provisioning[@]+"${provisioning[@]}"} ${extra[@]+"${extra[@]}"}
fi
