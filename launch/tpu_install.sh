#!/usr/bin/env bash
# Copy this repository to every worker of a TPU VM and install it there.
#
# The copy is `git archive` of GIT_REF (committed files only: commit before installing),
# sent with `gcloud compute tpus tpu-vm scp --worker=all`, unpacked into REMOTE_DIR (in each
# worker's home; replaced on every install) and installed with pip on all workers at once:
#   pip install -U "jax[tpu]"; pip install -e ".[imagenet]"
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b launch/tpu_install.sh
#
# Environment:
#   TPU_NAME          (required) name of the TPU VM
#   PROJECT, ZONE     (required) Google Cloud project and zone
#   GIT_REF           commit, branch or tag to install; default HEAD
#   REMOTE_DIR        checkout directory on the workers, relative to home; default dit_jax
#   JAX_SPEC          pip requirement for JAX; default "jax[tpu]"
#   PIP_EXTRAS        extras of this package to install; default imagenet
#   TARBALL           local path of the archive; default ${TMPDIR:-/tmp}/dit_jax-$TPU_NAME.tar.gz
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME
gcloud_flags
GIT_REF="${GIT_REF:-HEAD}"
REMOTE_DIR="${REMOTE_DIR:-dit_jax}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
PIP_EXTRAS="${PIP_EXTRAS:-imagenet}"
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/dit_jax-${TPU_NAME}.tar.gz}"
remote_tarball="${REMOTE_DIR}.tar.gz"

if ! is_dry_run && [[ -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no)" ]]; then
  log "warning: uncommitted changes in ${REPO_ROOT} are NOT installed (git archive ${GIT_REF})"
fi

spec="${PIP_EXTRAS:+[${PIP_EXTRAS}]}"
remote="set -e; rm -rf $(quote_args "${REMOTE_DIR}") && mkdir -p $(quote_args "${REMOTE_DIR}")"
remote+=" && tar -xzf $(quote_args "${remote_tarball}") -C $(quote_args "${REMOTE_DIR}")"
remote+=" && cd $(quote_args "${REMOTE_DIR}")"
remote+=" && python3 -m pip install -U $(quote_args "${JAX_SPEC}")"
remote+=" && python3 -m pip install -e $(quote_args ".${spec}")"

run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${TARBALL}" "${GIT_REF}"
run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU_NAME}:${remote_tarball}" \
  --worker=all --recurse "${GCLOUD_FLAGS[@]}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="${remote}"
