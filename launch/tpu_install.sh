#!/usr/bin/env bash
# Copy this repository to every worker of a TPU VM and install it there, in a Python >= 3.11
# virtual environment (the TPU VM images ship Python 3.10; the pinned jax, flax and orbax
# need >= 3.11).
#
# The copy is `git archive` of GIT_REF (committed files only: commit before installing),
# sent with `gcloud compute tpus tpu-vm scp --worker=all`, unpacked into REMOTE_DIR (in each
# worker's home; replaced on every install) and installed on all workers at once:
#   python3 -m pip install --user uv                  (the image's Python 3.10 runs uv only)
#   python3 -m uv venv --seed --python 3.11 ~/dit_jax_venv   (uv fetches a managed CPython)
#   ~/dit_jax_venv/bin/python -m pip install "jax[tpu]==<setup.py's jax pin>" \
#       -f https://storage.googleapis.com/jax-releases/libtpu_releases.html -e ".[imagenet,gcs]"
# jax[tpu] and the package are resolved together, so the libtpu that jax[tpu] names is the one
# installed and no pin downgrades jax afterwards. Then every worker runs (CHECK=1)
#   ~/dit_jax_venv/bin/python -c "import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices())"
# which must print 3.11.x, the jax pin and TpuDevice entries (all of the slice's chips).
# Meant for the TPU VM runtime images tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite (v5e),
# v2-alpha-tpuv5 (v5p) and v2-alpha-tpuv6e (v6e); the VMs need internet access (PyPI and the
# python-build-standalone downloads of uv).
#
# Usage:
#   TPU_NAME=dit-xl PROJECT=my-proj ZONE=us-central2-b launch/tpu_install.sh
#
# Environment:
#   TPU_NAME          (required) name of the TPU VM
#   PROJECT, ZONE     (required) Google Cloud project and zone
#   GIT_REF           commit, branch or tag to install; default HEAD
#   REMOTE_DIR        checkout directory on the workers, relative to home; default dit_jax
#   REMOTE_VENV       virtual environment on the workers, relative to home; default dit_jax_venv
#   PYTHON_VERSION    Python of that environment (>= 3.11); default 3.11
#   JAX_SPEC          pip requirement for JAX; default "jax[tpu]==<the jax pin of setup.py>"
#   LIBTPU_FIND_LINKS pip --find-links for libtpu; default the jax-releases libtpu page
#   PIP_EXTRAS        extras of this package to install; default imagenet,gcs
#   CHECK             1: print the devices each worker sees after installing; default 1
#   TARBALL           local path of the archive; default ${TMPDIR:-/tmp}/dit_jax-$TPU_NAME.tar.gz
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require TPU_NAME
gcloud_flags
GIT_REF="${GIT_REF:-HEAD}"
REMOTE_DIR="${REMOTE_DIR:-dit_jax}"
REMOTE_VENV="${REMOTE_VENV:-dit_jax_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]==$(pinned_version jax)}"
LIBTPU_FIND_LINKS="${LIBTPU_FIND_LINKS:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
PIP_EXTRAS="${PIP_EXTRAS:-imagenet,gcs}"
CHECK="${CHECK:-1}"
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/dit_jax-${TPU_NAME}.tar.gz}"
remote_tarball="${REMOTE_DIR}.tar.gz"
require_bool CHECK
if [[ ! "${PYTHON_VERSION}" =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ ]]; then
  die "PYTHON_VERSION='${PYTHON_VERSION}' must be 3.11 or later (jax, flax and orbax pins need >= 3.11)"
fi

if ! is_dry_run && [[ -n "$(git -C "${REPO_ROOT}" status --porcelain --untracked-files=no)" ]]; then
  log "warning: uncommitted changes in ${REPO_ROOT} are NOT installed (git archive ${GIT_REF})"
fi

venv_python="\$HOME/$(quote_args "${REMOTE_VENV}")/bin/python"
spec="${PIP_EXTRAS:+[${PIP_EXTRAS}]}"
remote="set -e; rm -rf $(quote_args "${REMOTE_DIR}") && mkdir -p $(quote_args "${REMOTE_DIR}")"
remote+=" && tar -xzf $(quote_args "${remote_tarball}") -C $(quote_args "${REMOTE_DIR}")"
remote+=" && cd $(quote_args "${REMOTE_DIR}")"
remote+=" && python3 -m pip install --user -q -U uv"
remote+=" && python3 -m uv venv --allow-existing --seed --python $(quote_args "${PYTHON_VERSION}")"
remote+=" \$HOME/$(quote_args "${REMOTE_VENV}")"
remote+=" && ${venv_python} -m pip install $(quote_args "${JAX_SPEC}")"
remote+=" -f $(quote_args "${LIBTPU_FIND_LINKS}") -e $(quote_args ".${spec}")"

run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${TARBALL}" "${GIT_REF}"
run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU_NAME}:${remote_tarball}" \
  --worker=all --recurse "${GCLOUD_FLAGS[@]}"
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="${remote}"
if [[ "${CHECK}" == 1 ]]; then
  # All workers at once: on a pod slice the TPU runtime waits for every host.
  check="import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices())"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
    --command="${venv_python} -c $(quote_args "${check}")"
fi
