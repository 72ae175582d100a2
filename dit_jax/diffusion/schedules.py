"""Beta schedules beta_1..beta_T, as float64 numpy arrays (official `get_named_beta_schedule`).

This module owns the forward-process noise schedules. Everything is float64 numpy, exactly as
the official `diffusion/gaussian_diffusion.py`; tables are cast to float32 only where used.

* ``linear`` (Ho et al. 2020), scaled so any T matches the T = 1000 shape:
    s = 1000 / T,   betas = linspace(s * 1e-4, s * 2e-2, T)        (float64)
* ``cosine`` (Nichol & Dhariwal 2021; the official name is ``squaredcos_cap_v2``):
    alpha_bar(u) = cos((u + 0.008) / 1.008 * pi / 2) ** 2,
    beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999),   i = 0..T-1

`shift_snr(betas, s)` multiplies the signal-to-noise ratio of every step by s (an option, 1 in
the DiT recipes; "simple diffusion", Hoogeboom et al. 2023, shifts log-SNR by the resolution):
    SNR'_t = s * SNR_t,  alpha_bar'_t = s alpha_bar_t / (1 + (s - 1) alpha_bar_t),
    beta'_t = min(1 - alpha_bar'_t / alpha_bar'_{t-1}, 0.999).
Noise destroys a small image's content sooner than a large one's (averaging k x k pixels
raises the SNR k^2-fold), so schedules tuned at 32-256 px spend many steps on pure noise at
8 px; s > 1 moves them to noise levels that still carry the image.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

NAMES = ("linear", "cosine", "squaredcos_cap_v2")


def linear(num_timesteps: int) -> np.ndarray:
  """Linear schedule 1e-4 -> 2e-2 over 1000 steps, both ends scaled by 1000 / T."""
  _check_steps(num_timesteps)
  scale = 1000 / num_timesteps
  return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), i = 0..T-1 (float64)."""
  _check_steps(num_timesteps)
  betas = []
  for i in range(num_timesteps):
    t1 = i / num_timesteps
    t2 = (i + 1) / num_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas, dtype=np.float64)


def cosine(num_timesteps: int) -> np.ndarray:
  """Cosine schedule (official "squaredcos_cap_v2"), betas capped at 0.999."""
  return betas_for_alpha_bar(
      num_timesteps, lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)


def shift_snr(betas: np.ndarray, factor: float, max_beta: float = 0.999) -> np.ndarray:
  """Betas whose SNR_t = alpha_bar_t / (1 - alpha_bar_t) is `factor` times that of `betas`."""
  if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) \
      or not math.isfinite(factor) or factor <= 0:
    raise ValueError(f"snr_shift={factor!r} must be a finite number > 0 (1 = no shift)")
  betas = np.asarray(betas, dtype=np.float64)
  if factor == 1:
    return betas
  alpha_bar = np.cumprod(1.0 - betas)
  shifted = factor * alpha_bar / (1.0 + (factor - 1.0) * alpha_bar)
  prev = np.concatenate([[1.0], shifted[:-1]])
  return np.minimum(1.0 - shifted / prev, max_beta)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Returns the float64 betas of schedule `name` ("linear" | "cosine" | "squaredcos_cap_v2")."""
  if name == "linear":
    return linear(num_timesteps)
  if name in ("cosine", "squaredcos_cap_v2"):
    return cosine(num_timesteps)
  raise ValueError(f"noise_schedule={name!r} is unknown; expected one of {NAMES}")


def _check_steps(num_timesteps) -> None:
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) \
      or num_timesteps <= 0:
    raise ValueError(f"diffusion_steps={num_timesteps!r} must be a positive integer")
