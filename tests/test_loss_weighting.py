"""Min-SNR-gamma weighting of the mse term, stratified and power-law training timesteps
(options; the official loss and i.i.d. uniform timesteps are the defaults)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import diffusion as dd


def _model_fn(x_t, t):
  """A fixed 'denoiser' with learned-sigma output (2C channels) that depends on x_t and t."""
  tt = t.astype(jnp.float32)[:, None, None, None] / 1000.0
  return jnp.concatenate([0.5 * x_t + tt, jnp.tanh(x_t) - tt], axis=-1)


def test_min_snr_weights_eps_prediction():
  diff = dd.create_diffusion("")
  t = jnp.arange(diff.num_timesteps)
  w = np.asarray(dd.losses.min_snr_weights(diff, t, 5.0))
  snr = diff.alphas_cumprod / (1.0 - diff.alphas_cumprod)
  np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
  # Any gamma > 0 is valid, gamma <= 1 included.
  np.testing.assert_allclose(dd.losses.min_snr_weights(diff, t, 0.5), np.minimum(snr, 0.5) / snr,
                             rtol=1e-6)
  # Low noise (SNR > gamma) is down-weighted, high noise (SNR <= gamma) keeps weight 1.
  assert w[0] < 1e-3 and np.all(w[snr <= 5.0] == 1.0) and np.all(w[snr > 5.0] < 1.0)
  assert np.all(np.diff(w) >= 0)  # monotone in t for a monotone schedule


def test_min_snr_weights_start_x_prediction():
  diff = dd.create_diffusion("", predict_xstart=True)
  t = jnp.array([0, 500, 999])
  snr = diff.alphas_cumprod / (1.0 - diff.alphas_cumprod)
  np.testing.assert_allclose(dd.losses.min_snr_weights(diff, t, 5.0),
                             np.minimum(snr[[0, 500, 999]], 5.0), rtol=1e-6)


def test_training_losses_weight_only_the_mse_term():
  diff = dd.create_diffusion("")
  key = jax.random.PRNGKey(0)
  x0 = jnp.tanh(jax.random.normal(key, (6, 4, 4, 3)))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 3, 50, 200, 600, 999])
  plain = dd.training_losses(diff, _model_fn, x0, t, noise)
  weighted = dd.training_losses(diff, _model_fn, x0, t, noise, min_snr_gamma=5.0)
  w = dd.losses.min_snr_weights(diff, t, 5.0)
  np.testing.assert_array_equal(weighted["mse"], plain["mse"])
  np.testing.assert_array_equal(weighted["vb"], plain["vb"])
  np.testing.assert_allclose(weighted["loss"], w * plain["mse"] + plain["vb"], rtol=1e-6)
  assert not np.allclose(weighted["loss"], plain["loss"])


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_bad_gamma_is_an_error(gamma):
  diff = dd.create_diffusion("")
  with pytest.raises(ValueError, match="min_snr_gamma"):
    dd.losses.min_snr_weights(diff, jnp.array([1]), gamma)


def test_kl_loss_has_no_mse_term_to_weight():
  diff = dd.create_diffusion("", use_kl=True)
  x0 = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="min_snr_gamma"):
    dd.training_losses(diff, _model_fn, x0, jnp.array([1]), x0, min_snr_gamma=5.0)


def test_uniform_timesteps_are_the_official_randint():
  key = jax.random.key(3)
  np.testing.assert_array_equal(dd.sample_timesteps(key, 16, 1000, "uniform"),
                                jax.random.randint(key, (16,), 0, 1000))
  np.testing.assert_array_equal(dd.sample_timesteps(key, 16, 1000),  # The default method.
                                jax.random.randint(key, (16,), 0, 1000))


def test_power_timesteps_stay_below_num_timesteps_when_u_rounds_to_one(monkeypatch):
  """u^(1 / (power + 1)) rounds to 1.0 in float32 for the largest u < 1 when power >= 2, so
  floor(T u) = T: the draw must be clamped to the last step T - 1."""
  top = np.nextafter(np.float32(1.0), np.float32(0.0))
  assert np.float32(top ** np.float32(1.0 / 3.0)) == 1.0
  monkeypatch.setattr(jax.random, "uniform", lambda key, shape: jnp.full(shape, top))
  t = dd.sample_timesteps(jax.random.key(0), 4, 1000, "uniform", 2.0)
  np.testing.assert_array_equal(t, [999] * 4)


@pytest.mark.parametrize("n", [8, 32, 7])
def test_stratified_timesteps_put_one_in_each_of_n_bins(n):
  for seed in range(20):
    t = np.asarray(dd.sample_timesteps(jax.random.key(seed), n, 1000, "stratified"))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 1000
    # Bin k of n equal bins of [0, 1000) is [1000 k / n, 1000 (k + 1) / n).
    bins = np.floor(t * n / 1000).astype(int)
    np.testing.assert_array_equal(np.sort(bins), np.arange(n))


def test_stratified_timesteps_are_marginally_uniform_and_shuffled():
  keys = jax.random.split(jax.random.key(0), 4000)
  t = np.asarray(jax.vmap(lambda k: dd.sample_timesteps(k, 4, 8, "stratified"))(keys))
  for position in range(4):  # Every batch position sees every timestep equally often.
    counts = np.bincount(t[:, position], minlength=8)
    assert np.all(np.abs(counts - 500) < 4 * np.sqrt(500 * 7 / 8)), counts
  assert len({tuple(row) for row in np.argsort(t, axis=1)}) > 12  # Not one fixed order.


def test_unknown_timestep_sampling_names_the_field():
  with pytest.raises(ValueError, match="config.diffusion.timestep_sampling='sobol'"):
    dd.sample_timesteps(jax.random.key(0), 4, 1000, "sobol")


def test_power_zero_draws_the_same_timesteps_as_before_the_option():
  """power = 0 keeps old runs bit-exact: the official randint, and the stratified grid floored
  then permuted (the implementation before `power` existed)."""
  key = jax.random.key(3)
  np.testing.assert_array_equal(dd.sample_timesteps(key, 64, 1000, "uniform", 0.0),
                                jax.random.randint(key, (64,), 0, 1000))
  k_offset, k_perm = jax.random.split(key)
  grid = jnp.mod(jax.random.uniform(k_offset, ()) + jnp.arange(64, dtype=jnp.float32) / 64, 1.0)
  old = jax.random.permutation(k_perm, jnp.minimum(jnp.floor(grid * 1000).astype(jnp.int32), 999))
  np.testing.assert_array_equal(dd.sample_timesteps(key, 64, 1000, "stratified", 0.0), old)


@pytest.mark.parametrize("power", [0.5, 1.0, -0.5])
def test_power_timesteps_follow_the_power_law_cdf(power):
  t = np.asarray(dd.sample_timesteps(jax.random.key(1), 200_000, 1000, "uniform", power))
  assert t.min() >= 0 and t.max() <= 999 and t.dtype == np.int32
  for s in (100, 300, 500, 800):  # P(t < s) = (s / T)^(power + 1).
    want = (s / 1000) ** (power + 1)
    assert abs(np.mean(t < s) - want) < 4 * np.sqrt(want * (1 - want) / len(t)) + 1e-3, s


def test_stratified_power_timesteps_put_one_in_each_quantile_bin():
  n, power = 8, 0.5
  t = np.asarray(dd.sample_timesteps(jax.random.key(2), n, 1000, "stratified", power))
  # Bin i of the power law is [T (i / n)^(1 / (p + 1)), T ((i + 1) / n)^(1 / (p + 1))).
  edges = 1000 * (np.arange(n + 1) / n) ** (1 / (power + 1))
  t = np.sort(t)  # The i-th smallest is floor(x) for an x in bin i.
  assert np.all(np.floor(edges[:-1]) <= t) and np.all(t < edges[1:]), (t, edges)


@pytest.mark.parametrize("power", [-1.0, -2.0, float("nan"), float("inf")])
def test_bad_timestep_power_names_the_field(power):
  with pytest.raises(ValueError, match="config.diffusion.timestep_power="):
    dd.sample_timesteps(jax.random.key(0), 4, 1000, "uniform", power)
