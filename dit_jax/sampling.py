"""Class-conditional sample generation with the EMA parameters (grids and the samples file).

Owns the sampling path used during and after training: a respaced diffusion of
`sample.num_sampling_steps` steps, optional autoguidance by an earlier EMA snapshot
(`diffusion.autoguidance`, `sample.autoguidance_scale` / `sample.autoguidance_step`) and
classifier-free guidance wrapped around the model function
(`diffusion.classifier_free_guidance`, null label = num_classes), the ancestral DDPM (or DDIM)
loop with the noise design of `sample.noise` (`diffusion.noise`: "iid", the official sampler,
unless a config asks otherwise), and decoding to images (identity in pixel space; the VAE
decoder for latent configs):

  x_T ~ N(0, I) from fold_in(key, 0);  x_0 = loop(guided_model, x_T, fold_in(key, 1))
  images = decode(x_0) in [-1, 1]  ->  uint8 = clip(127.5 x + 128, 0, 255)

One jitted function per batch shape; batches are padded to `sample.batch_size` so the final
samples of any count compile once. The jitted function runs on every process (it is a
collective under a multi-host mesh) and returns a replicated array; callers write files on
process 0 only.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import diffusion as dd
from dit_jax import errors
from dit_jax import images as image_lib
from dit_jax.diffusion import noise as noise_lib

SAMPLERS = ("ddpm", "ddim")


def create_sampling_diffusion(config_diffusion, config_sample) -> dd.GaussianDiffusion:
  """The training diffusion respaced to `num_sampling_steps` ("N" for DDPM, "ddimN" for DDIM)."""
  steps = int(config_sample.num_sampling_steps)
  if config_sample.sampler not in SAMPLERS:
    raise errors.UserError(f"config.sample.sampler={config_sample.sampler!r}; expected one of "
                     f"{SAMPLERS}.")
  respacing = f"ddim{steps}" if config_sample.sampler == "ddim" else str(steps)
  return dd.create_diffusion(
      timestep_respacing=respacing,
      noise_schedule=config_diffusion.noise_schedule,
      diffusion_steps=int(config_diffusion.diffusion_steps),
      learn_sigma=bool(config_diffusion.learn_sigma),
      sigma_small=bool(config_diffusion.sigma_small),
      snr_shift=float(config_diffusion.get("snr_shift", 1.0)))


def sample(params, labels, key, *, model, diff, cfg_scale: float, guidance_mode: str,
           sampler: str, clip_denoised: bool, latent_shape: tuple[int, int, int],
           decode_fn: Callable | None, guidance_interval=None, guide_params=None,
           autoguidance_scale: float = 1.0, noise_design: str = "iid", groups=None,
           x_T=None, step_noise=None, vae_params=None):
  """Pure: images in [-1, 1] (N, H, W, C) for `labels` (N,), from `key`.

  key: one key (x_T from fold_in(key, 0), the loop's noise from fold_in(key, 1)), or typed
  keys (N,), one per sample: sample i's x_T from fold_in(key[i], 0) and its step-k noise from
  fold_in(fold_in(key[i], 1), k), whatever batch it is drawn in (`dit_jax.generate`).
  x_T, step_noise: the initial noise (N, h, w, c) and every step's (K, N, h, w, c), to
  reproduce a reference run; they replace the draws from `key`.
  guidance_interval: None (guide every step) or (lo, hi): guide where lo <= t < hi on the
  original timestep scale (`diffusion.classifier_free_guidance`).
  guide_params, autoguidance_scale: with a scale != 1, the parameters of the weaker guide
  model (same architecture, e.g. an earlier EMA snapshot) for `diffusion.autoguidance`;
  classifier-free guidance, if any, wraps the autoguided model.
  noise_design, groups: `diffusion.noise.apply` ties the batch's draws (x_T and every step's)
  together within groups of samples, by default the labels (`Sampler` gives padding entries
  groups of their own); "iid" leaves them independent.
  decode_fn, vae_params: `decode_fn(vae_params, latents)` (`latent.LatentCodec.decode`) maps
  the final latents to images; None in pixel space. The VAE parameters are an argument, never
  closed over, so jit does not compile them in as constants.
  """
  n = labels.shape[0]
  groups = labels if groups is None else groups
  tie = lambda z: noise_lib.apply(z, groups, noise_design)
  per_sample = (key is not None and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                and key.ndim == 1)
  if x_T is None:
    if per_sample:
      x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), tuple(latent_shape),
                                                 jnp.float32))(key)
    else:
      x_T = jax.random.normal(jax.random.fold_in(key, 0), (n,) + tuple(latent_shape),
                              jnp.float32)
  noise = tie(x_T)

  def model_fn(x, t, y):
    return model.apply({"params": params}, x, t, y)

  if autoguidance_scale != 1.0:
    if guide_params is None:
      raise ValueError(f"autoguidance_scale={autoguidance_scale} needs guide_params")
    def guide_fn(x, t, y):
      return model.apply({"params": guide_params}, x, t, y)

    model_fn = dd.autoguidance(model_fn, guide_fn, autoguidance_scale)
  if cfg_scale != 1.0:
    model_fn = dd.classifier_free_guidance(model_fn, cfg_scale, null_label=model.num_classes,
                                           mode=guidance_mode, interval=guidance_interval)
  loop_fn = lambda x, t: model_fn(x, t, labels)
  if step_noise is not None:
    loop_key = None
  elif per_sample:
    loop_key = jax.vmap(lambda k: jax.random.fold_in(k, 1))(key)
  else:
    loop_key = jax.random.fold_in(key, 1)
  noise_fn = None if noise_design == "iid" else tie
  if sampler == "ddim":
    x0 = dd.ddim_sample_loop(diff, loop_fn, noise, loop_key, clip_denoised=clip_denoised,
                             noise_fn=noise_fn, step_noise=step_noise)
  else:
    x0 = dd.p_sample_loop(diff, loop_fn, noise, loop_key, clip_denoised=clip_denoised,
                          noise_fn=noise_fn, step_noise=step_noise)
  return decode_fn(vae_params, x0) if decode_fn is not None else x0


class Sampler:
  """Jitted EMA sampling for a fixed batch size; `__call__` returns uint8 numpy images."""

  def __init__(self, model, config, mesh, latent_shape, decode_fn=None,
               batch_size: int | None = None, autoguided: bool = True):
    """autoguided=False ignores `config.sample.autoguidance_scale` (training-time grids)."""
    self.batch_size = int(batch_size or config.sample.batch_size)
    self.autoguidance_scale = autoguidance_scale(config.sample) if autoguided else 1.0
    diff = create_sampling_diffusion(config.diffusion, config.sample)
    fn = functools.partial(
        sample, model=model, diff=diff, cfg_scale=float(config.sample.cfg_scale),
        guidance_mode=config.sample.guidance_mode, sampler=config.sample.sampler,
        clip_denoised=bool(config.sample.clip_denoised), latent_shape=tuple(latent_shape),
        decode_fn=decode_fn,
        guidance_interval=dd.guidance.check_interval(config.sample.get("guidance_interval"),
                                                     "config.sample.guidance_interval"),
        autoguidance_scale=self.autoguidance_scale,
        noise_design=noise_lib.check(config.sample.get("noise", "iid"), "config.sample.noise"))
    # The key is made inside jit from host integers: a key array computed eagerly would live
    # on one local device, which a multi-process jit cannot take. Replicated output so every
    # process can read it; the parameters keep their shardings.
    def from_seed(params, labels, groups, seed, chunk, guide_params, vae_params):
      return fn(params, labels, jax.random.fold_in(jax.random.key(seed), chunk),
                guide_params=guide_params, groups=groups, vae_params=vae_params)
    self._fn = jax.jit(from_seed, out_shardings=NamedSharding(mesh, P()))

  def __call__(self, params, labels: np.ndarray, seed: int, guide_params=None,
               vae_params=None) -> np.ndarray:
    """uint8 (N, H, W, C) samples of `labels`; batch b uses fold_in(key(seed), b).

    guide_params: the autoguidance guide's parameters; needed iff
    `config.sample.autoguidance_scale` != 1, ignored otherwise.
    vae_params: the parameters of `decode_fn` (the VAE), an argument of the jitted sampler.
    """
    if self.autoguidance_scale == 1.0:
      guide_params = None
    elif guide_params is None:
      raise errors.UserError(f"config.sample.autoguidance_scale={self.autoguidance_scale} needs the "
                       "guide's parameters (the EMA parameters of the checkpoint at "
                       "config.sample.autoguidance_step)")
    labels = np.asarray(labels, np.int32)
    out = []
    for b, start in enumerate(range(0, len(labels), self.batch_size)):
      chunk = labels[start:start + self.batch_size]
      pad = self.batch_size - len(chunk)
      padded = np.pad(chunk, (0, pad))
      groups = np.concatenate([chunk, -1 - np.arange(pad, dtype=np.int32)])  # Padding: alone.
      images = self._fn(params, padded, groups, np.uint32(seed), np.uint32(b), guide_params,
                        vae_params)
      out.append(image_lib.to_uint8(np.asarray(images))[:len(chunk)])
    return np.concatenate(out, axis=0)


def autoguidance_scale(config_sample) -> float:
  """`config.sample.autoguidance_scale` (1 = off, also when the field is absent), checked."""
  scale = config_sample.get("autoguidance_scale")
  scale = 1.0 if scale is None else float(scale)
  if not np.isfinite(scale):
    raise errors.UserError(f"config.sample.autoguidance_scale={scale!r} must be a finite number "
                     "(1 = no autoguidance)")
  return scale


def autoguidance_step(config_sample, total_steps: int, save_every_steps: int) -> int | None:
  """The training step whose EMA parameters guide the final samples, or None (no autoguidance).

  It must be a saved step before the last one (0 < step < total_steps, a multiple of
  `config.checkpoint.save_every_steps`); the checkpoint manager then keeps it.
  """
  if autoguidance_scale(config_sample) == 1.0:
    return None
  step = config_sample.get("autoguidance_step")
  if step is None or not 0 < int(step) < int(total_steps) or int(step) % int(save_every_steps):
    raise errors.UserError(
        f"config.sample.autoguidance_step={step!r} must be a saved step before the end of "
        f"training: 0 < step < config.total_steps={total_steps} and a multiple of "
        f"config.checkpoint.save_every_steps={save_every_steps} "
        f"(config.sample.autoguidance_scale={config_sample.get('autoguidance_scale')} != 1).")
  return int(step)


def grid_labels(classes, per_class: int, num_classes: int | None = None) -> np.ndarray:
  """Labels of a grid: each class repeated `per_class` times (one row per class).

  With `num_classes`, every class must be a real one (0 <= c < num_classes): label
  num_classes is the null label of classifier-free guidance, larger ones index nothing.
  """
  classes = tuple(int(c) for c in classes)
  if num_classes is not None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
      raise errors.UserError(
          f"config.logging.grid_classes has {bad}, not classes of config.model.num_classes="
          f"{num_classes} (0..{num_classes - 1}); set --config.logging.grid_classes to a tuple "
          "of class ids in that range.")
  return np.repeat(np.asarray(classes, np.int32), per_class)


def file_meta(config, *, checkpoint: str, step: int | None, num_samples: int, **extra) -> dict:
  """The `sample_files` record of samples drawn with `config.sample` (training's final ones)."""
  s = config.sample
  meta = {
      "checkpoint": checkpoint, "step": step, "variant": config.model.get("variant"),
      "image_size": config.data.get("image_size"), "sampler": s.sampler,
      "num_sampling_steps": int(s.num_sampling_steps), "cfg_scale": float(s.cfg_scale),
      "guidance_mode": s.guidance_mode, "noise": s.get("noise", "iid"), "seed": int(s.seed),
      "num_samples": int(num_samples), "clip_denoised": bool(s.clip_denoised),
      "guidance_interval": s.get("guidance_interval"),
      "autoguidance_scale": autoguidance_scale(s),
      "autoguidance_step": s.get("autoguidance_step"),
  }
  meta.update(extra)
  return meta
