"""Schedules, respacing, q/p maths and training losses against the official code
(tests/data/diffusion.npz; see tests/data/README.md), plus invariants."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax import diffusion as dd
from dit_jax.diffusion import gaussian

TABLES = gaussian._TABLES
RESPACINGS = ("s1000", "s250", "s100", "s50", "s25", "s10", "s5", "s27", "s3", "s7", "s21",
              "s23", "s10_20_30", "ddim50", "ddim25", "ddim10")
CASES = ("base", "resp250")


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def to_nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def make(ref, d):
  return dd.create_diffusion(str(ref[f"{d}/respacing"]))


def inputs(ref):
  return (nhwc(ref["inputs/x_start"]), nhwc(ref["inputs/noise"]),
          nhwc(ref["inputs/step_noise"]), nhwc(ref["inputs/model_output"]))


# ---------------------------------------------------------------- schedules and respacing
@pytest.mark.parametrize("d", CASES)
def test_schedule_tables_match_official(ref_diffusion, d):
  diff = make(ref_diffusion, d)
  assert diff.num_timesteps == int(ref_diffusion[f"{d}/num_timesteps"])
  np.testing.assert_array_equal(diff.timestep_map, ref_diffusion[f"{d}/timestep_map"])
  for name in TABLES:
    ours, ref = getattr(diff, name), ref_diffusion[f"{d}/sched/{name}"]
    assert ours.dtype == np.float64
    assert rel_err(ours, ref) <= 1e-12, name


def test_every_respacing_map_and_betas_match_official(ref_diffusion):
  for r in RESPACINGS:
    spec = str(ref_diffusion[f"respacing/{r}/spec"])
    diff = dd.create_diffusion(spec)
    np.testing.assert_array_equal(diff.timestep_map, ref_diffusion[f"respacing/{r}/timestep_map"],
                                  err_msg=r)
    assert rel_err(diff.betas, ref_diffusion[f"respacing/{r}/betas"]) <= 1e-12, r


def test_space_timesteps_rounding_details():
  # Python round (half to even) and accumulated float stride, as the official code.
  assert sorted(dd.space_timesteps(1000, "ddim10")) == list(range(0, 1000, 100))
  assert dd.space_timesteps(1000, [1000]) == set(range(1000))
  steps = sorted(dd.space_timesteps(10, "3"))   # stride 4.5: 0, round(4.5)=4, 9
  assert steps == [0, 4, 9]
  assert len(dd.space_timesteps(1000, "10,20,30")) == 60


@pytest.mark.parametrize("spec,match", [("1001", "1001"), ("ddim600", "ddim600"), ("abc", "abc"),
                                        ("10,0", "0"), ("ddimx", "ddimx")])
def test_space_timesteps_errors_name_the_value(spec, match):
  with pytest.raises(ValueError, match=match):
    dd.space_timesteps(1000, spec)


def test_schedule_errors_and_linear_scaling():
  with pytest.raises(ValueError, match="'quadratic'"):
    dd.get_named_beta_schedule("quadratic", 1000)
  for bad in (0, -5):
    with pytest.raises(ValueError, match=str(bad)):
      dd.get_named_beta_schedule("linear", bad)
  b = dd.get_named_beta_schedule("linear", 500)
  np.testing.assert_allclose([b[0], b[-1]], [2e-4, 4e-2], rtol=1e-15)
  with pytest.raises(ValueError, match="noise_schedule"):
    dd.create_diffusion("", noise_schedule="nope")


def test_cosine_schedule_invariants():
  for T in (1000, 50):
    b = dd.get_named_beta_schedule("cosine", T)
    assert b.dtype == np.float64 and b.shape == (T,)
    assert (b > 0).all() and (b <= 0.999).all() and np.isclose(b.max(), 0.999)
    assert (np.diff(b) >= 0).all()  # monotone non-decreasing
    abar = np.cumprod(1 - b)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    u = np.arange(1, T + 1) / T
    ok = b < 0.999
    np.testing.assert_allclose(abar[ok], (f(u) / f(0))[ok], rtol=1e-9)
  np.testing.assert_array_equal(dd.get_named_beta_schedule("squaredcos_cap_v2", 100),
                                dd.cosine(100))
  diff = dd.create_diffusion("ddim10", noise_schedule="cosine")
  assert diff.num_timesteps == 10 and np.isfinite(diff.posterior_log_variance_clipped).all()


def test_create_diffusion_options():
  assert dd.create_diffusion("").model_var_type == "learned_range"
  assert dd.create_diffusion("", learn_sigma=False).model_var_type == "fixed_large"
  assert dd.create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == \
      "fixed_small"
  assert dd.create_diffusion("", use_kl=True).loss_type == "rescaled_kl"
  assert dd.create_diffusion("", rescale_learned_sigmas=True).loss_type == "rescaled_mse"
  assert dd.create_diffusion("", predict_xstart=True).model_mean_type == "start_x"
  diff = dd.create_diffusion(None, diffusion_steps=100)
  assert diff.num_timesteps == 100 and diff.original_num_steps == 100
  with pytest.raises(ValueError, match="model_var_type='learned'"):
    dd.from_betas(diff.betas, model_var_type="learned")


# ---------------------------------------------------------------- q / p one-step functions
@pytest.mark.parametrize("d", CASES)
def test_q_functions_match_official(ref_diffusion, d):
  ref = ref_diffusion
  diff = make(ref, d)
  x0, noise, _, _ = inputs(ref)
  t = jnp.asarray(ref[f"{d}/t"])
  x_t = dd.q_sample(diff, x0, t, noise)
  assert x_t.dtype == jnp.float32
  assert rel_err(to_nchw(x_t), ref[f"{d}/q_sample"]) <= 1e-6
  mean, var, logvar = dd.q_mean_variance(diff, x0, t)
  assert rel_err(to_nchw(mean), ref[f"{d}/q_mean"]) <= 1e-6
  assert rel_err(to_nchw(var), ref[f"{d}/q_variance"]) <= 1e-6
  assert rel_err(to_nchw(logvar), ref[f"{d}/q_log_variance"]) <= 1e-6
  x_t = nhwc(ref[f"{d}/q_sample"])
  pm, pv, plv = dd.q_posterior_mean_variance(diff, x0, x_t, t)
  assert rel_err(to_nchw(pm), ref[f"{d}/q_posterior/mean"]) <= 1e-5
  assert rel_err(to_nchw(pv), ref[f"{d}/q_posterior/variance"]) <= 1e-5
  assert rel_err(to_nchw(plv), ref[f"{d}/q_posterior/log_variance_clipped"]) <= 1e-5
  np.testing.assert_array_equal(dd.model_timesteps(diff, t), ref[f"{d}/model_t"])


@pytest.mark.parametrize("d", CASES)
def test_p_mean_variance_matches_official(ref_diffusion, d):
  ref = ref_diffusion
  diff = make(ref, d)
  _, _, _, mo = inputs(ref)
  x_t = nhwc(ref[f"{d}/q_sample"])
  t = jnp.asarray(ref[f"{d}/t"])
  for clip in ("clip", "noclip"):
    out = jax.jit(dd.p_mean_variance, static_argnums=(0, 4))(diff, mo, x_t, t, clip == "clip")
    for k in ("mean", "variance", "log_variance", "pred_xstart"):
      assert rel_err(to_nchw(out[k]), ref[f"{d}/pmv_{clip}/{k}"]) <= 1e-5, (clip, k)


@pytest.mark.parametrize("d", CASES)
def test_training_losses_match_official(ref_diffusion, d):
  ref = ref_diffusion
  diff = make(ref, d)
  x0, noise, _, mo = inputs(ref)
  t = jnp.asarray(ref[f"{d}/t"])
  seen = []

  def model_fn(x_t, model_t):
    seen.append(model_t)
    return mo

  out = dd.training_losses(diff, model_fn, x0, t, noise)
  np.testing.assert_array_equal(seen[0], ref[f"{d}/model_t"])
  for k in ("loss", "mse", "vb"):
    ours, want = np.asarray(out[k]), ref[f"{d}/training_losses/{k}"]
    assert ours.shape == (4,)
    # Observed: <= 4.5e-7 relative, t == 0 (the decoder NLL) included.
    np.testing.assert_allclose(ours, want, rtol=2e-6, err_msg=k)


def test_rescaled_loss_types_scale_the_official_vb(ref_diffusion):
  """The official loss types on the 250-step respacing (K = 250): "rescaled_mse"
  (rescale_learned_sigmas) multiplies vb by K / 1000, "rescaled_kl" (use_kl) trains on vb * K
  with no mse term; the unscaled vb is the official `resp250/training_losses/vb`."""
  ref = ref_diffusion
  x0, noise, _, mo = inputs(ref)
  t = jnp.asarray(ref["resp250/t"])
  want_vb, want_mse = ref["resp250/training_losses/vb"], ref["resp250/training_losses/mse"]
  rescaled = dd.create_diffusion("250", rescale_learned_sigmas=True)
  out = dd.training_losses(rescaled, lambda *_: mo, x0, t, noise)
  np.testing.assert_allclose(out["vb"], want_vb * 250 / 1000, rtol=2e-6)
  np.testing.assert_allclose(out["mse"], want_mse, rtol=2e-6)
  np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)
  kl = dd.create_diffusion("250", use_kl=True)
  out = dd.training_losses(kl, lambda *_: mo, x0, t, noise)
  np.testing.assert_allclose(out["vb"], want_vb, rtol=2e-6)
  np.testing.assert_allclose(out["loss"], want_vb * 250, rtol=2e-6)
  np.testing.assert_array_equal(out["mse"], 0.0)
  plain_kl = dataclasses.replace(kl, loss_type="kl")  # The official LossType.KL: vb unscaled.
  out = dd.training_losses(plain_kl, lambda *_: mo, x0, t, noise)
  np.testing.assert_allclose(out["loss"], want_vb, rtol=2e-6)
  np.testing.assert_array_equal(out["mse"], 0.0)
  assert out["mse"].shape == (4,)
  with pytest.raises(ValueError, match="min_snr_gamma"):
    dd.training_losses(plain_kl, lambda *_: mo, x0, t, noise, min_snr_gamma=5.0)


def test_start_x_prediction_trains_on_x0(ref_diffusion):
  x0, noise, _, mo = inputs(ref_diffusion)
  t = jnp.asarray(ref_diffusion["base/t"])
  diff = dd.create_diffusion("", predict_xstart=True)
  out = dd.training_losses(diff, lambda *_: mo, x0, t, noise)
  want = ((np.asarray(x0, np.float64) - np.asarray(mo[..., :4], np.float64)) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(out["mse"], want, rtol=1e-5)


def test_vb_terms_with_clip_denoised_use_the_official_clipped_mean(ref_diffusion):
  """`vb_terms_bpd(clip_denoised=True)` (the official calc_bpd_loop's setting): the model's
  mean comes from the clipped x_0 prediction. KL in bits written out in float64 from the
  official q_posterior and p_mean_variance(clip_denoised=True) vectors (t > 0)."""
  ref = ref_diffusion
  diff = make(ref, "base")
  x0, _, _, mo = inputs(ref)
  x_t = nhwc(ref["base/q_sample"])
  t = np.asarray(ref["base/t"])
  assert rel_err(ref["base/pmv_clip/pred_xstart"], ref["base/pmv_noclip/pred_xstart"]) > 1e-2
  out = dd.vb_terms_bpd(diff, mo, x0, x_t, jnp.asarray(t), clip_denoised=True)
  assert rel_err(to_nchw(out["pred_xstart"]), ref["base/pmv_clip/pred_xstart"]) <= 1e-5
  m1, lv1 = (ref[f"base/q_posterior/{k}"].astype(np.float64)
             for k in ("mean", "log_variance_clipped"))
  m2, lv2 = (ref[f"base/pmv_clip/{k}"].astype(np.float64) for k in ("mean", "log_variance"))
  kl = 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
  want = kl.mean(axis=(1, 2, 3)) / np.log(2.0)
  # atol: float32 cancellation in -1 + exp(lv1 - lv2) where the KL is ~1e-6 (t = 999).
  np.testing.assert_allclose(np.asarray(out["output"])[t > 0], want[t > 0], rtol=1e-5, atol=1e-7)


def test_vb_gradient_reaches_only_variance_channels(ref_diffusion):
  diff = dd.create_diffusion("")
  x0, noise, _, mo = inputs(ref_diffusion)
  t = jnp.asarray(ref_diffusion["base/t"])
  g = jax.grad(lambda m: dd.training_losses(diff, lambda *_: m, x0, t, noise)["vb"].sum())(mo)
  assert float(jnp.abs(g[..., :4]).max()) == 0.0
  assert float(jnp.abs(g[..., 4:]).max()) > 0.0
  g_mse = jax.grad(lambda m: dd.training_losses(diff, lambda *_: m, x0, t, noise)["mse"].sum())(mo)
  assert float(jnp.abs(g_mse[..., 4:]).max()) == 0.0


def test_fixed_variance_losses_and_tables(ref_diffusion):
  x0, noise, _, mo = inputs(ref_diffusion)
  t = jnp.asarray(ref_diffusion["base/t"])
  eps = mo[..., :4]
  for sigma_small in (False, True):
    diff = dd.create_diffusion("", learn_sigma=False, sigma_small=sigma_small)
    out = dd.training_losses(diff, lambda *_: eps, x0, t, noise)
    np.testing.assert_array_equal(out["vb"], 0.0)
    assert out["vb"].shape == out["loss"].shape == (4,)
    np.testing.assert_array_equal(out["loss"], out["mse"])
    np.testing.assert_allclose(out["mse"], ((np.asarray(noise) - np.asarray(eps)) ** 2)
                               .mean(axis=(1, 2, 3)), rtol=1e-6)
    pmv = dd.p_mean_variance(diff, eps, x0, t)
    if sigma_small:
      want = diff.posterior_variance
    else:
      want = np.append(diff.posterior_variance[1], diff.betas[1:])
    np.testing.assert_allclose(pmv["variance"][:, 0, 0, 0], want[np.asarray(t)].astype(np.float32),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="model_output shape"):
      dd.p_mean_variance(diff, mo, x0, t)


def test_eps_xstart_round_trip_and_kl_of_equal_gaussians():
  diff = dd.create_diffusion("")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  eps = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
  t = jnp.array([5, 900])
  x0 = dd.predict_xstart_from_eps(diff, x, t, eps)
  np.testing.assert_allclose(dd.predict_eps_from_xstart(diff, x, t, x0), eps, atol=2e-4)
  np.testing.assert_allclose(dd.normal_kl(x, 0.3, x, 0.3), 0.0, atol=1e-7)
  cdf = dd.approx_standard_normal_cdf(jnp.array([-10.0, 0.0, 10.0]))
  np.testing.assert_allclose(cdf, [0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_snr_shift_multiplies_every_snr(name):
  base = dd.get_named_beta_schedule(name, 1000)
  np.testing.assert_array_equal(dd.schedules.shift_snr(base, 1.0), base)
  shifted = dd.schedules.shift_snr(base, 4.0)
  snr = lambda b: np.cumprod(1 - b) / (1 - np.cumprod(1 - b))  # noqa: E731
  uncapped = base < 0.999  # the cosine schedule caps its last betas
  np.testing.assert_allclose(snr(shifted)[uncapped], 4.0 * snr(base)[uncapped], rtol=1e-9)
  assert np.all(shifted > 0) and np.all(shifted <= 0.999)
  # Through create_diffusion (and respacing): the tables follow the shifted betas.
  diff = dd.create_diffusion("", noise_schedule=name, snr_shift=4.0)
  np.testing.assert_allclose(diff.alphas_cumprod, np.cumprod(1 - shifted), rtol=1e-12)
  respaced = dd.create_diffusion("ddim50", noise_schedule=name, snr_shift=4.0)
  np.testing.assert_allclose(respaced.alphas_cumprod,
                             np.cumprod(1 - shifted)[np.asarray(respaced.timestep_map)],
                             rtol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf"), True, "4"])
def test_snr_shift_rejects_bad_factors(bad):
  with pytest.raises(ValueError, match="snr_shift"):
    dd.schedules.shift_snr(dd.get_named_beta_schedule("linear", 10), bad)
