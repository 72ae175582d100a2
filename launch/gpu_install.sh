#!/usr/bin/env bash
# Create the Python >= 3.11 virtual environment for Slurm GPU training (gpu_slurm.sh's VENV),
# on storage every node sees, and install this checkout into it with CUDA 12 JAX:
#   python3 -m pip install --user uv                   (if uv is not on PATH)
#   uv venv --seed --python 3.11 $VENV                 (uv fetches a managed CPython if needed)
#   $VENV/bin/python -m pip install "jax[cuda12]==<setup.py's jax pin>" -e ".[imagenet,gcs]"
# jax[cuda12] and the package are resolved together, so no pin downgrades jax afterwards.
# Then checks `$VENV/bin/python -c "import sys, jax; print(sys.version, jax.devices())"`
# (CHECK=1; on a login node without GPUs it prints CPU devices: run it again in a job).
#
# Usage:
#   VENV=/shared/venvs/dit launch/gpu_install.sh
#
# Environment:
#   VENV              (required) virtual environment to create (or reuse) and install into
#   PYTHON_VERSION    its Python (>= 3.11); default 3.11
#   JAX_SPEC          pip requirement for JAX; default "jax[cuda12]==<the jax pin of setup.py>"
#   PIP_EXTRAS        extras of this package to install; default imagenet,gcs
#   CHECK             1: print the Python version and the devices JAX sees; default 1
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
handle_args "$@"

require VENV
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[cuda12]==$(pinned_version jax)}"
PIP_EXTRAS="${PIP_EXTRAS:-imagenet,gcs}"
CHECK="${CHECK:-1}"
require_bool CHECK
if [[ ! "${PYTHON_VERSION}" =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ ]]; then
  die "PYTHON_VERSION='${PYTHON_VERSION}' must be 3.11 or later (jax, flax and orbax pins need >= 3.11)"
fi

uv=(uv)
if ! command -v uv >/dev/null 2>&1; then
  run python3 -m pip install --user -q -U uv
  uv=(python3 -m uv)
fi
run "${uv[@]}" venv --allow-existing --seed --python "${PYTHON_VERSION}" "${VENV}"
run "${VENV}/bin/python" -m pip install "${JAX_SPEC}" -e "${REPO_ROOT}[${PIP_EXTRAS}]"
if [[ "${CHECK}" == 1 ]]; then
  run "${VENV}/bin/python" -c "import sys, jax; print(sys.version.split()[0], jax.__version__, jax.devices())"
fi
