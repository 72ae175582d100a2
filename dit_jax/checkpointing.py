"""Checkpoints: one Orbax `CheckpointManager` per run; save, restore-or-init, auto-resume.

This module owns the on-disk layout of a run's checkpoints and the resume rules:

  <workdir>/checkpoints/<step>/state/   the TrainState pytree (StandardSave: one tensorstore
                                        array per leaf, written shard by shard by the processes
                                        that own the shards)
  <workdir>/checkpoints/<step>/meta/    JSON: {"step", "data_position", "config", ...}

`workdir` may be local or `gs://...` (Orbax writes arrays through tensorstore; directory
operations go through `etils.epath`, which needs `gcsfs` or TensorFlow for `gs://`).

Saving (`save`) follows the config's cadence: a checkpoint every `save_every_steps` steps, or
whenever `force=True` (end of training, before stopping on a non-finite loss), or when a
preemption notice reached the JAX distributed runtime. With `async=True` the arrays are copied to
host memory and written in a background thread while training goes on; the next save (or
`wait`) waits for it.

Keeping: the latest `max_to_keep` checkpoints, plus every checkpoint whose step is a multiple of
`keep_every_steps` (milestones; 0 = none).

Atomicity (why a killed run never leaves an unusable latest checkpoint): Orbax writes step `s`
into a temporary directory `<s>.orbax-checkpoint-tmp...` (on GCS, where renames are not atomic,
it writes `<s>/` and marks it complete with a `commit_success.txt` file written last) and
renames it to `<s>` only after every array and the metadata are written and all processes have
finished. `latest_step` and restore only consider finalized steps, so a SIGKILL during a save
leaves the previous step as the latest; the stale temporary directory is removed when the next
manager is created (`cleanup_tmp_directories=True`). tests/test_checkpointing.py kills a process
mid-save and restores the previous step.

Restoring (`restore_or_init`) reads the latest step straight into the shardings of the current
mesh: each leaf is restored from an abstract `jax.ShapeDtypeStruct` that carries the new
`NamedSharding`, so a checkpoint written on 8 devices restores on 1, on a 2x4 mesh, or on a
different number of hosts, without ever materialising the full state on one device.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from dit_jax import errors

PyTree = Any

STATE = "state"
META = "meta"

# Model fields that change how the forward pass is computed but not the parameters: a run may
# resume with different values (e.g. moving from GPU to TPU changes the attention kernel). All
# other model and diffusion fields must match the checkpoint.
COMPUTE_ONLY_MODEL_FIELDS = frozenset({"dtype", "attention_impl", "remat", "ln_grad_barrier"})
CHECKED_SECTIONS = ("model", "diffusion")
# Fields added after checkpoints were first written, with the value that reproduces what those
# checkpoints were trained with: a checkpoint without the field matches a config at this value.
ADDED_FIELD_DEFAULTS = {"diffusion.snr_shift": 1.0, "diffusion.min_snr_gamma": None,
                        "diffusion.timestep_sampling": "uniform", "diffusion.timestep_power": 0.0}


def _field(section, name: str, default=None):
  """Reads a field of a ConfigDict or a plain mapping (both have `.get`)."""
  value = section.get(name, None)
  return default if value is None else value


def checkpoint_directory(workdir: str) -> epath.Path:
  """`<workdir>/checkpoints`, absolute: Orbax refuses relative paths (`--workdir=runs/x`)."""
  path = epath.Path(workdir)
  if "://" not in str(workdir):
    path = epath.Path(os.path.abspath(os.path.expanduser(str(workdir))))
  return path / "checkpoints"


def create_manager(workdir: str, config_checkpoint,
                   keep_steps: Sequence[int] = ()) -> ocp.CheckpointManager:
  """Returns the CheckpointManager of `<workdir>/checkpoints`.

  Args:
    workdir: run directory, local path or `gs://bucket/...`.
    config_checkpoint: the config's `checkpoint` section with fields `save_every_steps` (> 0),
      `max_to_keep` (> 0), `keep_every_steps` (milestones, 0 = none) and `async` (bool;
      also read as `async_save`, since `async` is a Python keyword).
    keep_steps: further saved steps never deleted (e.g. the autoguidance guide's step).
  """
  save_every = int(_field(config_checkpoint, "save_every_steps", 0))
  max_to_keep = int(_field(config_checkpoint, "max_to_keep", 0))
  keep_every = int(_field(config_checkpoint, "keep_every_steps", 0))
  # `async` is a Python keyword (config.checkpoint["async"]); `async_save` is accepted too.
  use_async = bool(_field(config_checkpoint, "async",
                          _field(config_checkpoint, "async_save", True)))
  if save_every <= 0:
    raise errors.UserError(f"config.checkpoint.save_every_steps must be > 0, got {save_every}.")
  if max_to_keep <= 0:
    raise errors.UserError(f"config.checkpoint.max_to_keep must be > 0, got {max_to_keep}.")
  if keep_every < 0 or keep_every % save_every:
    raise errors.UserError(
        f"config.checkpoint.keep_every_steps={keep_every} must be 0 (no milestones) or a "
        f"multiple of config.checkpoint.save_every_steps={save_every}: milestones are kept "
        "saved steps.")

  preserve = [ocp_policies.LatestN(max_to_keep)]
  if keep_every:
    preserve.append(ocp_policies.EveryNSteps(keep_every))
  if keep_steps:
    preserve.append(ocp_policies.CustomSteps([int(s) for s in keep_steps]))
  options = ocp.CheckpointManagerOptions(
      # Explicit policies (no InitialSavePolicy): saves happen on multiples of save_every_steps,
      # on a preemption notice, or when forced.
      save_decision_policy=ocp_policies.AnySavePolicy([
          ocp_policies.FixedIntervalPolicy(save_every),
          ocp_policies.PreemptionCheckpointingPolicy(),
      ]),
      preservation_policy=ocp_policies.AnyPreservationPolicy(preserve),
      enable_async_checkpointing=use_async,
      cleanup_tmp_directories=True,
      create=True,
  )
  directory = checkpoint_directory(workdir)
  return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


# Replicated arrays are written in slices by all their replicas in parallel (Orbax's
# "replica-parallel" saving), but only when a slice is at least this big: each slice is a device
# op compiled per (shape, replica), which for hundreds of small arrays costs far more on the first
# save than the parallel write gains (97 s for 127 small arrays on 8 CPU devices).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _register_array_handler() -> None:
  """Registers Orbax's jax.Array handler with the replica-parallel threshold (idempotent)."""
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_dit_jax_handler", False):
    return
  handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL,
      # Keep the default handler's per-array metadata store (no public constructor in 0.12).
      array_metadata_store=getattr(current, "_array_metadata_store", None))
  handler._dit_jax_handler = True  # pylint: disable=protected-access
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _item_handlers():
  _register_array_handler()
  # Explicit handlers (rather than item_names) so that item_metadata() can read a step's tree.
  return {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The latest finalized step (unfinished saves are never reported), or None."""
  manager.reload()
  return manager.latest_step()


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until any asynchronous save has been finalized on disk."""
  manager.wait_until_finished()


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: Mapping[str, Any],
         force: bool = False) -> bool:
  """Saves `state` and `meta` as step `step` if the cadence (or `force`) says so.

  Args:
    manager: from `create_manager`.
    step: the training step the state is at (number of optimizer updates applied).
    state: the TrainState pytree of (sharded) jax.Arrays; every process passes its own view.
    meta: JSON-serialisable dict with at least "step", "data_position" (examples consumed) and
      "config" (the run's config as a JSON string or dict).
    force: save even off the cadence (an existing step is never overwritten).

  Returns:
    True if a save was started.
  """
  step = int(step)
  for key in ("step", "data_position", "config"):
    if key not in meta:
      raise ValueError(f"checkpoint meta is missing {key!r}; got keys {sorted(meta)}.")
  if int(meta["step"]) != step:
    raise ValueError(f"checkpoint meta['step']={meta['step']} differs from step={step}.")
  if step in manager.all_steps():
    return False
  meta = json.loads(json.dumps(dict(meta)))  # Fail here, not in a background thread.
  return manager.save(
      step,
      args=ocp.args.Composite(**{
          STATE: ocp.args.StandardSave(state),
          META: ocp.args.JsonSave(meta),
      }),
      force=force,
  )


def config_to_json(config) -> str:
  """The config as a JSON string, as stored in meta["config"]."""
  if hasattr(config, "to_json_best_effort"):
    return config.to_json_best_effort(sort_keys=True)
  return json.dumps(config, sort_keys=True, default=repr)


def _as_dict(config) -> dict:
  if isinstance(config, str):
    return json.loads(config)
  return json.loads(config_to_json(config))


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_mismatches(saved_config, config) -> list[str]:
  """Fields of the model and diffusion sections that differ, as 'field: saved -> current'."""
  saved, current = _as_dict(saved_config), _as_dict(config)
  diffs = []
  for section in CHECKED_SECTIONS:
    a = _flatten(saved.get(section) or {}, f"{section}.")
    b = _flatten(current.get(section) or {}, f"{section}.")
    for key in sorted(set(a) | set(b)):
      if section == "model" and key.split(".", 1)[1] in COMPUTE_ONLY_MODEL_FIELDS:
        continue
      missing = "<missing>"
      if key not in a and key in ADDED_FIELD_DEFAULTS:
        a[key] = ADDED_FIELD_DEFAULTS[key]
      if a.get(key, missing) != b.get(key, missing):
        diffs.append(f"{key}: checkpoint {a.get(key, missing)!r} != config {b.get(key, missing)!r}")
  return diffs


def _with_shardings(abstract_state: PyTree, state_shardings: PyTree | None) -> PyTree:
  if state_shardings is None:
    return abstract_state
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree,
            state_shardings: PyTree | None = None) -> tuple[PyTree, dict]:
  """Restores step `step` into the given shardings; returns (state, meta)."""
  target = _with_shardings(abstract_state, state_shardings)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(target),
          META: ocp.args.JsonRestore(),
      }),
  )
  return restored[STATE], dict(restored[META])


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """Reads only the JSON meta of step `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
  return dict(restored[META])


def restore_or_init(manager: ocp.CheckpointManager, abstract_state: PyTree,
                    state_shardings: PyTree | None, init_fn: Callable[[], PyTree],
                    config) -> tuple[PyTree, dict]:
  """Resumes from the latest checkpoint of `manager`, or initialises a fresh state.

  Args:
    manager: from `create_manager`.
    abstract_state: pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(init)`), the
      structure, shapes and dtypes of the state.
    state_shardings: matching pytree of `jax.sharding.Sharding` for the current mesh, or None
      if `abstract_state` already carries shardings.
    init_fn: called with no arguments when there is no checkpoint; returns the initial state
      (already sharded).
    config: the run's config; its model and diffusion sections must match the checkpoint's
      (except the compute-only model fields in COMPUTE_ONLY_MODEL_FIELDS).

  Returns:
    (state, meta): meta = the saved JSON dict (step, data_position, config, ...), or
    {"step": 0, "data_position": 0} for a fresh state.

  Raises:
    ValueError: the checkpoint was written with a different model or diffusion config.
  """
  step = latest_step(manager)
  if step is None:
    return init_fn(), {"step": 0, "data_position": 0}
  meta = restore_meta(manager, step)
  if "config" in meta and config is not None:
    diffs = config_mismatches(meta["config"], config)
    if diffs:
      raise errors.UserError(
          f"The checkpoint at {manager.directory / str(step)} was written with a different "
          f"model/diffusion config; differing fields: " + "; ".join(diffs) +
          ". Use a new --workdir, or resume with the checkpoint's values.")
  state, meta = restore(manager, step, abstract_state, state_shardings)
  if int(meta.get("step", step)) != step:
    raise ValueError(f"Checkpoint {step}: meta['step']={meta['step']} differs from its step.")
  return state, meta


def load_on_host(workdir: str, step: int | None = None) -> tuple[PyTree, dict]:
  """Reads a checkpoint of `<workdir>/checkpoints` (default: the latest) as numpy arrays.

  For tools and tests (comparing runs, exporting weights): no mesh or abstract state needed; the
  tree comes back as nested dicts/lists of np.ndarray (custom pytree nodes such as TrainState
  or optax states become dicts/lists; empty nodes become None), whatever mesh or number of
  processes wrote it. Returns (state_tree, meta).
  """
  directory = checkpoint_directory(workdir)
  manager = ocp.CheckpointManager(
      directory, item_handlers=_item_handlers(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No finalized checkpoint in {directory}.")
  tree = manager.item_metadata(step)[STATE].tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state, meta = restore(manager, step, target)
  manager.close()
  return jax.tree.map(np.asarray, state), meta
