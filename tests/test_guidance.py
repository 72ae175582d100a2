"""Classifier-free guidance: the official forward_with_cfg combination (model_tiny.npz
cfg/out from cfg/out_unguided) and properties of the two modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax import diffusion as dd


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_official_mode_reproduces_forward_with_cfg(ref_a):
  out = nhwc(ref_a["cfg/out_unguided"])      # [cond half; uncond half], 8 = 2C channels
  want = nhwc(ref_a["cfg/out"])
  s = float(ref_a["cfg/scale"])
  n = out.shape[0] // 2
  cond, uncond = out[:n], out[n:]
  guided = dd.combine(cond, uncond, s, "official", 4)
  # The official doubled output: [g, g] on channels [0, 3), each half's own values after.
  full = jnp.concatenate([guided, jnp.concatenate([guided[..., :3], uncond[..., 3:]], -1)], 0)
  assert rel_err(full, want) <= 1e-6
  assert rel_err(dd.combine(cond, uncond, s, "all", 4), want[:n]) > 1e-3


def _fake_model(x, t, y):
  """Output 2C channels that depend on x, t and y (null label 10 differs from the rest)."""
  yy = y.astype(jnp.float32)[:, None, None, None]
  tt = t.astype(jnp.float32)[:, None, None, None] / 1000
  return jnp.concatenate([x * (1 + yy) + tt, x - yy], axis=-1)


def test_guided_fn_scale_one_and_modes():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 4))
  t = jnp.array([0, 500, 999])
  y = jnp.array([1, 2, 3])
  cond = _fake_model(x, t, y)
  for mode in ("all", "official"):
    g1 = dd.classifier_free_guidance(_fake_model, 1.0, null_label=10, mode=mode)(x, t, y)
    np.testing.assert_allclose(g1, cond, rtol=1e-6, atol=1e-6)
  ga = dd.classifier_free_guidance(_fake_model, 4.0, null_label=10, mode="all")(x, t, y)
  go = dd.classifier_free_guidance(_fake_model, 4.0, null_label=10, mode="official")(x, t, y)
  assert ga.shape == go.shape == cond.shape
  diff_mask = np.abs(np.asarray(ga) - np.asarray(go)).max(axis=(0, 1, 2)) > 0
  np.testing.assert_array_equal(diff_mask, [False, False, False, True, False, False, False,
                                            False])
  np.testing.assert_array_equal(go[..., 3:], cond[..., 3:])  # official: cond values kept
  np.testing.assert_array_equal(ga[..., 4:], cond[..., 4:])  # variance: cond values kept
  uncond = _fake_model(x, t, jnp.full_like(y, 10))
  np.testing.assert_allclose(ga[..., :4], uncond[..., :4] + 4 * (cond[..., :4] - uncond[..., :4]),
                             rtol=1e-6, atol=1e-5)


def test_official_mode_rejects_other_channel_counts():
  x = jnp.zeros((2, 4, 4, 3))
  g = dd.classifier_free_guidance(_fake_model, 4.0, null_label=10, mode="official")
  with pytest.raises(ValueError, match="C=3"):
    g(x, jnp.array([1, 2]), jnp.array([0, 1]))
  with pytest.raises(ValueError, match="C=1"):
    dd.combine(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 2.0, "official", 1)
  with pytest.raises(ValueError, match="'half'"):
    dd.classifier_free_guidance(_fake_model, 4.0, null_label=10, mode="half")
  # "all" works for any channel count, also inside a sampling loop under jit.
  ga = dd.classifier_free_guidance(_fake_model, 2.0, null_label=10)
  diff = dd.create_diffusion("3")
  y = jnp.array([0, 1])
  out = jax.jit(lambda z: dd.ddim_sample_loop(diff, lambda x, t: ga(x, t, y) * 0.1, z, None))(x)
  assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()


def test_combine_fixed_variance_outputs_and_bad_inputs():
  """Fixed-variance models output C channels only: all of them are guided ("all")."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  cond, uncond = jax.random.normal(k1, (2, 8, 8, 3)), jax.random.normal(k2, (2, 8, 8, 3))
  np.testing.assert_allclose(dd.combine(cond, uncond, 2.5, "all", 3),
                             uncond + 2.5 * (cond - uncond), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"mode='half'; expected one of \('all', 'official'\)"):
    dd.combine(cond, uncond, 2.5, "half", 3)
  with pytest.raises(ValueError, match=r"out_cond \(2, 8, 8, 3\) and out_uncond \(1, 8, 8, 3\)"):
    dd.combine(cond, uncond[:1], 2.5, "all", 3)
  # H = W = 8 >= eps_channels = 4 > 3 channels: the channel axis is the last one.
  with pytest.raises(ValueError, match="output has 3 channels < eps_channels=4"):
    dd.combine(cond, uncond, 2.5, "all", 4)


def test_guidance_interval_guides_only_inside():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4, 1))
  y = jnp.array([1, 2, 3, 4])
  full = dd.classifier_free_guidance(_fake_model, 3.0, null_label=10)
  ranged = jax.jit(dd.classifier_free_guidance(_fake_model, 3.0, null_label=10,
                                               interval=(200, 600)))
  # Mixed batch: t = 199 and 600 are outside [200, 600), t = 200 and 599 inside.
  t = jnp.array([199, 200, 599, 600])
  out, want, cond = ranged(x, t, y), full(x, t, y), _fake_model(x, t, y)
  np.testing.assert_allclose(out[1:3], want[1:3], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[0], cond[0])
  np.testing.assert_array_equal(out[3], cond[3])
  assert float(jnp.abs(want[0] - cond[0]).max()) > 0.1  # guidance would have changed them
  # Whole batch outside: the conditional output from one undoubled model call. The model's
  # output carries the batch size it was called with, so the two branches are told apart.
  def size_marking_model(x, t, y):
    return _fake_model(x, t, y) + 1e-3 * x.shape[0]
  g = jax.jit(dd.classifier_free_guidance(size_marking_model, 3.0, null_label=10,
                                          interval=(200, 600)))
  t_out = jnp.full((4,), 900)
  np.testing.assert_array_equal(g(x, t_out, y), size_marking_model(x, t_out, y))  # size 4
  t_hi = jnp.full((4,), 600)  # hi is outside: still the undoubled call
  np.testing.assert_array_equal(g(x, t_hi, y), size_marking_model(x, t_hi, y))
  t_lo = jnp.full((4,), 200)  # lo is inside: the doubled call, guided
  np.testing.assert_allclose(g(x, t_lo, y), full(x, t_lo, y) + 8e-3, rtol=1e-6, atol=1e-5)
  t_mixed = jnp.array([900, 300, 900, 900])  # one sample inside: the doubled call (size 8)
  np.testing.assert_allclose(g(x, t_mixed, y)[0], _fake_model(x, t_mixed, y)[0] + 8e-3,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [(5, 5), (-1, 10), (1,), "ab", (1, 2, 3)])
def test_guidance_interval_rejects_bad_values(bad):
  with pytest.raises(ValueError, match=r"^interval="):
    dd.classifier_free_guidance(_fake_model, 3.0, null_label=10, interval=bad)


def test_guidance_interval_may_start_at_step_zero():
  assert dd.guidance.check_interval(None) is None
  assert dd.guidance.check_interval(np.array([0, 10])) == (0, 10)
  assert type(dd.guidance.check_interval((0.0, 10.0))[0]) is int
