"""Mesh construction, FSDP layout, and sharding transparency on 8 simulated CPU devices."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import load_config
from dit_jax import input_pipeline
from dit_jax import sharding
from dit_jax import train
from dit_jax import train_state as ts


def mesh_config(data, fsdp):
  return load_config("testing", mesh__data=data, mesh__fsdp=fsdp).mesh


def test_mesh_shape_fills_minus_one_and_checks_device_count():
  assert sharding.mesh_shape(mesh_config(-1, 1), 8) == (8, 1)
  assert sharding.mesh_shape(mesh_config(2, -1), 8) == (2, 4)
  assert sharding.mesh_shape(mesh_config(1, 1), 1) == (1, 1)
  with pytest.raises(ValueError, match="data=2 x fsdp=2 = 4 devices, but 8"):
    sharding.mesh_shape(mesh_config(2, 2), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(mesh_config(3, -1), 8)
  mesh = sharding.make_mesh(mesh_config(2, -1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("value", [0, -2, 1.5, "2", True])
def test_num_cpu_devices_rejects_non_positive_integers(value):
  with pytest.raises(ValueError, match=rf"config.mesh.num_cpu_devices={value!r}"):
    sharding.set_num_cpu_devices({"num_cpu_devices": value})


def test_num_cpu_devices_splits_the_cpu_before_the_backend_starts():
  # A fresh interpreter: in this one the backend already exists (8 devices from conftest).
  code = ("import jax; from dit_jax import sharding; "
          "sharding.set_num_cpu_devices({'num_cpu_devices': 3}); print(jax.device_count())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       check=True).stdout
  assert out.split()[-1] == "3"  # Wins over the environment's XLA_FLAGS device count.
  sharding.set_num_cpu_devices({"num_cpu_devices": None})  # None: leaves JAX alone (no error).


def test_fsdp_spec_shards_largest_divisible_axis():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((32, 128), 4) == P(None, "fsdp")
  assert sharding.fsdp_spec((128, 32), 4) == P("fsdp", None)
  assert sharding.fsdp_spec((6, 4), 4) == P(None, "fsdp")   # 6 is not divisible by 4.
  assert sharding.fsdp_spec((3, 5), 4) == P()
  assert sharding.fsdp_spec((), 4) == P()
  assert sharding.fsdp_spec((32, 32), 1) == P()


def test_global_batch_not_divisible_names_both_numbers():
  mesh = sharding.make_mesh(mesh_config(2, 4))
  with pytest.raises(ValueError, match=r"global_batch_size=20 is not divisible by the number "
                                       r"of data-parallel shards 8"):
    sharding.check_global_batch(20, mesh)


def _run(config, mesh, batches, num_steps):
  """num_steps train steps on `mesh`; returns (losses, host params, host ema, state)."""
  model = train.build_model(config.model)
  diffusion = train.create_diffusion(config.diffusion)
  tx, schedule = ts.create_optimizer(config.optimizer)
  input_shape = (8, 8, 1)
  init_fn, _, shardings = train.setup_state(config, model, tx, mesh, input_shape)
  state = init_fn()
  # Every leaf is created in its sharding (not on one device and moved by the first step).
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    assert leaf.sharding == want, (leaf.sharding, want)
  step_fn = train.jit_train_step(config, model, diffusion, tx, schedule, mesh, shardings)
  rng = jax.random.key(config.seed)
  losses = []
  for batch in batches[:num_steps]:
    state, m = step_fn(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)), rng)
    losses.append(float(m["train/loss"]))
  return losses, jax.device_get(state.params), jax.device_get(state.ema_params), state


def test_replicated_strategy_replicates_the_whole_state():
  """config.mesh.strategy reaches the state's shardings: 'replicated' keeps every leaf whole
  on a data=2 x fsdp=4 mesh, where 'fsdp' splits the large kernels."""
  specs = {}
  for strategy in ("replicated", "fsdp"):
    config = load_config("testing", mesh__data=2, mesh__fsdp=4, mesh__strategy=strategy)
    model = train.build_model(config.model)
    tx, _ = ts.create_optimizer(config.optimizer)
    _, abstract, shardings = train.setup_state(config, model, tx,
                                               sharding.make_mesh(config.mesh), (8, 8, 1))
    assert jax.tree.structure(abstract) == jax.tree.structure(shardings)
    specs[strategy] = {s.spec for s in jax.tree.leaves(shardings)}
  assert specs["replicated"] == {jax.sharding.PartitionSpec()}
  assert jax.sharding.PartitionSpec(None, "fsdp") in specs["fsdp"]


def test_data_parallel_and_fsdp_match_one_device():
  config = load_config("testing", optimizer__learning_rate=1e-2)
  source = input_pipeline.create_source(config.data, split="train")
  it = input_pipeline.make_iterator(source, config.data, global_batch_size=16, process_index=0,
                                    process_count=1, seed=0)
  batches = [next(it) for _ in range(3)]
  devices = jax.devices()
  assert len(devices) == 8, "conftest must set --xla_force_host_platform_device_count=8"

  ref = _run(config, sharding.make_mesh(mesh_config(1, 1), devices[:1]), batches, 3)
  runs = {
      "data=8": _run(config, sharding.make_mesh(mesh_config(8, 1)), batches, 3),
      "data=2,fsdp=4": _run(config, sharding.make_mesh(mesh_config(2, 4)), batches, 3),
  }
  for name, (losses, params, ema, _) in runs.items():
    np.testing.assert_allclose(losses, ref[0], rtol=2e-6, err_msg=name)  # observed 2.1e-7
    for tree, ref_tree in ((params, ref[1]), (ema, ref[2])):
      for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  assert ref[0][-1] < ref[0][0]

  # Under FSDP the parameters and the Adam moments are really split over the 4 fsdp devices.
  state = runs["data=2,fsdp=4"][3]
  kernel = state.params["blocks_0"]["mlp"]["fc1"]["kernel"]  # (32, 128)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert kernel.addressable_shards[0].data.shape == (32, 32)
  mu = state.opt_state[0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.addressable_shards[0].data.shape == (32, 32)
  # Under data parallelism they are replicated.
  kernel = runs["data=8"][3].params["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (32, 128)
