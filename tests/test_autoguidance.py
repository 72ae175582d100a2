"""Autoguidance: the guided function, the sampler path, the config checks and the kept guide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, perturbed_params
from dit_jax.errors import UserError
from dit_jax import checkpointing
from dit_jax import diffusion as dd
from dit_jax import sampling
from dit_jax import sharding
from dit_jax import train


def _fake(offset):
  def fn(x, t, y):  # 2C channels: "eps" then "variance values", different per model.
    base = jnp.tanh(x + 0.001 * t[:, None, None, None] + 0.1 * y[:, None, None, None] + offset)
    return jnp.concatenate([base, -base * (1 + offset)], axis=-1)
  return fn


def test_autoguidance_extrapolates_eps_and_keeps_the_models_variance():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  t = jnp.array([0, 500, 999])
  y = jnp.array([1, 2, 3])
  good, bad = _fake(0.0), _fake(0.3)
  out = dd.autoguidance(good, bad, 1.7)(x, t, y)
  g, b = good(x, t, y), bad(x, t, y)
  np.testing.assert_allclose(out[..., :2], b[..., :2] + 1.7 * (g[..., :2] - b[..., :2]),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[..., 2:], g[..., 2:])
  np.testing.assert_allclose(dd.autoguidance(good, bad, 1.0)(x, t, y), g, atol=1e-6)
  # Composes with classifier-free guidance: the unconditional half is autoguided too.
  both = dd.classifier_free_guidance(dd.autoguidance(good, bad, 1.7), 2.0, null_label=10)(x, t, y)
  ag = dd.autoguidance(good, bad, 1.7)
  cond, uncond = ag(x, t, y), ag(x, t, jnp.full_like(y, 10))
  np.testing.assert_allclose(both[..., :2],
                             uncond[..., :2] + 2.0 * (cond[..., :2] - uncond[..., :2]),
                             rtol=1e-5, atol=1e-5)


def _model_and_two_param_sets(config):
  model = train.build_model(config.model)
  return model, perturbed_params(model, 0), perturbed_params(model, 2)


def test_one_step_autoguided_sample_is_the_extrapolation_of_the_two_models():
  """With one DDPM step (t = 0 adds no noise) the sample is affine in eps, hence in the scale."""
  config = load_config()
  model, params, guide = _model_and_two_param_sets(config)
  diff = dd.create_diffusion("1", noise_schedule="linear")
  labels = jnp.arange(4, dtype=jnp.int32)
  run = lambda p, g, s: sampling.sample(
      p, labels, jax.random.PRNGKey(5), model=model, diff=diff, cfg_scale=1.0,
      guidance_mode="all", sampler="ddpm", clip_denoised=False, latent_shape=(8, 8, 1),
      decode_fn=None, guide_params=g, autoguidance_scale=s)
  x_model, x_guide = run(params, None, 1.0), run(guide, None, 1.0)
  assert float(jnp.abs(x_model - x_guide).max()) > 1e-3
  np.testing.assert_allclose(run(params, guide, 1.8), x_guide + 1.8 * (x_model - x_guide),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="needs guide_params"):
    run(params, None, 1.8)


def test_sampler_with_the_model_as_its_own_guide_is_unguided():
  config = load_config()
  config.sample.cfg_scale = 1.0
  model, params, _ = _model_and_two_param_sets(config)
  mesh = sharding.make_mesh(config.mesh)
  labels = np.arange(10, dtype=np.int32)
  plain = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=10)(params, labels, 3)
  config.sample.autoguidance_scale = 1.5
  guided = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=10)
  np.testing.assert_array_equal(guided(params, labels, 3, guide_params=params), plain)
  with pytest.raises(ValueError, match=r"config\.sample\.autoguidance_scale=1.5 needs"):
    guided(params, labels, 3)
  # Grids during training sample the EMA model alone.
  grid_sampler = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=10,
                                  autoguided=False)
  np.testing.assert_array_equal(grid_sampler(params, labels, 3), plain)


@pytest.mark.parametrize("step", [None, 0, 8, 9, 3])
def test_autoguidance_step_must_be_a_saved_step_before_the_end(step):
  config = load_config()
  config.sample.autoguidance_scale = 1.3
  config.sample.autoguidance_step = step
  with pytest.raises(ValueError, match=rf"config\.sample\.autoguidance_step={step}.*"
                                       r"config\.total_steps=8.*save_every_steps=2"):
    sampling.autoguidance_step(config.sample, 8, 2)
  if step == 3:  # Saved when checkpoints are written every step.
    assert sampling.autoguidance_step(config.sample, 8, 1) == 3
  config.sample.autoguidance_step = 4
  assert sampling.autoguidance_step(config.sample, 8, 2) == 4
  config.sample.autoguidance_scale = 1.0
  assert sampling.autoguidance_step(config.sample, 8, 2) is None
  config.sample.autoguidance_scale = float("nan")
  with pytest.raises(ValueError, match=r"config\.sample\.autoguidance_scale=nan"):
    sampling.autoguidance_step(config.sample, 8, 2)


def test_autoguidance_is_off_when_the_scale_is_none_and_may_use_step_one():
  config = load_config()
  config.sample.autoguidance_scale = None  # A placeholder left unset: no autoguidance.
  assert sampling.autoguidance_scale(config.sample) == 1.0
  assert sampling.autoguidance_step(config.sample, 8, 2) is None
  config.sample.autoguidance_scale, config.sample.autoguidance_step = 1.3, 1
  assert sampling.autoguidance_step(config.sample, 8, 1) == 1  # The first saved step.


def test_training_keeps_the_guide_checkpoint_and_samples_with_it(tmp_path):
  config = load_config()
  config.total_steps = 6
  config.checkpoint.max_to_keep = 1
  config.logging.sample_every_steps = 0
  config.sample.cfg_scale = 1.0
  config.sample.autoguidance_scale = 1.5
  config.sample.autoguidance_step = 7  # Not a saved step: fails before training.
  with pytest.raises(ValueError, match=r"config\.sample\.autoguidance_step=7"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
  config.sample.autoguidance_step = 2
  state = train.train_and_evaluate(config, str(tmp_path))
  manager = checkpointing.create_manager(str(tmp_path), config.checkpoint)
  assert manager.all_steps() == [2, 6]  # max_to_keep=1 keeps 6; the guide's step 2 is kept.
  with np.load(tmp_path / "samples.npz") as z:
    guided = z["arr_0"]
  # The same samples from the checkpoints directly.
  guide_tree, _ = checkpointing.load_on_host(str(tmp_path), 2)
  model = train.build_model(config.model)
  mesh = sharding.make_mesh(config.mesh)
  sampler = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=10)
  labels = np.arange(10, dtype=np.int32)
  again = sampler(state.ema_params, labels, int(config.sample.seed), guide_tree["ema_params"])
  # Equal up to float rounding (the run's parameters were sharded, these are on one device).
  assert np.abs(again.astype(int) - guided.astype(int)).max() <= 1
  assert np.mean(again == guided) > 0.98
  config.sample.autoguidance_scale = 1.0
  plain = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=10)(
      state.ema_params, labels, int(config.sample.seed))
  assert np.any(plain != guided)

  # A guide step that was not kept is a clear error (here: resuming with another step).
  config.sample.autoguidance_scale = 1.5
  config.sample.autoguidance_step = 4
  with pytest.raises(UserError, match=r"config\.sample\.autoguidance_step=4: no such "
                                              r"checkpoint.*\[2, 6\]"):
    train.train_and_evaluate(config, str(tmp_path))
