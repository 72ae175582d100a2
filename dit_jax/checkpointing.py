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
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from dit_jax import errors
from dit_jax import integrity

PyTree = Any

STATE = "state"
META = "meta"
INTEGRITY = "integrity"  # meta key: integrity.summarize(state) at save.
CORRUPT = "corrupt"  # <workdir>/corrupt/<step>/: damaged steps moved aside, never deleted.
# Restore errors worth retrying (storage hiccups), never taken for damage.
TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "timed out", "Timeout",
                     "Connection reset", "503", "429", "Too Many Requests")
# Restore errors that mean the stored bytes are damaged (tensorstore status codes, decoders).
DAMAGE_MARKERS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "Error decoding", "decode",
                  "corrupt", "truncated", "Invalid", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
RESTORE_ATTEMPTS = 4  # Per step and process, for transient errors (1, 2, 4 s apart).

# Model fields that change how the forward pass is computed but not the parameters: a run may
# resume with different values (e.g. moving from GPU to TPU changes the attention kernel). All
# other model and diffusion fields must match the checkpoint.
ARCH_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio")  # As in train.
COMPUTE_ONLY_MODEL_FIELDS = frozenset({"dtype", "attention_impl", "remat", "remat_policy",
                                       "ln_grad_barrier", "scan", "fused_adaln"})
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


class SaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, storage errors), in this thread or in
  an asynchronous save's background thread. The message is one line ending with the cause."""


def _save_error(manager, step, e: BaseException) -> SaveError:
  root = e
  while root.__cause__ is not None:
    root = root.__cause__
  where = manager.directory if step is None else step_directory(manager, step)
  return SaveError(f"saving checkpoint {'' if step is None else f'step {step} '}to {where} "
                   f"failed; earlier checkpoints are intact. {type(root).__name__}: "
                   f"{errors.one_line(root)}")


_PENDING = "_dit_jax_pending_step"  # Manager attribute: the step of the save in flight.


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until any asynchronous save has been finalized on disk; SaveError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, getattr(manager, _PENDING, None), e) from e


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

  Raises:
    SaveError: this save, or the previous asynchronous one, failed.
  """
  step = int(step)
  for key in ("step", "data_position", "config"):
    if key not in meta:
      raise ValueError(f"checkpoint meta is missing {key!r}; got keys {sorted(meta)}.")
  if int(meta["step"]) != step:
    raise ValueError(f"checkpoint meta['step']={meta['step']} differs from step={step}.")
  if step in manager.all_steps() or not (force or manager.should_save(step)):
    return False
  meta = json.loads(json.dumps(dict(meta)))  # Fail here, not in a background thread.
  meta[INTEGRITY] = integrity.summarize(state)  # On device, before the state is donated.
  wait(manager)  # A failure of the previous asynchronous save is reported as that step's.
  try:
    started = manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            META: ocp.args.JsonSave(meta),
        }),
        force=force,
    )
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, step, e) from e
  setattr(manager, _PENDING, step)
  return started


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


def _effective_model(model: dict) -> dict:
  """The model section with its variant resolved: every architecture field a value, as built.

  `train.build_model` takes the variant's values for fields left None, so `mlp_ratio=4.0` on a
  variant with 4.0 is the same model as `mlp_ratio=None`, and `XL/2` the same as `DiT-XL/2`.
  """
  from dit_jax.models import variants  # pylint: disable=import-outside-toplevel
  model = dict(model)
  name = model.get("variant")
  if not name:
    return model
  try:
    arch = variants.parse(name)
  except ValueError:
    return model  # An unknown name compares as written.
  for key in ARCH_FIELDS:
    if model.get(key) is None and key in arch:
      model[key] = arch[key]
  model.pop("variant")
  if isinstance(model.get("mlp_ratio"), int):
    model["mlp_ratio"] = float(model["mlp_ratio"])  # 4 and 4.0 are one model.
  return model


def config_mismatches(saved_config, config) -> list[str]:
  """Differing fields that a resumed run must keep, as 'field: checkpoint a != config b'.

  Compared: the model section with its variant resolved (`_effective_model`; compute-only fields
  excepted), the diffusion section, and the seed (it sets the data order and every random
  stream; a change is allowed only with `config.checkpoint.allow_seed_change=True`).
  """
  saved, current = _as_dict(saved_config), _as_dict(config)
  diffs = []
  for section in CHECKED_SECTIONS:
    a_section = saved.get(section) or {}
    b_section = current.get(section) or {}
    if section == "model":
      a_section, b_section = _effective_model(a_section), _effective_model(b_section)
    a = _flatten(a_section, f"{section}.")
    b = _flatten(b_section, f"{section}.")
    for key in sorted(set(a) | set(b)):
      if section == "model" and key.split(".", 1)[1] in COMPUTE_ONLY_MODEL_FIELDS:
        continue
      missing = "<missing>"
      if key not in a and key in ADDED_FIELD_DEFAULTS:
        a[key] = ADDED_FIELD_DEFAULTS[key]
      if a.get(key, missing) != b.get(key, missing):
        diffs.append(f"{key}: checkpoint {a.get(key, missing)!r} != config {b.get(key, missing)!r}")
  allow_seed = bool((current.get("checkpoint") or {}).get("allow_seed_change", False))
  if "seed" in saved and "seed" in current and saved["seed"] != current["seed"] and not allow_seed:
    diffs.append(f"seed: checkpoint {saved['seed']!r} != config {current['seed']!r} (it sets the "
                 "data order and every random stream; --config.checkpoint.allow_seed_change="
                 "True to resume anyway)")
  return diffs


def _with_shardings(abstract_state: PyTree, state_shardings: PyTree | None) -> PyTree:
  if state_shardings is None:
    return abstract_state
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_shardings)


class DamagedCheckpoint(Exception):
  """A stored step cannot be read back as it was written (its files are damaged)."""


def _chain(e: BaseException) -> str:
  parts, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    parts.append(f"{type(e).__name__}: {e}")
    e = e.__cause__ or e.__context__
  return " <- ".join(parts)


def _short(text: str, limit: int = 300) -> str:
  text = errors.one_line(text)
  return text if len(text) <= limit else text[:limit] + "..."


def is_transient(e: BaseException) -> bool:
  """A read error worth retrying: a timeout, an unavailable or throttling storage service."""
  if isinstance(e, (TimeoutError, ConnectionError)):
    return True
  text = _chain(e)
  return any(m in text for m in TRANSIENT_MARKERS)


def is_damage(e: BaseException) -> bool:
  """A read error that means the stored files are damaged (not a bug, not a transient error)."""
  if isinstance(e, (DamagedCheckpoint, FileNotFoundError, json.JSONDecodeError,
                    UnicodeDecodeError)):
    return True
  text = _chain(e)
  return any(m in text for m in DAMAGE_MARKERS)


def step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(int(step))


def _read_json(path: epath.Path, what: str) -> dict:
  try:
    text = path.read_text()
  except FileNotFoundError as e:
    raise DamagedCheckpoint(f"{what} {path} is missing") from e
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise DamagedCheckpoint(f"{what} {path} is not valid JSON ({e}; {len(text)} bytes)") from e
  if not isinstance(value, dict):
    raise DamagedCheckpoint(f"{what} {path} holds a {type(value).__name__}, not an object")
  return value


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON meta of step `step`; DamagedCheckpoint if it is missing or not JSON."""
  return _read_json(step_directory(manager, step) / META / "metadata", "meta file")


def _read_state(manager, step: int, target: PyTree) -> PyTree:
  """Reads step `step`'s arrays into `target`'s shardings; this process's shards only.

  Uses the handler directly, not `manager.restore`: Orbax's restore ends with a barrier of all
  processes, which a process whose read failed never reaches (the others would hang).
  """
  directory = step_directory(manager, step) / STATE
  _read_json(directory / "_METADATA", "array metadata")
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.restore(directory, args=ocp.args.StandardRestore(target))
  finally:
    handler.close()


def _with_retries(fn: Callable[[], Any], what: str, attempts: int = RESTORE_ATTEMPTS,
                  sleep: Callable[[float], None] = time.sleep):
  """fn(), retried on transient errors (bounded; the last one is raised)."""
  for attempt in range(attempts):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e) or attempt == attempts - 1:
        raise
      logging.warning("%s: transient error (attempt %d of %d), retrying: %s", what,
                      attempt + 1, attempts, _short(str(e)))
      sleep(2.0 ** attempt)


def verify(state: PyTree, meta: Mapping[str, Any], where: str) -> None:
  """Raises DamagedCheckpoint if `state` differs from the checksums in `meta` or is not finite.

  A collective on several processes (the checksums are global reductions): call it on every
  process, and only once every process has read its shards.
  """
  restored = integrity.summarize(state)
  saved = meta.get(INTEGRITY)
  if saved is not None:
    bad = integrity.mismatches(saved, restored)
    if bad:
      raise DamagedCheckpoint(f"{where}: checksum mismatch in {len(bad)} array(s): "
                              f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
  if restored["nonfinite"]:
    raise DamagedCheckpoint(f"{where}: non-finite values in {', '.join(restored['nonfinite'][:3])}")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree,
            state_shardings: PyTree | None = None) -> tuple[PyTree, dict]:
  """Restores step `step` into the given shardings and verifies it; returns (state, meta).

  Raises DamagedCheckpoint (or the storage error) if the step cannot be read back as written.
  On several processes, every process must call it (the verification is a collective); a read
  error on one process is not seen by the others: `restore_or_init` agrees on the outcome first.
  """
  where = f"checkpoint step {step} ({step_directory(manager, step)})"
  meta = _with_retries(lambda: read_meta(manager, step), where)
  target = _with_shardings(abstract_state, state_shardings)
  state = _with_retries(lambda: _read_state(manager, step, target), where)
  verify(state, meta, where)
  return state, meta


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """Reads only the JSON meta of step `step`."""
  return read_meta(manager, step)


def _all_processes_agree(code: int) -> int:
  """The largest outcome code over all processes (0 = ok); a collective when multi-process."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  codes = multihost_utils.process_allgather(np.asarray(code, np.int32))
  return int(np.max(codes))


def move_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves `checkpoints/<step>` to `<workdir>/corrupt/<step>` (never deletes it); process 0."""
  source = step_directory(manager, step)
  corrupt = epath.Path(manager.directory).parent / CORRUPT
  corrupt.mkdir(parents=True, exist_ok=True)
  if "://" in str(corrupt) and not corrupt.exists():
    # GCS has no empty folders (mkdir writes nothing) and epath's rename wants the target's
    # folder to exist: an object in it makes it exist (tests/test_gcs.py).
    (corrupt / "README.txt").write_text(
        "Checkpoint steps found damaged at resume, moved here by dit_jax (never deleted).\n")
  target = corrupt / str(step)
  n = 1
  while target.exists():
    n += 1
    target = corrupt / f"{step}.{n}"
  source.rename(target)
  return target


_OK, _DAMAGED, _REFUSED = 0, 1, 2


def restore_or_init(manager: ocp.CheckpointManager, abstract_state: PyTree,
                    state_shardings: PyTree | None, init_fn: Callable[[], PyTree],
                    config) -> tuple[PyTree, dict]:
  """Resumes from the latest intact checkpoint of `manager`, or initialises a fresh state.

  Falling back (`config.checkpoint.fallback`, default True): if the latest step is damaged
  (missing or unreadable meta or array metadata, an array that cannot be read or decoded, a
  checksum mismatch, non-finite values), all processes agree on that, one line names the step
  and the cause, process 0 moves it to `<workdir>/corrupt/<step>/`, and the previous step is
  tried. Transient storage errors are retried (RESTORE_ATTEMPTS), never taken for damage.
  With fallback off a damaged latest step is a UserError (exit code 2 on the command line).

  Args:
    manager: from `create_manager`.
    abstract_state: pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape(init)`), the
      structure, shapes and dtypes of the state.
    state_shardings: matching pytree of `jax.sharding.Sharding` for the current mesh, or None
      if `abstract_state` already carries shardings.
    init_fn: called with no arguments when there is no checkpoint; returns the initial state
      (already sharded).
    config: the run's config; its model and diffusion sections and seed must match the
      checkpoint's (see `config_mismatches`).

  Returns:
    (state, meta): meta = the saved JSON dict (step, data_position, config, ...), or
    {"step": 0, "data_position": 0} for a fresh state.

  Raises:
    UserError: the checkpoint was written with a different config, or it is damaged and
      fallback is off, or every checkpoint was damaged.
  """
  fallback = True
  if config is not None and "checkpoint" in config:
    fallback = bool(_field(config.checkpoint, "fallback", True))
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return init_fn(), {"step": 0, "data_position": 0}
  target = _with_shardings(abstract_state, state_shardings)
  moved = []
  for step in steps:
    where = f"checkpoint step {step} ({step_directory(manager, step)})"
    code, cause, state, meta = _OK, None, None, None
    try:  # This process's part: the meta, the config check, its shards.
      meta = _with_retries(lambda: read_meta(manager, step), where)  # pylint: disable=cell-var-from-loop
      if "config" in meta and config is not None:
        diffs = config_mismatches(meta["config"], config)
        if diffs:
          code, cause = _REFUSED, (
              f"The checkpoint at {step_directory(manager, step)} was written with a different "
              f"config; differing fields: " + "; ".join(diffs) + ". Use a new --workdir, or "
              "resume with the checkpoint's values.")
      if code == _OK:
        state = _with_retries(lambda: _read_state(manager, step, target), where)  # pylint: disable=cell-var-from-loop
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise
      code, cause = _DAMAGED, _short(f"{e}" if isinstance(e, DamagedCheckpoint) else _chain(e))
    agreed = _all_processes_agree(code)
    if agreed == _REFUSED:
      raise errors.UserError(cause or f"{where}: refused on another process (config mismatch).")
    if agreed == _OK:
      try:
        verify(state, meta, where)  # Global checksums: every process gets the same answer.
      except DamagedCheckpoint as e:
        agreed, cause = _DAMAGED, str(e)
    if agreed == _OK:
      if int(meta.get("step", step)) != step:
        raise errors.UserError(f"{where}: meta['step']={meta['step']} differs from its step.")
      if moved:
        logging.warning("Resuming from checkpoint step %d; damaged steps %s are in %s.", step,
                        moved, epath.Path(manager.directory).parent / CORRUPT)
      return state, meta
    cause = cause or "damaged as read by another process"
    del state
    if not fallback:
      raise errors.UserError(
          f"{where} is damaged: {cause}. config.checkpoint.fallback=False: stopping. Move the "
          "step aside (or set --config.checkpoint.fallback=True) to resume from the previous "
          "one.")
    logging.error("Checkpoint step %d is damaged (%s); moving it to %s and trying the previous "
                  "step.", step, cause, epath.Path(manager.directory).parent / CORRUPT / str(step))
    if jax.process_index() == 0:
      move_aside(manager, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"dit_jax: moved aside damaged step {step}")
    moved.append(step)
    manager.reload()
  raise errors.UserError(
      f"Every checkpoint in {manager.directory} is damaged (steps {moved}, moved to "
      f"{epath.Path(manager.directory).parent / CORRUPT}); rerunning starts from scratch.")


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


def load_params_on_host(workdir: str, step: int | None = None,
                        key: str = "ema_params") -> tuple[PyTree, dict, int]:
  """Only `state.<key>` (e.g. the EMA parameters) of a checkpoint, as numpy: (tree, meta, step).

  Like `load_on_host`, read-only (no lock, nothing written), but the optimizer state and the
  other parameter copy are never read: a sampler of DiT-XL/2 reads 2.7 GB, not 10.8 GB.
  """
  directory = checkpoint_directory(workdir)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  manager = ocp.CheckpointManager(
      directory, options=options,
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"No finalized checkpoint {'' if step is None else step} in "
                            f"{directory} (saved steps: {sorted(manager.all_steps())}).")
  tree = manager.item_metadata(step)[STATE].tree
  if key not in tree:
    raise KeyError(f"checkpoint {directory / str(step)} has no {key!r}; it has {sorted(tree)}")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree[key])}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True),
      META: ocp.args.JsonRestore()}))
  manager.close()
  return jax.tree.map(np.asarray, restored[STATE][key]), dict(restored[META]), int(step)
