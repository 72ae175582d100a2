"""Ancestral (DDPM) and DDIM samplers: one-step functions and `lax.scan` loops.

This module owns the official `p_sample`, `ddim_sample` and their loops. NHWC throughout.
A loop runs respaced steps t = K-1, ..., 0 (step index k = K-1-t), calling
model_fn(x_t, model_t) with model_t = timestep_map[t] (original scale, int32, shape (N,)).
Randomness is explicit: step k uses noise `jax.random.normal(fold_in(key, k))`, passed through
`noise_fn` when given (a noise design, `diffusion.noise`), or `step_noise[k]` when given (to
reproduce a reference run). `key` may also be one typed key per sample (shape (N,)): sample i's
step-k noise is then `normal(fold_in(key[i], k))` of one sample's shape, independent of the
batch it is drawn in. The last step (t = 0) adds no noise.

  DDPM:  x_{t-1} = mu_theta(x_t, t) + 1[t > 0] exp(0.5 log Sigma_t) z
  DDIM:  eps' = (sqrt(1/abar_t) x_t - x0_hat) / sqrt(1/abar_t - 1)
         sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
         x_{t-1} = x0_hat sqrt(abar_{t-1}) + sqrt(1 - abar_{t-1} - sigma^2) eps' + 1[t > 0] sigma z
(x0_hat and mu_theta from `gaussian.p_mean_variance`, clamped to [-1, 1] iff clip_denoised.)
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from dit_jax.diffusion import gaussian
from dit_jax.diffusion.gaussian import GaussianDiffusion

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _model_output(diff, model, x_t, t):
  if callable(model):
    return model(x_t, gaussian.model_timesteps(diff, t))
  return model


def _nonzero_mask(t, ndim):
  m = (jnp.asarray(t) != 0).astype(jnp.float32)
  return m.reshape(m.shape + (1,) * (ndim - m.ndim))


def p_sample(diff: GaussianDiffusion, model: Union[ModelFn, jnp.ndarray], x_t, t, noise, *,
             clip_denoised: bool = False):
  """One ancestral step x_t -> x_{t-1}: dict(sample, pred_xstart).

  `model` is either the model output at (x_t, timestep_map[t]) or a model_fn(x_t, model_t).
  `t` is (N,) int in [0, K); `noise` is N(0, I) like x_t.
  """
  out = gaussian.p_mean_variance(diff, _model_output(diff, model, x_t, t), x_t, t,
                                 clip_denoised=clip_denoised)
  sample = out["mean"] + _nonzero_mask(t, x_t.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample(diff: GaussianDiffusion, model: Union[ModelFn, jnp.ndarray], x_t, t, noise, *,
                eta: float = 0.0, clip_denoised: bool = False):
  """One DDIM step x_t -> x_{t-1}: dict(sample, pred_xstart). `model` as in `p_sample`."""
  nd = x_t.ndim
  out = gaussian.p_mean_variance(diff, _model_output(diff, model, x_t, t), x_t, t,
                                 clip_denoised=clip_denoised)
  eps = gaussian.predict_eps_from_xstart(diff, x_t, t, out["pred_xstart"])
  abar = gaussian.extract(diff.alphas_cumprod, t, nd)
  abar_prev = gaussian.extract(diff.alphas_cumprod_prev, t, nd)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean_pred = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
  sample = mean_pred + _nonzero_mask(t, nd) * sigma * noise
  return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def _loop(step_fn, diff, noise, key, step_noise, progressive, zero_noise_ok=False,
          noise_fn=None):
  k_steps = diff.num_timesteps
  n = noise.shape[0]
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise)
    if step_noise.shape != (k_steps,) + tuple(noise.shape):
      raise ValueError(f"step_noise shape {step_noise.shape}: expected "
                       f"{(k_steps,) + tuple(noise.shape)} (K={k_steps} steps of x_T's shape)")
  elif key is None and not zero_noise_ok:
    raise ValueError("key is required unless step_noise is given (or DDIM with eta=0)")

  per_sample = (key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                and key.ndim == 1)
  if per_sample and key.shape[0] != n:
    raise ValueError(f"{key.shape[0]} per-sample keys for a batch of {n}")

  def draw(k, like):
    if per_sample:
      return jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, k), like.shape[1:],
                                                   like.dtype))(key)
    return jax.random.normal(jax.random.fold_in(key, k), like.shape, like.dtype)

  def body(x, k):
    t = jnp.full((n,), k_steps - 1 - k, jnp.int32)
    if step_noise is not None:
      z = step_noise[k].astype(x.dtype)
    elif key is None:  # DDIM with eta = 0: the noise is multiplied by sigma = 0.
      z = jnp.zeros_like(x)
    else:
      z = draw(k, x)
      z = z if noise_fn is None else noise_fn(z)
    out = step_fn(x, t, z)
    ys = (out["sample"], out["pred_xstart"]) if progressive else None
    return out["sample"], ys

  x_0, ys = jax.lax.scan(body, jnp.asarray(noise), jnp.arange(k_steps))
  return ys if progressive else x_0


def p_sample_loop(diff: GaussianDiffusion, model_fn: ModelFn, noise, key: Optional[jax.Array],
                  *, clip_denoised: bool = False, step_noise=None, progressive: bool = False,
                  noise_fn: Optional[Callable] = None):
  """Ancestral sampling from x_T = `noise` over all K (respaced) steps.

  key: one key (step k draws fold_in(key, k)), or typed keys (N,), one per sample; None
    only with `step_noise`.
  noise_fn: None, or a map applied to each step's fresh N(0, I) draw (N, ...) before use.

  Returns x_0 (shape of noise), or with progressive=True (samples, pred_xstarts), each
  (K, *noise.shape), entry k after step k (t = K-1-k); samples[-1] is x_0.
  """
  step = lambda x, t, z: p_sample(diff, model_fn, x, t, z, clip_denoised=clip_denoised)
  return _loop(step, diff, noise, key, step_noise, progressive, noise_fn=noise_fn)


def ddim_sample_loop(diff: GaussianDiffusion, model_fn: ModelFn, noise,
                     key: Optional[jax.Array], *, eta: float = 0.0, clip_denoised: bool = False,
                     step_noise=None, progressive: bool = False,
                     noise_fn: Optional[Callable] = None):
  """DDIM sampling from x_T = `noise`; returns as `p_sample_loop` (noise_fn likewise).

  eta = 0 is deterministic; then `key` may be None (the noise would be multiplied by 0).
  """
  step = lambda x, t, z: ddim_sample(diff, model_fn, x, t, z, eta=eta,
                                     clip_denoised=clip_denoised)
  zero_ok = isinstance(eta, (int, float)) and eta == 0
  return _loop(step, diff, noise, key, step_noise, progressive, zero_noise_ok=zero_ok,
               noise_fn=noise_fn)
