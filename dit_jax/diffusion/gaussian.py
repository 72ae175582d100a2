"""The Gaussian diffusion process: its float64 tables and the closed-form q / p maths.

This module owns `GaussianDiffusion` (a frozen dataclass of the official float64 numpy tables),
`create_diffusion` (official `diffusion/__init__.py`) and the pure functions over it. Images
are NHWC; `t` is the (respaced) step index in [0, K), shape (N,). Each function picks the
float64 entries at `t`, casts them to float32 and computes in float32, exactly as the official
`_extract_into_tensor` does. Tables are numpy constants, so every function works under `jit`.

With beta_t the (respaced) betas, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s:
  q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)
  x_t                   = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                  (q_sample)
  q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),
     c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
     beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),  log beta~ "clipped": entry 0 := entry 1
  x_0 from eps          = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps
  eps from x_0          = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)
  p(x_{t-1} | x_t)      = N(c1_t x0_hat + c2_t x_t, Sigma_t) with Sigma_t:
     learned_range: log Sigma = f log beta_t + (1 - f) log beta~_t (clipped), f = (v + 1) / 2
     fixed_small:   Sigma = beta~_t (log: the clipped table)
     fixed_large:   Sigma = [beta~_1, beta_1, beta_2, ..., beta_{K-1}][t]
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import respacing
from dit_jax.diffusion import schedules

VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
MEAN_TYPES = ("epsilon", "start_x")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")

_TABLES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """A (possibly respaced) Gaussian diffusion: the official tables, all float64 (K,).

  `eq=False`: instances hash by identity, so one can be a static argument of `jax.jit`.

  Attributes:
    betas .. posterior_mean_coef2: the 13 official tables (see the module docstring), (K,).
    timestep_map: int64 (K,), the original timestep of each respaced step (model input).
    num_timesteps: K.
    original_num_steps: T, the number of steps of the schedule before respacing.
    model_var_type: "learned_range" (model outputs 2C channels: eps, v) | "fixed_small" |
      "fixed_large" (model outputs C channels).
    model_mean_type: "epsilon" (model predicts the noise) | "start_x" (predicts x_0).
    loss_type: "mse" (DiT: mse + vb if learned variance) | "rescaled_mse" (vb * K / 1000) |
      "kl" (loss = vb) | "rescaled_kl" (loss = vb * K).
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  alphas_cumprod_next: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  timestep_map: np.ndarray
  num_timesteps: int
  original_num_steps: int
  model_var_type: str = "learned_range"
  model_mean_type: str = "epsilon"
  loss_type: str = "mse"

  def __post_init__(self):
    if self.model_var_type not in VAR_TYPES:
      raise ValueError(f"model_var_type={self.model_var_type!r}; expected one of {VAR_TYPES}")
    if self.model_mean_type not in MEAN_TYPES:
      raise ValueError(f"model_mean_type={self.model_mean_type!r}; expected one of {MEAN_TYPES}")
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type={self.loss_type!r}; expected one of {LOSS_TYPES}")
    for name in _TABLES:
      arr = getattr(self, name)
      if arr.dtype != np.float64 or arr.shape != (self.num_timesteps,):
        raise ValueError(f"{name}: expected float64 ({self.num_timesteps},), got "
                         f"{arr.dtype} {arr.shape}")

  @property
  def learn_sigma(self) -> bool:
    return self.model_var_type == "learned_range"


def from_betas(betas, *, timestep_map: Optional[np.ndarray] = None,
               original_num_steps: Optional[int] = None, model_var_type: str = "learned_range",
               model_mean_type: str = "epsilon", loss_type: str = "mse") -> GaussianDiffusion:
  """All tables from betas, exactly as the official `GaussianDiffusion.__init__` (float64)."""
  betas = np.array(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if not ((betas > 0).all() and (betas <= 1).all()):
    raise ValueError("betas must lie in (0, 1]")
  k = betas.shape[0]
  alphas = 1.0 - betas
  ac = np.cumprod(alphas, axis=0)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], 0.0)
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  post_log = (np.log(np.append(post_var[1], post_var[1:])) if k > 1
              else np.log(np.maximum(post_var, 1e-20)))
  if timestep_map is None:
    timestep_map = np.arange(k, dtype=np.int64)
  return GaussianDiffusion(
      betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, alphas_cumprod_next=ac_next,
      sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      log_one_minus_alphas_cumprod=np.log(1.0 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1), posterior_variance=post_var,
      posterior_log_variance_clipped=post_log,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
      timestep_map=np.asarray(timestep_map, dtype=np.int64), num_timesteps=k,
      original_num_steps=int(original_num_steps or k), model_var_type=model_var_type,
      model_mean_type=model_mean_type, loss_type=loss_type)


def create_diffusion(timestep_respacing: Union[str, Sequence[int], None] = "",
                     noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000, snr_shift: float = 1.0) -> GaussianDiffusion:
  """The official `create_diffusion`: schedule, respacing, variance / mean / loss types.

  snr_shift: multiply every step's SNR by this factor (`schedules.shift_snr`; 1 = official).

  `timestep_respacing` "" or None keeps all `diffusion_steps`; "250", "10,20,30", "ddim50" or
  a list of section counts respace (see `respacing`). DiT trains with the defaults
  (linear, 1000 steps, learned sigma, loss = mse + vb) and samples with "250".
  """
  betas = schedules.shift_snr(schedules.get_named_beta_schedule(noise_schedule, diffusion_steps),
                              snr_shift)
  if use_kl:
    loss_type = "rescaled_kl"
  elif rescale_learned_sigmas:
    loss_type = "rescaled_mse"
  else:
    loss_type = "mse"
  if timestep_respacing is None or timestep_respacing == "":
    timestep_respacing = [diffusion_steps]
  use = respacing.space_timesteps(diffusion_steps, timestep_respacing)
  new_betas, tmap = respacing.respace_betas(betas, use)
  if learn_sigma:
    var_type = "learned_range"
  else:
    var_type = "fixed_small" if sigma_small else "fixed_large"
  return from_betas(new_betas, timestep_map=tmap, original_num_steps=diffusion_steps,
                    model_var_type=var_type,
                    model_mean_type="start_x" if predict_xstart else "epsilon",
                    loss_type=loss_type)


def extract(table: np.ndarray, t, ndim: int) -> jnp.ndarray:
  """f32(table[t]) shaped (N, 1, ..., 1) to broadcast over an `ndim`-dim NHWC batch."""
  val = jnp.asarray(np.asarray(table, dtype=np.float32))[jnp.asarray(t)]
  return val.reshape(val.shape + (1,) * (ndim - val.ndim))


def model_timesteps(diff: GaussianDiffusion, t) -> jnp.ndarray:
  """The timesteps the model sees: timestep_map[t] (original 0..T-1 scale), int32."""
  return jnp.asarray(diff.timestep_map.astype(np.int32))[jnp.asarray(t)]


def q_mean_variance(diff: GaussianDiffusion, x_start, t):
  """(mean, variance, log_variance) of q(x_t | x_0): sqrt(abar) x_0, 1 - abar, log(1 - abar)."""
  nd = x_start.ndim
  mean = extract(diff.sqrt_alphas_cumprod, t, nd) * x_start
  variance = extract(1.0 - diff.alphas_cumprod, t, nd) * jnp.ones_like(x_start)
  log_variance = extract(diff.log_one_minus_alphas_cumprod, t, nd) * jnp.ones_like(x_start)
  return mean, variance, log_variance


def q_sample(diff: GaussianDiffusion, x_start, t, noise):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  nd = x_start.ndim
  return (extract(diff.sqrt_alphas_cumprod, t, nd) * x_start
          + extract(diff.sqrt_one_minus_alphas_cumprod, t, nd) * noise)


def q_posterior_mean_variance(diff: GaussianDiffusion, x_start, x_t, t):
  """(mean, variance, log_variance_clipped) of q(x_{t-1} | x_t, x_0)."""
  nd = x_t.ndim
  mean = (extract(diff.posterior_mean_coef1, t, nd) * x_start
          + extract(diff.posterior_mean_coef2, t, nd) * x_t)
  variance = extract(diff.posterior_variance, t, nd) * jnp.ones_like(x_t)
  log_variance = extract(diff.posterior_log_variance_clipped, t, nd) * jnp.ones_like(x_t)
  return mean, variance, log_variance


def predict_xstart_from_eps(diff: GaussianDiffusion, x_t, t, eps):
  """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
  nd = x_t.ndim
  return (extract(diff.sqrt_recip_alphas_cumprod, t, nd) * x_t
          - extract(diff.sqrt_recipm1_alphas_cumprod, t, nd) * eps)


def predict_eps_from_xstart(diff: GaussianDiffusion, x_t, t, pred_xstart):
  """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1)."""
  nd = x_t.ndim
  return ((extract(diff.sqrt_recip_alphas_cumprod, t, nd) * x_t - pred_xstart)
          / extract(diff.sqrt_recipm1_alphas_cumprod, t, nd))


def split_model_output(diff: GaussianDiffusion, model_output, x_t):
  """(mean-part C channels, variance values v or None), checking the channel count."""
  c = x_t.shape[-1]
  want = 2 * c if diff.learn_sigma else c
  if model_output.shape != x_t.shape[:-1] + (want,):
    raise ValueError(f"model_output shape {model_output.shape}: expected "
                     f"{x_t.shape[:-1] + (want,)} (model_var_type={diff.model_var_type!r}, "
                     f"x_t channels C={c})")
  if diff.learn_sigma:
    return model_output[..., :c], model_output[..., c:]
  return model_output, None


def p_mean_variance(diff: GaussianDiffusion, model_output, x_t, t, clip_denoised: bool = False):
  """Mean, variance, log_variance and pred_xstart of p(x_{t-1} | x_t) (official, NHWC).

  `model_output` is the model's output at (x_t, timestep_map[t]): (N, H, W, 2C) eps and v for
  "learned_range", (N, H, W, C) otherwise. pred_xstart is clamped to [-1, 1] iff clip_denoised.
  """
  nd = x_t.ndim
  out, v = split_model_output(diff, model_output, x_t)
  if diff.model_var_type == "learned_range":
    min_log = extract(diff.posterior_log_variance_clipped, t, nd)
    max_log = extract(np.log(diff.betas), t, nd)
    frac = (v + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    if diff.model_var_type == "fixed_large":
      var_table = np.append(diff.posterior_variance[1], diff.betas[1:])
      log_table = np.log(var_table)
    else:
      var_table, log_table = diff.posterior_variance, diff.posterior_log_variance_clipped
    variance = extract(var_table, t, nd) * jnp.ones_like(x_t)
    log_variance = extract(log_table, t, nd) * jnp.ones_like(x_t)
  if diff.model_mean_type == "start_x":
    pred_xstart = out
  else:
    pred_xstart = predict_xstart_from_eps(diff, x_t, t, out)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1, 1)
  mean, _, _ = q_posterior_mean_variance(diff, pred_xstart, x_t, t)
  return {"mean": mean, "variance": variance, "log_variance": log_variance,
          "pred_xstart": pred_xstart}
