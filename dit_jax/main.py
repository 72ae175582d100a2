r"""Command line entry point: the only module that reads flags.

  python -m dit_jax.main --config=configs/digits.py --workdir=runs/digits
  python -m dit_jax.main --config=configs/imagenet256.py:variant=XL/2 --workdir=gs://b/run \
      --config.mesh.fsdp=4 --config.model.dtype=bfloat16

`--config.section.field=value` overrides a config field; a field that does not exist is an
error (the configs are locked). Re-running the same command on the same workdir resumes from
its latest checkpoint.

Multi-process runs (several hosts of a TPU pod slice, GPU nodes, or several local processes)
must call `jax.distributed.initialize()` before anything touches the devices. This is explicit:

  --distributed=auto    `jax.distributed.initialize()` with JAX's auto-detection of the cluster
                        (Cloud TPU VMs and pod slices, Slurm, Open MPI, Kubernetes JobSets).
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                        explicit cluster (e.g. two local processes on 127.0.0.1); any of the
                        three given implies initialisation, missing ones are auto-detected.
  --distributed=off     never initialise: a single process driving all of its local devices.
  (unset)               initialise iff a flag above is given or the environment shows a
                        multi-process launch (Slurm with several tasks, Open MPI, a multi-host
                        Cloud TPU slice from TPU_WORKER_HOSTNAMES / MEGASCALE_NUM_SLICES or,
                        on a TPU VM, from its metadata as JAX's own detection reads it,
                        JAX_COORDINATOR_ADDRESS). A single-host run never initialises.
                        launch/tpu_train.sh passes --distributed=auto on multi-host types.

`--distributed=on` forces initialisation with whatever is given or detected.

User errors (a typo in an override, a config file that does not exist, a bad field value, a
workdir that is a file) print one line and exit with code 2; `--debug` shows the traceback.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dit_jax import checkpointing
from dit_jax import errors
from dit_jax import host_memory
from dit_jax import metrics
from dit_jax import sharding
from dit_jax import shutdown
from dit_jax import train

PROG = "python -m dit_jax.main"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples "
                               "(local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", None, ["auto", "on", "off"],
    "Multi-process initialisation: 'auto'/'on' call jax.distributed.initialize(); 'off' "
    "never does. Default: on iff a --coordinator_address/--num_processes/--process_id is given.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
_LIBRARY_INFO_LOGS = flags.DEFINE_bool(
    "library_info_logs", False, "Also show INFO logs of Orbax (one screenful per checkpoint).")

flags.mark_flags_as_required(["config", "workdir"])


def distributed_kwargs(mode, coordinator_address, num_processes, process_id):
  """None if no initialisation is wanted, else the kwargs for jax.distributed.initialize."""
  explicit = {k: v for k, v in (("coordinator_address", coordinator_address),
                                ("num_processes", num_processes),
                                ("process_id", process_id)) if v is not None}
  if mode == "off":
    if explicit:
      raise errors.UserError(f"--distributed=off contradicts the given {sorted(explicit)}.")
    return None
  if mode is None and not explicit:
    return {} if detected_cluster(os.environ) or cloud_tpu_pod() else None
  return explicit


def detected_cluster(environ) -> str | None:
  """The multi-process launcher the environment shows, or None for a single process.

  Lets the default (`--distributed` unset) do the right thing under the launch/ scripts: a Slurm
  job step with several tasks, an Open MPI job, a multi-host Cloud TPU slice, or a coordinator
  given through JAX's own `JAX_COORDINATOR_ADDRESS`.
  """
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if count("SLURM_NTASKS") > 1 or count("SLURM_STEP_NUM_TASKS") > 1:
    return "slurm"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "," in environ.get(
      "TPU_PROCESS_ADDRESSES", ""):
    return "tpu"
  if count("MEGASCALE_NUM_SLICES") > 1:
    return "tpu-multislice"
  return None


def cloud_tpu_pod() -> str | None:
  """"tpu-metadata" on a Cloud TPU VM whose slice has several hosts, else None.

  JAX's own Cloud TPU detection (`jax._src.clusters.GceTpuCluster`): a plain TPU VM's ssh
  session has no TPU_WORKER_HOSTNAMES, but its metadata server lists the slice's workers. Off
  a TPU VM (no TPU device files) nothing is queried; on a single-host slice the count is 1,
  so a single-host run never initialises (nor waits for) a cluster.
  """
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    if not cloud_tpu_init.running_in_cloud_tpu_vm:
      return None
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
    for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
      if cluster.is_env_present():
        return "tpu-metadata" if cluster.get_process_count() > 1 else None
  except Exception as e:  # pylint: disable=broad-except  (private API; metadata may fail)
    logging.warning("Could not read the TPU slice's workers (%s); not initialising "
                    "jax.distributed: pass --distributed=auto on a multi-host slice.", e)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags of `argv` (program name first); a bad flag or config is a UserError."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise errors.UserError(str(e)) from e
  except (AttributeError, KeyError) as e:  # config_flags: an override naming no field.
    raise errors.UserError(errors.config_override_error(argv[1:], e)) from e
  spec = _config_spec(argv)
  try:
    _CONFIG.value.is_locked  # pylint: disable=pointless-statement  (a load error shows here)
  except (OSError, AttributeError) as e:  # config_flags defers a load failure to here.
    path = (spec or "").split(":", 1)[0]
    if path and not os.path.exists(path):
      raise errors.UserError(f"--config={spec}: no such file {path!r}.") from e
    raise
  return rest


def _config_spec(argv) -> str | None:
  for arg in argv:
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _train(argv, debug: bool = False) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {argv[1:]}")
  # One line per cause for a failed save's background threads (`--debug`: as printed).
  shutdown.install(info=_LIBRARY_INFO_LOGS.value, debug=debug)
  config = _CONFIG.value  # Before any backend exists, like the next line:
  host_memory.for_cpu_runs(metrics.dit_train_flops(train.build_model(config.model),
                                                   config.global_batch_size))
  sharding.set_num_cpu_devices(config.mesh)
  kwargs = distributed_kwargs(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                              _PROCESS_ID.value)
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)
  logging.info("JAX process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _cli(argv: list[str], debug: bool = False) -> int:
  # config_flags reads the overrides from sys.argv (not from the argv it is given).
  saved, sys.argv = sys.argv, [PROG, *argv]
  if "jax_enable_x64" not in flags.FLAGS:  # JAX's own flags, once per process.
    jax.config.config_with_absl()
  try:
    app.run(functools.partial(_train, debug=debug), argv=sys.argv, flags_parser=parse_flags)
  except SystemExit as e:  # app.run ends with sys.exit(main's value).
    return 0 if e.code is None else e.code
  except checkpointing.SaveError as e:
    # The real error as the last line, without the pages that Orbax's background threads and
    # event loops print while the interpreter shuts down after a failed save.
    if debug:
      traceback.print_exc()
    shutdown.exit_now(1, f"{PROG}: error: {e}")
  finally:
    sys.argv = saved
  return 0


def main(argv=None) -> int:
  """`python -m dit_jax.main`: argv without the program name (default sys.argv[1:])."""
  argv = list(sys.argv[1:] if argv is None else argv)
  return errors.run_cli(PROG, functools.partial(_cli, debug="--debug" in argv), argv)


if __name__ == "__main__":
  sys.exit(main())
