"""Noise designs: exact N(0, I) marginals, the ties within label groups, the sampler plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, perturbed_params
from dit_jax import diffusion as dd
from dit_jax import images
from dit_jax import sampling
from dit_jax import sharding
from dit_jax import train
from dit_jax.diffusion import noise


def _matrix(labels, design):
  """A with apply(z) = A @ z (the designs are linear in z): apply to the identity's rows."""
  n = len(labels)
  return np.asarray(noise.apply(jnp.eye(n, dtype=jnp.float32), jnp.asarray(labels), design),
                    np.float64)


LABELS = np.array([3, 1, 3, 3, 7, 1, 3, 1, 1, 3])  # groups of 5, 4 and 1, interleaved


def test_iid_is_the_identity():
  z = jax.random.normal(jax.random.PRNGKey(0), (10, 2, 2, 1))
  assert noise.apply(z, LABELS, "iid") is z


@pytest.mark.parametrize("design", ["antithetic", "centered"])
def test_every_sample_keeps_an_exact_standard_normal_and_groups_stay_independent(design):
  a = _matrix(LABELS, design)
  cov = a @ a.T  # covariance of apply(z) for z ~ N(0, I)
  np.testing.assert_allclose(np.diag(cov), 1.0, rtol=1e-6)
  same = LABELS[:, None] == LABELS[None]
  np.testing.assert_array_equal(cov[~same], 0.0)  # different labels: independent
  np.testing.assert_array_equal(a[4], np.eye(10)[4])  # the only 7 keeps its own draw


def test_centered_groups_sum_to_zero_with_the_rescaled_deviations():
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (10, 3, 2, 2)), np.float64)
  got = np.asarray(noise.apply(jnp.asarray(z, jnp.float32), LABELS, "centered"), np.float64)
  for c in (1, 3):
    g = LABELS == c
    n = g.sum()
    np.testing.assert_allclose(got[g], (z[g] - z[g].mean(0)) * np.sqrt(n / (n - 1)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[g].sum(0), 0.0, atol=1e-5)
  cov = _matrix(LABELS, "centered") @ _matrix(LABELS, "centered").T
  np.testing.assert_allclose(cov[0, 2], -1.0 / 4, rtol=1e-6)  # -1 / (n - 1), group of 5


def test_antithetic_pairs_same_label_samples_in_batch_order():
  z = jax.random.normal(jax.random.PRNGKey(2), (10, 2, 2, 1))
  got = noise.apply(z, LABELS, "antithetic")
  # Label 3 at 0, 2, 3, 6, 9: pairs (0, 2), (3, 6), 9 alone; label 1 at 1, 5, 7, 8: (1, 5), (7, 8).
  firsts = [0, 3, 1, 7, 4, 9]
  np.testing.assert_array_equal(got[np.array(firsts)], z[np.array(firsts)])
  for first, second in [(0, 2), (3, 6), (1, 5), (7, 8)]:
    np.testing.assert_array_equal(got[second], -z[first])


def test_bad_design_names_the_field_and_value():
  with pytest.raises(ValueError, match=r"config\.sample\.noise='qmc'; expected one of"):
    noise.check("qmc", "config.sample.noise")
  with pytest.raises(ValueError, match=r"noise='sobol'"):
    noise.apply(jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32), "sobol")


def test_loop_passes_every_step_draw_through_noise_fn():
  diff = dd.create_diffusion("5", noise_schedule="cosine")
  model_fn = lambda x, t: jnp.concatenate([0.3 * jnp.tanh(x), jnp.zeros_like(x)], -1)
  x_t = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 2, 1))
  key = jax.random.PRNGKey(4)
  fn = lambda z: noise.apply(z, jnp.array([0, 0, 1, 1]), "centered")
  draws = jnp.stack([fn(jax.random.normal(jax.random.fold_in(key, k), x_t.shape))
                     for k in range(5)])
  got = dd.p_sample_loop(diff, model_fn, x_t, key, noise_fn=fn)
  np.testing.assert_allclose(got, dd.p_sample_loop(diff, model_fn, x_t, None, step_noise=draws),
                             rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(got - dd.p_sample_loop(diff, model_fn, x_t, key)).max()) > 1e-3


def test_sampler_ties_within_labels_and_leaves_padding_alone():
  config = load_config()
  config.sample.num_sampling_steps = 3
  model = train.build_model(config.model)
  params = perturbed_params(model, 0)
  mesh = sharding.make_mesh(config.mesh)
  labels = np.array([0, 0, 5], np.int32)  # padded to 4 with label 0
  diff = sampling.create_sampling_diffusion(config.diffusion, config.sample)
  direct = lambda groups, design: np.asarray(sampling.sample(
      params, jnp.array([0, 0, 5, 0]), jax.random.fold_in(jax.random.key(7), 0), model=model,
      diff=diff, cfg_scale=config.sample.cfg_scale, guidance_mode=config.sample.guidance_mode,
      sampler="ddpm", clip_denoised=False, latent_shape=(8, 8, 1), decode_fn=None,
      noise_design=design, groups=groups))[:3]
  to_uint8 = images.to_uint8
  config.sample.noise = "centered"
  got = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=4)(params, labels, 7)
  np.testing.assert_array_equal(got, to_uint8(direct(jnp.array([0, 0, 5, -1]), "centered")))
  # Tied to the padding entry as well (its label is 0 too), the two 0s would come out otherwise.
  assert np.abs(got[:2].astype(int) - to_uint8(direct(None, "centered"))[:2]).max() > 0
  config.sample.noise = "iid"
  iid = sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=4)(params, labels, 7)
  np.testing.assert_array_equal(iid, to_uint8(direct(None, "iid")))
  assert np.abs(got[:2].astype(int) - iid[:2]).max() > 0  # the two 0s are tied together
  config.sample.noise = "halton"
  with pytest.raises(ValueError, match=r"config\.sample\.noise='halton'"):
    sampling.Sampler(model, config, mesh, (8, 8, 1), batch_size=4)
