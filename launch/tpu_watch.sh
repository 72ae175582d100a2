#!/usr/bin/env bash
# Keep a Spot/preemptible TPU VM training: restart it after preemption.
#
# Every POLL_SECONDS, read the TPU's state
#   gcloud compute tpus tpu-vm describe $TPU_NAME --format='value(state)'
# (with QUEUED=1: the queued resource's state.state). When it is PREEMPTED or TERMINATED
# (queued: SUSPENDED or FAILED), delete the TPU, re-create it (tpu_create.sh), re-install
# (tpu_install.sh) and re-start training (tpu_train.sh); dit_jax.main resumes from the
# latest checkpoint in WORKDIR. Gives up after MAX_RESTARTS restarts. It never stops by
# itself otherwise: interrupt it (Ctrl-C) once training has finished. Run it somewhere that
# outlives your laptop session (tmux/screen on a small VM, or nohup).
# A training process that dies on a healthy TPU is not restarted: that is a bug to read
# in the logs (tpu_logs.sh), not a preemption.
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 SPOT=1 \
#     WORKDIR=gs://my-bucket/runs/dit-xl-2 launch/tpu_watch.sh
#
# Environment: everything tpu_create.sh, tpu_install.sh and tpu_train.sh read (they are
# called with this environment), and
#   MAX_RESTARTS      restarts before giving up; default 20
#   POLL_SECONDS      seconds between state checks; default 300
#   DRY_RUN=1         print one iteration's commands and exit, without looping; the state
#                     is FAKE_STATE (default READY), e.g. FAKE_STATE=PREEMPTED shows a restart
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME ACCELERATOR_TYPE WORKDIR
gcloud_flags
MAX_RESTARTS="${MAX_RESTARTS:-20}"
POLL_SECONDS="${POLL_SECONDS:-300}"
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}}"
require_bool QUEUED
if [[ ! "${MAX_RESTARTS}" =~ ^[0-9]+$ ]]; then
  die "MAX_RESTARTS must be a non-negative integer, got '${MAX_RESTARTS}'"
fi
if [[ ! "${POLL_SECONDS}" =~ ^[0-9]+$ ]]; then
  die "POLL_SECONDS must be a non-negative integer, got '${POLL_SECONDS}'"
fi
if [[ -n "${FAKE_STATE:-}" ]] && ! is_dry_run; then
  die "FAKE_STATE='${FAKE_STATE}' is only for DRY_RUN=1 (it would delete a healthy TPU)"
fi
# Check before the first restart, not after deleting the TPU.
if tpu_is_multi_host "${ACCELERATOR_TYPE}" && [[ "${WORKDIR}" != gs://* ]]; then
  die "WORKDIR='${WORKDIR}' must be a gs:// path on a multi-host TPU (ACCELERATOR_TYPE=${ACCELERATOR_TYPE})"
fi

if [[ "${QUEUED}" == 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE}"
            "${GCLOUD_FLAGS[@]}" "--format=value(state.state)")
  delete=(gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE}"
          "${GCLOUD_FLAGS[@]}" --force --quiet)
  restart_states=" SUSPENDED FAILED PREEMPTED TERMINATED "
else
  describe=(gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}"
            "--format=value(state)")
  delete=(gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --quiet)
  restart_states=" PREEMPTED TERMINATED "
fi

# One restart; nonzero when a step failed. Called in an `if`, where set -e is off, hence &&.
restart_once() {
  run "${delete[@]}" || log "delete failed; going on (the TPU may already be gone)"
  "${LAUNCH_DIR}/tpu_create.sh" && "${LAUNCH_DIR}/tpu_install.sh" && "${LAUNCH_DIR}/tpu_train.sh"
}

restarts=0
pending=0  # 1 after a failed restart: retry it whatever describe says (the TPU may be gone).
while true; do
  if is_dry_run; then
    run "${describe[@]}"
    state="${FAKE_STATE:-READY}"
  elif ! state="$("${describe[@]}")"; then
    # A failed describe is most often a transient API or network error: look again later.
    log "could not read the state of ${TPU_NAME}; next check in ${POLL_SECONDS}s"
    state=""
  fi

  if [[ -n "${state}" && "${restart_states}" == *" ${state} "* ]]; then
    pending=1
  elif [[ -n "${state}" && "${pending}" == 0 ]]; then
    log "${TPU_NAME} is ${state:-unknown}"
  fi
  if [[ "${pending}" == 1 ]]; then
    if (( restarts >= MAX_RESTARTS )); then
      die "${TPU_NAME} is ${state:-unknown} and MAX_RESTARTS=${MAX_RESTARTS} restarts are used up"
    fi
    restarts=$((restarts + 1))
    log "${TPU_NAME} is ${state:-unknown}: restart ${restarts}/${MAX_RESTARTS}"
    if restart_once; then
      pending=0
      log "restart ${restarts} done: training resumes from the latest checkpoint in ${WORKDIR}"
    else
      log "restart ${restarts} failed; trying again in ${POLL_SECONDS}s"
    fi
  fi

  if is_dry_run; then
    log "dry run: stopping after one iteration"
    exit 0
  fi
  sleep "${POLL_SECONDS}"
done
