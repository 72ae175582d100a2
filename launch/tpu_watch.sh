#!/usr/bin/env bash
# Keep a Spot/preemptible TPU VM training: restart it after preemption or a crash.
#
# Every POLL_SECONDS, read the TPU's state
#   gcloud compute tpus tpu-vm describe $TPU_NAME --format='value(state)'
# (with QUEUED=1: the queued resource's state.state). When it is PREEMPTED or TERMINATED
# (queued: SUSPENDED or FAILED), delete the TPU, re-create it (tpu_create.sh), re-install
# (tpu_install.sh) and re-start training (tpu_train.sh); dit_jax.main resumes from the
# latest checkpoint in WORKDIR. Gives up after MAX_RESTARTS restarts.
# When the TPU is READY, ask every worker about its training process (the PID_FILE and
# EXIT_FILE that tpu_train.sh keeps): all alive -> nothing to do; all ended with status 0 ->
# training finished (or was stopped on purpose, `kill` = SIGTERM: dit_jax.main then saves and
# exits 0), the watch exits 0; any worker ended with another status, or died without one ->
# a crash: kill what is left of the run (SIGKILL: the other workers wait in a collective
# forever) and start training again (tpu_train.sh; it resumes). After MAX_CRASHES crashes in
# a row (a run seen alive at two polls in a row resets the count) the watch gives up: read
# the logs (tpu_logs.sh WORKER=all). Run it somewhere that outlives your laptop session
# (tmux/screen on a small VM, or nohup).
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 SPOT=1 \
#     WORKDIR=gs://my-bucket/runs/dit-xl-2 launch/tpu_watch.sh
#
# Environment: everything tpu_create.sh, tpu_install.sh and tpu_train.sh read (they are
# called with this environment), and
#   MAX_RESTARTS      restarts after preemption before giving up; default 20
#   MAX_CRASHES       crashes in a row (training died on a READY TPU) before giving up;
#                     default 3
#   POLL_SECONDS      seconds between state checks; default 300
#   LEASE_WAIT_SECONDS  seconds to wait after killing a crashed run before restarting it on
#                     the same TPU, so that the dead run's workdir lock lease has expired
#                     (config.checkpoint.lock_lease_secs, 60 s by default; a run that finds a
#                     live lease exits 2); default 70
#   PID_FILE, EXIT_FILE  as in tpu_train.sh
#   DRY_RUN=1         print one iteration's commands and exit, without looping; the state
#                     is FAKE_STATE (default READY), e.g. FAKE_STATE=PREEMPTED shows a restart,
#                     and the workers answer FAKE_TRAINING (alive, crashed or finished;
#                     default alive), e.g. FAKE_TRAINING=crashed shows a crash restart
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME ACCELERATOR_TYPE WORKDIR
gcloud_flags
MAX_RESTARTS="${MAX_RESTARTS:-20}"
MAX_CRASHES="${MAX_CRASHES:-3}"
PID_FILE="${PID_FILE:-dit_jax_train.pid}"
EXIT_FILE="${EXIT_FILE:-dit_jax_train.exit}"
POLL_SECONDS="${POLL_SECONDS:-300}"
LEASE_WAIT_SECONDS="${LEASE_WAIT_SECONDS:-70}"
QUEUED="${QUEUED:-0}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}}"
require_bool QUEUED
if [[ ! "${MAX_RESTARTS}" =~ ^[0-9]+$ ]]; then
  die "MAX_RESTARTS must be a non-negative integer, got '${MAX_RESTARTS}'"
fi
if [[ ! "${MAX_CRASHES}" =~ ^[0-9]+$ ]]; then
  die "MAX_CRASHES must be a non-negative integer, got '${MAX_CRASHES}'"
fi
if [[ ! "${POLL_SECONDS}" =~ ^[0-9]+$ ]]; then
  die "POLL_SECONDS must be a non-negative integer, got '${POLL_SECONDS}'"
fi
if [[ ! "${LEASE_WAIT_SECONDS}" =~ ^[0-9]+$ ]]; then
  die "LEASE_WAIT_SECONDS must be a non-negative integer, got '${LEASE_WAIT_SECONDS}'"
fi
if [[ -n "${FAKE_STATE:-}${FAKE_TRAINING:-}" ]] && ! is_dry_run; then
  die "FAKE_STATE='${FAKE_STATE:-}' FAKE_TRAINING='${FAKE_TRAINING:-}' are only for DRY_RUN=1 (they would delete a healthy TPU or kill a live run)"
fi
case "${FAKE_TRAINING:-alive}" in
  alive|crashed|finished) ;;
  *) die "FAKE_TRAINING must be alive, crashed or finished, got '${FAKE_TRAINING}'" ;;
esac
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

pid_file="\$HOME/$(quote_args "${PID_FILE}")"
exit_file="\$HOME/$(quote_args "${EXIT_FILE}")"
# One line per worker: "dit_jax_training alive", "... exit <status>" or "... none".
probe=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}"
       "--command=if [ -f ${pid_file} ] && kill -0 \"\$(cat ${pid_file})\" 2>/dev/null; then echo dit_jax_training alive; elif [ -f ${exit_file} ]; then echo dit_jax_training exit \$(cat ${exit_file}); else echo dit_jax_training none; fi")
# SIGKILL what is left of a crashed run on every worker, and wait until it is gone.
kill_rest=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}"
           "--command=if [ -f ${pid_file} ]; then p=\$(cat ${pid_file}); kill -9 \$p 2>/dev/null; for i in \$(seq 60); do kill -0 \$p 2>/dev/null || break; sleep 1; done; fi; true")

# The training status over all workers: alive, finished, crashed (or unknown if unreadable).
training_status() {
  local out
  if ! out="$("${probe[@]}" 2>/dev/null)"; then
    echo unknown
    return
  fi
  out="$(grep '^dit_jax_training ' <<<"${out}" || true)"
  if [[ -z "${out}" ]]; then
    echo unknown
  elif grep -qv -e ' alive$' -e ' exit 0$' <<<"${out}"; then
    echo crashed  # Some worker ended with a nonzero status or without one.
  elif ! grep -q ' alive$' <<<"${out}"; then
    echo finished
  elif grep -q ' exit 0$' <<<"${out}"; then
    echo alive  # Some ended cleanly, others still saving: look again next poll.
  else
    echo alive
  fi
}

# One restart; nonzero when a step failed. Called in an `if`, where set -e is off, hence &&.
restart_once() {
  run "${delete[@]}" || log "delete failed; going on (the TPU may already be gone)"
  "${LAUNCH_DIR}/tpu_create.sh" && "${LAUNCH_DIR}/tpu_install.sh" && "${LAUNCH_DIR}/tpu_train.sh"
}

restarts=0
crashes=0
alive_polls=0
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
  if [[ "${state}" == READY && "${pending}" == 0 ]]; then
    if is_dry_run; then
      run "${probe[@]}"
      training="${FAKE_TRAINING:-alive}"
    else
      training="$(training_status)"
    fi
    case "${training}" in
      alive)
        alive_polls=$((alive_polls + 1))
        (( alive_polls >= 2 )) && crashes=0
        ;;
      finished)
        log "training ended with status 0 on every worker (finished, or stopped by SIGTERM); nothing to restart"
        exit 0
        ;;
      crashed)
        alive_polls=0
        crashes=$((crashes + 1))
        if (( crashes > MAX_CRASHES )); then
          die "training crashed ${crashes} times in a row (MAX_CRASHES=${MAX_CRASHES}); read the logs: WORKER=all launch/tpu_logs.sh"
        fi
        log "training died on the READY TPU ${TPU_NAME}: crash restart ${crashes}/${MAX_CRASHES}"
        run "${kill_rest[@]}" || log "could not kill every worker's process; tpu_train.sh refuses where one lives"
        # The dead run's workdir lock (dit_jax/workdir_lock.py) is free once its lease expires.
        run sleep "${LEASE_WAIT_SECONDS}"
        if "${LAUNCH_DIR}/tpu_train.sh"; then
          log "crash restart ${crashes} started: training resumes from the latest checkpoint in ${WORKDIR}"
        else
          log "crash restart ${crashes} failed; looking again in ${POLL_SECONDS}s"
        fi
        ;;
      *) log "could not read the training status of ${TPU_NAME}; next check in ${POLL_SECONDS}s" ;;
    esac
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
