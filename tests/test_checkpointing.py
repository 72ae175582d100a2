"""Tests of dit_jax.checkpointing on a toy TrainState-like pytree and 8 simulated CPU devices.

Proves: bit-exact save/restore round trips; restoring into a different mesh or device count
(8-way FSDP <-> replicated, 2x4, one device); the keep policy (last K plus milestones) and save
cadence; the config check on resume; and that a process SIGKILLed during a save (async or
sync) leaves the previous checkpoint as the latest, restorable one.
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from dit_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState


def _toy_state(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
                "bias": jnp.asarray(rng.standard_normal((24,)), jnp.float32)},
      "embed": {"embedding": jnp.asarray(rng.standard_normal((11, 8)), jnp.bfloat16)},
      "scalar": jnp.asarray(rng.standard_normal(()), jnp.float32),
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # Non-trivial optimizer moments, so the round trip is checked on real values.
  opt_state = jax.tree.map(
      lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else x + 7, opt_state)
  ema = jax.tree.map(lambda x: x * 0.5, params)
  return ToyState(step=jnp.asarray(7, jnp.int32), params=params, ema_params=ema,
                  opt_state=opt_state)


def _mesh(kind):
  devices = jax.devices()
  if kind == "one":
    return jax.make_mesh((1,), ("data",), devices=devices[:1])
  if kind == "2x4":
    return jax.make_mesh((2, 4), ("data", "fsdp"))
  return jax.make_mesh((8,), ("fsdp",))


def _shardings(tree, kind):
  """Per-leaf NamedShardings: 'fsdp8' shards the first divisible axis 8 ways, '2x4' shards two
  axes, 'replicated' / 'one' replicate (on 8 devices / on one device)."""
  mesh = _mesh(kind)

  def leaf(x):
    spec = [None] * x.ndim
    if kind == "fsdp8":
      for i, d in enumerate(x.shape):
        if d % 8 == 0:
          spec[i] = "fsdp"
          break
    elif kind == "2x4" and x.ndim == 2 and x.shape[0] % 2 == 0 and x.shape[1] % 4 == 0:
      spec = ["data", "fsdp"]
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(leaf, tree)


def _config(**model):
  config = ml_collections.ConfigDict()
  config.model = dict(variant="S/2", hidden_size=64, depth=2, dtype="float32",
                      param_dtype="float32", attention_impl="xla")
  config.model.update(model)
  config.diffusion = dict(noise_schedule="linear", diffusion_steps=1000, learn_sigma=True)
  config.checkpoint = dict(save_every_steps=1, max_to_keep=3, keep_every_steps=0,
                           async_save=False)
  return config


def _meta(step, config, data_position=0):
  return {"step": step, "data_position": data_position,
          "config": checkpointing.config_to_json(config)}


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("use_async", [False, True])
def test_round_trip_bit_exact(tmp_path, use_async):
  config = _config()
  config.checkpoint.async_save = use_async
  state = _toy_state()
  shardings = _shardings(state, "fsdp8")
  state = jax.device_put(state, shardings)
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  assert checkpointing.save(manager, 7, state, _meta(7, config, data_position=56))
  checkpointing.wait(manager)
  assert checkpointing.latest_step(manager) == 7
  assert (tmp_path / "checkpoints" / "7" / "state").is_dir()

  fresh = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  abstract = jax.eval_shape(lambda: state)
  restored, meta = checkpointing.restore_or_init(
      fresh, abstract, shardings, init_fn=lambda: pytest.fail("init on resume"), config=config)
  _assert_trees_equal(restored, state)
  assert isinstance(restored, ToyState)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, restored, shardings)))
  assert meta["step"] == 7 and meta["data_position"] == 56
  assert checkpointing.config_mismatches(meta["config"], config) == []

  # The same arrays read onto the host without a target (as tools and tests do).
  on_host, host_meta = checkpointing.load_on_host(str(tmp_path))
  assert host_meta == meta
  np.testing.assert_equal(on_host["params"], jax.tree.map(np.asarray, state.params))
  np.testing.assert_equal(on_host["ema_params"], jax.tree.map(np.asarray, state.ema_params))
  assert int(on_host["step"]) == 7


@pytest.mark.parametrize("save_on,restore_on", [
    ("fsdp8", "replicated"), ("fsdp8", "2x4"), ("fsdp8", "one"),
    ("replicated", "fsdp8"), ("2x4", "fsdp8"), ("one", "fsdp8"),
])
def test_restore_on_another_mesh(tmp_path, save_on, restore_on):
  config = _config()
  state = jax.device_put(_toy_state(1), _shardings(_toy_state(1), save_on))
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  checkpointing.save(manager, 3, state, _meta(3, config))
  checkpointing.wait(manager)

  new_shardings = _shardings(jax.eval_shape(lambda: state), restore_on)
  # An abstract state without shardings (jax.eval_shape) plus the new mesh's shardings.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          jax.eval_shape(lambda: state))
  restored, _ = checkpointing.restore_or_init(
      checkpointing.create_manager(str(tmp_path), config.checkpoint), abstract, new_shardings,
      init_fn=lambda: pytest.fail("init on resume"), config=config)
  _assert_trees_equal(restored, state)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(new_shardings)):
    assert x.sharding == s, (x.sharding, s)


def test_fresh_start_calls_init(tmp_path):
  config = _config()
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  assert checkpointing.latest_step(manager) is None
  state, meta = checkpointing.restore_or_init(manager, None, None, lambda: "fresh", config)
  assert state == "fresh" and meta == {"step": 0, "data_position": 0}


def test_keep_last_k_and_milestones(tmp_path):
  config = _config()
  config.checkpoint.update(save_every_steps=2, max_to_keep=2, keep_every_steps=4)
  state = _toy_state()
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  saved = [s for s in range(1, 15) if checkpointing.save(manager, s, state, _meta(s, config))]
  assert saved == [2, 4, 6, 8, 10, 12, 14]  # Cadence: multiples of save_every_steps.
  assert checkpointing.save(manager, 15, state, _meta(15, config), force=True)
  assert not checkpointing.save(manager, 15, state, _meta(15, config), force=True)
  checkpointing.wait(manager)
  # Last 2 (14, 15) plus milestones every 4 steps.
  assert manager.all_steps() == [4, 8, 12, 14, 15]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [4, 8, 12, 14, 15]


@pytest.mark.parametrize("field,value,match", [
    ("save_every_steps", 0, "save_every_steps must be > 0"),
    ("max_to_keep", 0, "max_to_keep must be > 0"),
    ("keep_every_steps", 3, "keep_every_steps=3 must be 0 .* multiple of .*save_every_steps=2"),
])
def test_bad_checkpoint_config(tmp_path, field, value, match):
  section = dict(save_every_steps=2, max_to_keep=2, keep_every_steps=4, async_save=False)
  section[field] = value
  with pytest.raises(ValueError, match=match):
    checkpointing.create_manager(str(tmp_path), section)


def test_meta_is_checked(tmp_path):
  config = _config()
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  with pytest.raises(ValueError, match="data_position"):
    checkpointing.save(manager, 1, _toy_state(), {"step": 1, "config": "{}"})
  with pytest.raises(ValueError, match="differs"):
    checkpointing.save(manager, 1, _toy_state(), _meta(2, config))


def test_config_mismatch_names_fields(tmp_path):
  config = _config()
  state = _toy_state()
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  checkpointing.save(manager, 1, state, _meta(1, config))
  checkpointing.wait(manager)
  abstract = jax.eval_shape(lambda: state)

  other = _config(depth=3)
  other.diffusion.noise_schedule = "cosine"
  with pytest.raises(ValueError) as err:
    checkpointing.restore_or_init(manager, abstract, _shardings(abstract, "fsdp8"),
                                  lambda: None, other)
  assert "model.depth: checkpoint 2 != config 3" in str(err.value)
  assert "diffusion.noise_schedule: checkpoint 'linear' != config 'cosine'" in str(err.value)
  assert "hidden_size" not in str(err.value)

  # A checkpoint written before a diffusion field existed matches that field's old behaviour.
  saved = _config().to_dict()
  for key in ("snr_shift", "min_snr_gamma"):
    saved["diffusion"].pop(key, None)
  current = _config()
  current.diffusion.snr_shift, current.diffusion.min_snr_gamma = 1.0, None
  assert checkpointing.config_mismatches(saved, current) == []
  current.diffusion.snr_shift = 4.0
  assert checkpointing.config_mismatches(saved, current) == [
      "diffusion.snr_shift: checkpoint 1.0 != config 4.0"]

  # Compute-only fields (e.g. moving from GPU to TPU attention kernels) may change on resume.
  compute = _config(dtype="bfloat16", attention_impl="cudnn")
  restored, _ = checkpointing.restore_or_init(manager, abstract, _shardings(abstract, "fsdp8"),
                                              lambda: None, compute)
  _assert_trees_equal(restored, state)


_KILL_CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dit_jax import checkpointing

    workdir, mode = sys.argv[1], sys.argv[2]
    manager = checkpointing.create_manager(workdir, dict(
        save_every_steps=1, max_to_keep=3, keep_every_steps=0, async_save=(mode == "async")))
    sharding = NamedSharding(jax.make_mesh((8,), ("fsdp",)), P("fsdp"))
    def state(v):  # 64 MiB, so that writing it takes a while.
      return {"w": jax.device_put(jnp.full((16384, 1024), v, jnp.float32), sharding),
              "step": jnp.asarray(int(v), jnp.int32)}
    meta = lambda s: {"step": s, "data_position": 10 * s, "config": "{}"}
    checkpointing.save(manager, 1, state(1.0), meta(1))
    checkpointing.wait(manager)
    second = state(2.0)
    jax.block_until_ready(second)
    def written():  # Files so far in the step-2 temporary directory, or None.
      root = os.path.join(workdir, "checkpoints")
      tmp = [p for p in os.listdir(root) if p.startswith("2.orbax-checkpoint-tmp")]
      if not tmp:
        return None
      return [f for d in tmp for _, _, fs in os.walk(os.path.join(root, d)) for f in fs]
    if mode.startswith("sync"):
      # Kill from another thread while the synchronous save is running: as soon as the step-2
      # temporary directory exists ("sync-dir"), or once array data is in it ("sync-data").
      def killer():
        while True:
          files = written()
          if files is not None and (mode == "sync-dir" or any(len(f) == 32 for f in files)):
            os.kill(os.getpid(), signal.SIGKILL)
          time.sleep(0.0002)
      threading.Thread(target=killer, daemon=True).start()
    checkpointing.save(manager, 2, second, meta(2))
    # Async: save() has returned and the write goes on in the background; die now.
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("mode", ["async", "sync-dir", "sync-data"])
def test_killed_during_save_keeps_previous_checkpoint(tmp_path, mode):
  proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(tmp_path), mode], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  entries = sorted(os.listdir(tmp_path / "checkpoints"))
  interrupted = any("orbax-checkpoint-tmp" in e for e in entries)
  if mode in ("async", "sync-dir"):
    # The step-2 write was cut short: only its temporary directory exists. ("sync-data" kills
    # once array data is written; on a loaded machine the save may just have finished.)
    assert interrupted and "2" not in entries, entries

  manager = checkpointing.create_manager(
      str(tmp_path), dict(save_every_steps=1, max_to_keep=3, keep_every_steps=0,
                          async_save=False))
  latest = checkpointing.latest_step(manager)
  assert latest == (1 if interrupted else 2), (latest, entries)
  sharding = NamedSharding(_mesh("fsdp8"), P("fsdp"))
  abstract = {"w": jax.ShapeDtypeStruct((16384, 1024), jnp.float32, sharding=sharding),
              "step": jax.ShapeDtypeStruct((), jnp.int32,
                                           sharding=NamedSharding(_mesh("fsdp8"), P()))}
  restored, meta = checkpointing.restore_or_init(manager, abstract, None, lambda: None, None)
  assert meta["step"] == latest and meta["data_position"] == 10 * latest
  assert int(restored["step"]) == latest
  assert np.array_equal(np.asarray(restored["w"]), np.full((16384, 1024), latest, np.float32))
  # The stale temporary directory is cleaned up and the step can be saved again.
  assert not any("orbax-checkpoint-tmp" in e for e in os.listdir(tmp_path / "checkpoints"))
  if latest == 1:
    assert checkpointing.save(manager, 2, restored, {"step": 2, "data_position": 20,
                                                     "config": "{}"})
    checkpointing.wait(manager)
    assert checkpointing.latest_step(manager) == 2
