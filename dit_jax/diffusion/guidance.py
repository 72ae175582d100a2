"""Classifier-free guidance as a wrapper around the model function (not a model method).

This module owns guidance. The wrapped model sees one doubled batch: [x, x] with labels
[y, null] (and timesteps [t, t]); with eps_c / eps_u the conditional / unconditional outputs,

  mode "all":      eps = eps_u + s (eps_c - eps_u) on all C eps channels (Ho & Salimans 2022,
                   the textbook form); the variance channels keep the conditional values.
  mode "official": facebookresearch/DiT `forward_with_cfg`, which guides eps channels [0, 3)
                   only; eps channel 3 and the variance channels keep the conditional values.
                   DiT's released FIDs were computed this way. It is defined only for C = 4
                   (VAE latents); other channel counts raise ValueError.

Default: "all". It is the usual formulation and is defined for any channel count (pixel-space
models with C = 1 or 3 included), whereas "official" is a quirk the DiT authors kept "for exact
reproducibility" of their checkpoints' numbers. To reproduce the released DiT FIDs (or the
official sampler bit for bit), pass mode="official".

Official forward_with_cfg returns the doubled batch [g, g] on the guided channels and each
half's own values on the others; only the first (conditional) half is used by the sampler, and
that is what `combine` returns. scale = 1 returns the conditional output.

Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval
improves sample and distribution quality in diffusion models"): with `interval=(lo, hi)`,
guidance applies only where the (original-scale) timestep t satisfies lo <= t < hi; elsewhere
the output is the conditional model's own (one model call on the undoubled batch when no
sample of the batch is inside the interval). Guidance at high noise sets the class; leaving the
low-noise steps unguided keeps the diversity and detail that full-range guidance removes.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

MODES = ("all", "official")


def combine(out_cond, out_uncond, scale, mode: str, eps_channels: int):
  """Guided output (shape of out_cond) from the conditional and unconditional outputs (NHWC).

  Args:
    out_cond, out_uncond: model outputs, (..., channels), channels = eps_channels (fixed
      variance) or 2 * eps_channels (eps then variance values).
    scale: guidance scale s (1 = no guidance).
    mode: "all" | "official" (see the module docstring).
    eps_channels: C, the number of eps channels (the data's channel count).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  if out_cond.shape != out_uncond.shape:
    raise ValueError(f"out_cond {out_cond.shape} and out_uncond {out_uncond.shape} differ")
  if out_cond.shape[-1] < eps_channels:
    raise ValueError(f"output has {out_cond.shape[-1]} channels < eps_channels={eps_channels}")
  if mode == "official":
    if eps_channels != 4:
      raise ValueError(f"mode='official' guides channels [0, 3) of 4-channel latents and "
                       f"needs C == 4, got C={eps_channels}; use mode='all'")
    g = 3
  else:
    g = eps_channels
  guided = out_uncond[..., :g] + scale * (out_cond[..., :g] - out_uncond[..., :g])
  return jnp.concatenate([guided, out_cond[..., g:]], axis=-1)


def check_interval(interval, field: str = "interval"):
  """None, or (lo, hi) with 0 <= lo < hi as a tuple of two ints; else a ValueError naming `field`."""
  if interval is None:
    return None
  try:
    lo, hi = (int(v) for v in interval)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}={interval!r} must be None or two timesteps (lo, hi)") from e
  if not 0 <= lo < hi:
    raise ValueError(f"{field}={interval!r} must satisfy 0 <= lo < hi")
  return lo, hi


def classifier_free_guidance(model_fn: Callable, scale, *, null_label: int, mode: str = "all",
                             interval=None):
  """Wraps model_fn(x, t, y) into guided_fn(x, t, y) running cond and uncond in one batch.

  x: (N, H, W, C), t: (N,), y: (N,) class labels. Returns an output shaped like
  model_fn(x, t, y), guided as `combine(..., scale, mode, eps_channels=C)`.
  For the samplers bind the labels: `lambda x, t: guided_fn(x, t, y)`.
  interval: None (guide every step) or (lo, hi): guide only where lo <= t < hi, t on the
    original timestep scale the samplers pass to the model (see the module docstring).
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")
  interval = check_interval(interval)

  def guided_fn(x, t, y):
    n = x.shape[0]
    c = x.shape[-1]
    if mode == "official" and c != 4:
      raise ValueError(f"mode='official' needs C == 4 channels, got C={c}; use mode='all'")
    t = jnp.broadcast_to(jnp.asarray(t), (n,))
    y = jnp.asarray(y)
    y_null = jnp.full_like(y, null_label)

    def guided(operands):
      x, t, y = operands
      out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                     jnp.concatenate([y, y_null], axis=0))
      guided = combine(out[:n], out[n:], scale, mode, c)
      if interval is None:
        return guided
      inside = (t >= interval[0]) & (t < interval[1])
      return jnp.where(inside.reshape((n,) + (1,) * (x.ndim - 1)), guided, out[:n])

    if interval is None:
      return guided((x, t, y))
    inside = (t >= interval[0]) & (t < interval[1])
    return jax.lax.cond(jnp.any(inside), guided, lambda ops: model_fn(*ops), (x, t, y))

  return guided_fn


def autoguidance(model_fn: Callable, guide_fn: Callable, scale):
  """Wraps model_fn(x, t, y) and a weaker guide_fn(x, t, y) into guided_fn(x, t, y).

  Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
  the same extrapolation as classifier-free guidance, eps = eps_guide + s (eps_model -
  eps_guide), but away from a weaker model of the *same* conditional distribution (here: an
  earlier EMA snapshot of the same run) rather than from the unconditional model. Both see the
  same labels, so it corrects the model's errors without trading diversity for class fidelity.
  The variance channels keep the model's values (mode "all" of `combine`); scale = 1 gives
  model_fn's output up to rounding (callers skip the guide then). Composes with
  `classifier_free_guidance`: wrap the autoguided function in it.
  """
  def guided_fn(x, t, y):
    return combine(model_fn(x, t, y), guide_fn(x, t, y), scale, "all", x.shape[-1])

  return guided_fn
