"""The device mesh and the shardings of the train state and the batch.

This module owns the one `jax.sharding.Mesh` of a run (axes ("data", "fsdp"), sizes from
`config.mesh`) and is the only place that asks `jax.devices()`.

Layout:
  * batch: split over both axes, `PartitionSpec(("data", "fsdp"))`: every device computes on
    G / (data * fsdp) examples (FSDP is data parallelism whose parameters are sharded).
  * state, strategy "fsdp": each parameter / optimizer leaf is split along its largest
    dimension divisible by the fsdp size (ties: the later dimension); leaves with no such
    dimension (scalars, biases of odd size) are replicated. XLA all-gathers the parameters
    for the forward/backward pass and reduce-scatters the gradients.
  * state, strategy "replicated": every leaf on every device (plain data parallelism).

Axis types: `jax.make_mesh` makes Explicit axes by default in this JAX version, under which
shardings become part of array types and jit in/out shardings must agree with them. We train
with `jax.jit(in_shardings=..., out_shardings=...)` and let XLA's partitioner (GSPMD /
Shardy) place the intermediate values, which is what `AxisType.Auto` means; so both axes are
created Auto.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dit_jax import errors

PyTree = Any

AXES = ("data", "fsdp")
STRATEGIES = ("fsdp", "replicated")


def _get(section, name, default=None):
  value = section.get(name, default) if hasattr(section, "get") else getattr(section, name,
                                                                              default)
  return default if value is None else value


def set_num_cpu_devices(config_mesh) -> None:
  """Splits the host CPU into `config.mesh.num_cpu_devices` devices (None: JAX's default).

  Must run before anything initialises a JAX backend. Only CPU devices change: on a GPU or
  TPU host the accelerators stay the default devices. On a CPU, N devices run their shards of
  the batch concurrently, which can use the cores better than one device's intra-op threads
  for small models (measured on 2 cores: 8% faster at batch 32, 24% at 64, nothing at 16).
  As many devices as cores can stall: once, 2 devices on 2 cores hung in an all-reduce
  (XLA:CPU aborts after its 40 s rendezvous timeout), so the digits demo keeps 1.
  """
  value = _get(config_mesh, "num_cpu_devices")
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise errors.UserError(f"config.mesh.num_cpu_devices={value!r}: must be a positive integer "
                     "or None (JAX's default).")
  jax.config.update("jax_num_cpu_devices", value)


def mesh_shape(config_mesh, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `config.mesh` for `num_devices` devices; one size may be -1."""
  sizes = [int(_get(config_mesh, axis, -1 if axis == "data" else 1)) for axis in AXES]
  if sizes.count(-1) > 1:
    raise errors.UserError(f"config.mesh: at most one of data, fsdp may be -1, got data={sizes[0]}, "
                     f"fsdp={sizes[1]}.")
  for axis, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise errors.UserError(f"config.mesh.{axis}={size}: must be a positive size or -1 (the rest).")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise errors.UserError(f"config.mesh: {num_devices} devices are not divisible by "
                       f"{' x '.join(f'{a}={s}' for a, s in zip(AXES, sizes) if s != -1)}.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise errors.UserError(f"config.mesh: data={sizes[0]} x fsdp={sizes[1]} = {np.prod(sizes)} "
                     f"devices, but {num_devices} devices are available (use -1 for the rest).")
  return sizes[0], sizes[1]


def make_mesh(config_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp") mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config_mesh, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def num_data_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (data * fsdp)."""
  return int(np.prod([mesh.shape[a] for a in AXES]))


def check_global_batch(global_batch_size: int, mesh: Mesh, process_count: int = 1) -> None:
  """Raises UserError unless the global batch splits evenly over the devices and processes."""
  shards = num_data_shards(mesh)
  if global_batch_size <= 0:
    raise errors.UserError(f"config.global_batch_size={global_batch_size} must be > 0.")
  if global_batch_size % shards:
    raise errors.UserError(
        f"config.global_batch_size={global_batch_size} is not divisible by the number of "
        f"data-parallel shards {shards} (mesh data={mesh.shape['data']} x "
        f"fsdp={mesh.shape['fsdp']}).")
  if global_batch_size % process_count:
    raise errors.UserError(f"config.global_batch_size={global_batch_size} is not divisible by the "
                     f"number of processes {process_count}.")


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """PartitionSpec sharding the largest dimension divisible by `fsdp_size` along "fsdp"."""
  if fsdp_size <= 1 or not shape:
    return P()
  # Stable sort by size, largest first; among equal sizes prefer the later dimension
  # (e.g. the output features of a square Dense kernel).
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for i in order:
    if shape[i] % fsdp_size == 0 and shape[i] >= fsdp_size:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: PyTree, mesh: Mesh, strategy: str = "fsdp") -> PyTree:
  """NamedShardings for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""
  if strategy not in STRATEGIES:
    raise errors.UserError(f"config.mesh.strategy={strategy!r}; expected one of {STRATEGIES}.")
  fsdp_size = mesh.shape["fsdp"] if strategy == "fsdp" else 1
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size)),
                      abstract_state)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dimension split over ("data", "fsdp")."""
  return NamedSharding(mesh, P(AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles each process's numpy slice into global jax.Arrays (batch dim concatenated).

  Process p holds rows [p * L, (p + 1) * L) of the global batch (see input_pipeline); with the
  batch sharding above and JAX's process-contiguous device order, those rows land on p's
  devices, so nothing crosses hosts.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
