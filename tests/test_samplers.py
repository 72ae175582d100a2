"""DDPM / DDIM one-step parity with the official code (tests/data/diffusion.npz) and
properties of the lax.scan loops (shapes, determinism, noise injection, last step)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax import diffusion as dd


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def to_nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("d", ("base", "resp250"))
def test_one_step_samplers_match_official(ref_diffusion, d):
  ref = ref_diffusion
  diff = dd.create_diffusion(str(ref[f"{d}/respacing"]))
  mo = nhwc(ref["inputs/model_output"])
  z = nhwc(ref["inputs/step_noise"])
  x_t = nhwc(ref[f"{d}/q_sample"])
  t = jnp.asarray(ref[f"{d}/t"])
  for clip in ("clip", "noclip"):
    c = clip == "clip"
    out = dd.p_sample(diff, mo, x_t, t, z, clip_denoised=c)
    for k in ("sample", "pred_xstart"):
      assert rel_err(to_nchw(out[k]), ref[f"{d}/p_sample_{clip}/{k}"]) <= 1e-5, (clip, k)
    for eta in (0, 1):
      out = dd.ddim_sample(diff, mo, x_t, t, z, eta=float(eta), clip_denoised=c)
      for k in ("sample", "pred_xstart"):
        assert rel_err(to_nchw(out[k]), ref[f"{d}/ddim_eta{eta}_{clip}/{k}"]) <= 1e-5, \
            (eta, clip, k)
  # A model_fn is called with the original-scale timesteps and gives the same result.
  seen = []
  fn = lambda x, mt: (seen.append(mt), mo)[1]
  out = dd.p_sample(diff, fn, x_t, t, z)
  np.testing.assert_array_equal(seen[0], ref[f"{d}/model_t"])
  np.testing.assert_array_equal(out["sample"], dd.p_sample(diff, mo, x_t, t, z)["sample"])


def _toy_model(x, model_t):
  """A deterministic stand-in for a learned-sigma model: eps and v depend on x and t."""
  s = model_t.astype(jnp.float32)[:, None, None, None] / 1000.0
  return jnp.concatenate([0.5 * x * (1 - s) + 0.1 * s, jnp.tanh(x) * 0.5 - s], axis=-1)


SHAPE = (2, 4, 4, 3)


def test_loops_shapes_determinism_and_jit():
  diff = dd.create_diffusion("5")
  z = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  key = jax.random.PRNGKey(1)
  run = jax.jit(lambda z, key: dd.p_sample_loop(diff, _toy_model, z, key))
  a, b = run(z, key), run(z, key)
  assert a.shape == SHAPE and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run(z, jax.random.PRNGKey(2)))
  samples, pred = dd.p_sample_loop(diff, _toy_model, z, key, progressive=True)
  assert samples.shape == pred.shape == (5,) + SHAPE
  np.testing.assert_allclose(samples[-1], a, rtol=1e-6, atol=1e-6)
  d_samples, d_pred = dd.ddim_sample_loop(diff, _toy_model, z, None, progressive=True)
  assert d_samples.shape == d_pred.shape == (5,) + SHAPE
  # eta = 0 is deterministic: the key does not matter.
  np.testing.assert_allclose(dd.ddim_sample_loop(diff, _toy_model, z, key), d_samples[-1],
                             rtol=1e-6, atol=1e-6)
  clipped = dd.p_sample_loop(diff, _toy_model, z, key, clip_denoised=True, progressive=True)[1]
  assert float(jnp.abs(clipped).max()) <= 1.0


@pytest.mark.parametrize("kind", ("ddpm", "ddim_eta1"))
def test_step_noise_equals_manual_steps(kind):
  diff = dd.create_diffusion("4")
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  z = jax.random.normal(keys[0], SHAPE)
  step_noise = jax.random.normal(keys[1], (4,) + SHAPE)
  if kind == "ddpm":
    loop = lambda **kw: dd.p_sample_loop(diff, _toy_model, z, None, **kw)
    step = lambda x, t, n: dd.p_sample(diff, _toy_model, x, t, n)
  else:
    loop = lambda **kw: dd.ddim_sample_loop(diff, _toy_model, z, None, eta=1.0, **kw)
    step = lambda x, t, n: dd.ddim_sample(diff, _toy_model, x, t, n, eta=1.0)
  samples, preds = loop(step_noise=step_noise, progressive=True)
  x = z
  for k in range(4):
    t = jnp.full((SHAPE[0],), 3 - k, jnp.int32)
    out = step(x, t, step_noise[k])
    np.testing.assert_allclose(samples[k], out["sample"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(preds[k], out["pred_xstart"], rtol=1e-5, atol=1e-5)
    x = out["sample"]
  # Per-step noise from fold_in(key, k) is the same as injecting it explicitly.
  key = jax.random.PRNGKey(7)
  folded = jnp.stack([jax.random.normal(jax.random.fold_in(key, k), SHAPE) for k in range(4)])
  if kind == "ddpm":
    a = dd.p_sample_loop(diff, _toy_model, z, key)
    b = dd.p_sample_loop(diff, _toy_model, z, None, step_noise=folded)
  else:
    a = dd.ddim_sample_loop(diff, _toy_model, z, key, eta=1.0)
    b = dd.ddim_sample_loop(diff, _toy_model, z, None, eta=1.0, step_noise=folded)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_last_step_adds_no_noise():
  diff = dd.create_diffusion("3")
  z = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  n1 = jax.random.normal(jax.random.PRNGKey(1), (3,) + SHAPE)
  n2 = n1.at[-1].set(100.0)  # only the t = 0 noise differs
  for loop in (dd.p_sample_loop, lambda *a, **k: dd.ddim_sample_loop(*a, eta=1.0, **k)):
    np.testing.assert_array_equal(loop(diff, _toy_model, z, None, step_noise=n1),
                                  loop(diff, _toy_model, z, None, step_noise=n2))


def test_loop_errors():
  diff = dd.create_diffusion("3")
  z = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="step_noise shape"):
    dd.p_sample_loop(diff, _toy_model, z, None, step_noise=jnp.zeros((2,) + SHAPE))
  with pytest.raises(ValueError, match="key is required"):
    dd.p_sample_loop(diff, _toy_model, z, None)
  with pytest.raises(ValueError, match="model_output shape"):
    dd.p_sample_loop(diff, lambda x, t: x, z, jax.random.PRNGKey(0))
