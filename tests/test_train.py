"""A real train step on CPU, the EMA rule, the optimizer options, a plugged-in latent encoder
and the stop on a non-finite loss (keeping the last good checkpoint)."""

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import load_config
from dit_jax import checkpointing
from dit_jax import diffusion as dd
from dit_jax import input_pipeline
from dit_jax import sharding
from dit_jax import train
from dit_jax import train_state as ts
from dit_jax.errors import UserError


def test_train_steps_reduce_loss_and_update_ema():
  config = load_config()
  config.ema.decay = 0.5
  config.optimizer.learning_rate = 1e-2
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = train.build_model(config.model)
  diffusion = train.create_diffusion(config.diffusion)
  tx, schedule = ts.create_optimizer(config.optimizer)
  init_fn, abstract, shardings = train.setup_state(config, model, tx, mesh, (8, 8, 1))
  state = init_fn()
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  params0 = jax.device_get(state.params)

  source = input_pipeline.create_source(config.data, split="train")
  batch = next(input_pipeline.make_iterator(source, config.data, global_batch_size=16,
                                            process_index=0, process_count=1, seed=0))
  batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))

  # A fixed evaluation of the training loss (fixed t and noise, no label dropout).
  t = jax.random.randint(jax.random.key(1), (16,), 0, diffusion.num_timesteps)
  noise = jax.random.normal(jax.random.key(2), batch["image"].shape)

  def eval_loss(params):
    fn = lambda x, ts_: model.apply({"params": params}, x, ts_, batch["label"])
    return float(jnp.mean(dd.training_losses(diffusion, fn, batch["image"], t, noise)["loss"]))

  step_fn = train.jit_train_step(config, model, diffusion, tx, schedule, mesh, shardings)
  rng = jax.random.key(0)
  state, metrics = step_fn(state, batch, rng)
  params1 = jax.device_get(state.params)
  # EMA starts at the parameters and is updated after the step: 0.5 * p0 + 0.5 * p1.
  for e, p0, p1 in zip(jax.tree.leaves(jax.device_get(state.ema_params)),
                       jax.tree.leaves(params0), jax.tree.leaves(params1)):
    np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-6, atol=1e-7)
  assert int(state.step) == 1
  assert set(metrics) == {"train/loss", "train/mse", "train/vb", "train/grad_norm", "train/lr"}
  assert all(np.isfinite(float(v)) for v in metrics.values())
  np.testing.assert_allclose(float(metrics["train/loss"]),
                             float(metrics["train/mse"]) + float(metrics["train/vb"]), rtol=1e-5)

  before = eval_loss(params0)
  for _ in range(7):
    state, metrics = step_fn(state, batch, rng)
  after = eval_loss(state.params)
  assert after < 0.8 * before, (before, after)


def test_optimizer_warmup_and_clipping():
  config = load_config()
  config.optimizer.warmup_steps = 4
  config.optimizer.grad_clip_norm = 1e-3
  tx, schedule = ts.create_optimizer(config.optimizer)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 3, 10)],
                             [2.5e-4, 5e-4, 1e-3, 1e-3])
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, 4.0, 0.0])}  # Norm 5, clipped to 1e-3.
  updates, _ = tx.update(grads, state, params)
  # Adam's first step is -lr * sign(g) whatever the scale; clipping shows in the moments.
  np.testing.assert_allclose(updates["w"][:2], [-2.5e-4, -2.5e-4], rtol=1e-3)
  _, adam_state = tx.update(grads, state, params)
  mu = adam_state[1][0].mu["w"]
  np.testing.assert_allclose(mu, 0.1 * np.array([3, 4, 0]) / 5 * 1e-3, rtol=1e-5)
  config.optimizer.grad_clip_norm = -1.0
  with pytest.raises(ValueError, match="grad_clip_norm"):
    ts.create_optimizer(config.optimizer)


def test_learning_rate_warmup_then_cosine_decay():
  """lr(s) = lr min(1, (s + 1) / W) (1 + cos(pi clip((s - W) / (D - W), 0, 1))) / 2, written out
  here; 0 from step D on. Without decay the warmup holds lr."""
  config = load_config()
  opt = config.optimizer
  opt.learning_rate, opt.warmup_steps, opt.cosine_decay_steps = 2.0, 3, 7
  schedule = ts.learning_rate_schedule(opt)
  steps = np.arange(10)
  warm = np.minimum(1.0, (steps + 1) / 3)
  cosine = 0.5 * (1 + np.cos(np.pi * np.clip((steps - 3) / 4, 0.0, 1.0)))
  np.testing.assert_allclose([float(schedule(s)) for s in steps], 2.0 * warm * cosine,
                             rtol=1e-6, atol=1e-7)
  opt.warmup_steps = 0  # Decay from step 0, no warmup.
  np.testing.assert_allclose([float(ts.learning_rate_schedule(opt)(s)) for s in (0, 7, 9)],
                             [2.0, 0.0, 0.0], atol=1e-7)
  opt.cosine_decay_steps = 1
  np.testing.assert_allclose([float(ts.learning_rate_schedule(opt)(s)) for s in (0, 1)],
                             [2.0, 0.0], atol=1e-7)
  # A config written before cosine_decay_steps existed: constant.
  old = ml_collections.ConfigDict({"learning_rate": 2.0, "warmup_steps": 0})
  np.testing.assert_allclose([float(ts.learning_rate_schedule(old)(s)) for s in (0, 1, 50)],
                             [2.0, 2.0, 2.0])
  opt.warmup_steps, opt.cosine_decay_steps = 2, 0
  np.testing.assert_allclose([float(ts.learning_rate_schedule(opt)(s)) for s in (0, 1, 50)],
                             [1.0, 2.0, 2.0], rtol=1e-6)
  for field, value in (("learning_rate", 0.0), ("warmup_steps", -1), ("cosine_decay_steps", 2)):
    bad = load_config().optimizer
    bad.warmup_steps, bad.cosine_decay_steps = 2, 5
    bad[field] = value
    with pytest.raises(UserError, match=f"config.optimizer.{field} must be"):
      ts.learning_rate_schedule(bad)


def test_latent_encoder_plugs_in_and_nonfinite_loss_keeps_last_checkpoint(tmp_path):
  config = load_config()
  config.latent.encoder = "sd-vae-ft-mse"
  config.total_steps = 2
  config.logging.sample_every_steps = 0
  config.sample.final_num_samples_per_class = 1
  config.checkpoint.save_every_steps = 2
  calls = {"encode": 0, "decode": 0}

  def encode_fn(vae_params, images, rng):  # A mock "VAE": same shape, scaled, posterior noise.
    calls["encode"] += 1
    return vae_params["a"] * images + 0.01 * jax.random.normal(rng, images.shape)

  def decode_fn(vae_params, latents):
    calls["decode"] += 1
    return latents / vae_params["a"]

  with pytest.raises(UserError, match=r"config\.latent\.vae_dir"):
    train.train_and_evaluate(config, str(tmp_path))
  train.train_and_evaluate(config, str(tmp_path), encode_fn=encode_fn, decode_fn=decode_fn,
                           vae_params={"a": np.float32(0.5)})
  assert calls["encode"] >= 1 and calls["decode"] >= 1  # Traced into the step and the sampler.
  with np.load(tmp_path / "samples.npz") as z:
    assert z["arr_0"].shape == (10, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(z["arr_1"], np.arange(10))

  # Resume for 2 more steps with an encoder that returns NaN: the run stops with a clear error
  # at the next check and step 2 stays the latest (restorable) checkpoint.
  config.total_steps = 4
  nan_encode = lambda vae_params, images, rng: images * jnp.nan
  with pytest.raises(FloatingPointError, match=r"Non-finite training metrics at step 4.*step 2"):
    train.train_and_evaluate(config, str(tmp_path), encode_fn=nan_encode, decode_fn=decode_fn,
                             vae_params={"a": np.float32(0.5)})
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  assert checkpointing.latest_step(manager) == 2
  assert manager.all_steps() == [2]
  assert not any(p.name.startswith("4") for p in epath.Path(tmp_path / "checkpoints").iterdir())


def test_timestep_power_reaches_the_train_step():
  """`config.diffusion.timestep_power` changes which t the jitted step trains on: with a huge
  power every t is T - 1, so the step's vb term is the one of t = T - 1 alone."""
  def one_step_vb(power):
    config = load_config()
    config.diffusion.timestep_power = power
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model = train.build_model(config.model)
    diffusion = train.create_diffusion(config.diffusion)
    tx, schedule = ts.create_optimizer(config.optimizer)
    init_fn, _, shardings = train.setup_state(config, model, tx, mesh, (8, 8, 1))
    source = input_pipeline.create_source(config.data, split="train")
    batch = next(input_pipeline.make_iterator(source, config.data, global_batch_size=16,
                                              process_index=0, process_count=1, seed=0))
    batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    step_fn = train.jit_train_step(config, model, diffusion, tx, schedule, mesh, shardings)
    _, metrics = step_fn(init_fn(), batch, jax.random.key(0))
    return float(metrics["train/vb"]), diffusion, batch

  vb_uniform, _, _ = one_step_vb(0.0)
  vb_last, diffusion, batch = one_step_vb(1e9)
  # At initialisation the model outputs zeros (adaLN-Zero), so vb at t = T - 1 does not
  # depend on the parameters' values: compute it directly.
  t = jnp.full((16,), diffusion.num_timesteps - 1)
  zeros = lambda x, ts_: jnp.zeros(x.shape[:-1] + (2 * x.shape[-1],))  # noqa: E731
  k_noise = jax.random.split(jax.random.fold_in(jax.random.key(0), 0), 4)[1]  # As the step.
  noise = jax.random.normal(k_noise, batch["image"].shape, jnp.float32)
  want = float(jnp.mean(dd.training_losses(diffusion, zeros, batch["image"], t, noise)["vb"]))
  np.testing.assert_allclose(vb_last, want, rtol=1e-4)
  assert abs(vb_uniform - want) > 0.1 * abs(want), (vb_uniform, want)
