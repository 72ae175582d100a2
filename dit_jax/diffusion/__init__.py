"""Gaussian diffusion for DiT: schedules, respacing, q/p maths, losses, samplers, guidance,
noise designs (`noise`: i.i.d., antithetic or centred draws across a sampler batch).

Pure functions over the frozen `GaussianDiffusion` dataclass of float64 numpy tables, exact to
facebookresearch/DiT's `diffusion/` (which is OpenAI's improved/guided-diffusion). NHWC.

    from dit_jax import diffusion as dd
    diff = dd.create_diffusion("250")                 # K = 250 respaced steps
    losses = dd.training_losses(diff, model_fn, x0, t, noise)   # model_fn(x_t, model_t)
    x0 = dd.p_sample_loop(diff, model_fn, z, key)
"""
from dit_jax.diffusion.gaussian import (
    GaussianDiffusion, create_diffusion, extract, from_betas, model_timesteps,
    p_mean_variance, predict_eps_from_xstart, predict_xstart_from_eps,
    q_mean_variance, q_posterior_mean_variance, q_sample, split_model_output)
from dit_jax.diffusion.guidance import autoguidance, classifier_free_guidance, combine
from dit_jax.diffusion.noise import NOISE_DESIGNS
from dit_jax.diffusion.losses import (
    TIMESTEP_SAMPLING, approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat,
    normal_kl, sample_timesteps, training_losses, vb_terms_bpd)
from dit_jax.diffusion.respacing import respace_betas, space_timesteps
from dit_jax.diffusion.samplers import ddim_sample, ddim_sample_loop, p_sample, p_sample_loop
from dit_jax.diffusion.schedules import betas_for_alpha_bar, cosine, get_named_beta_schedule, linear

__all__ = [
    "GaussianDiffusion", "create_diffusion", "extract", "from_betas", "model_timesteps",
    "p_mean_variance", "predict_eps_from_xstart", "predict_xstart_from_eps", "q_mean_variance",
    "q_posterior_mean_variance", "q_sample", "split_model_output", "autoguidance",
    "classifier_free_guidance", "combine", "NOISE_DESIGNS", "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl", "training_losses",
    "vb_terms_bpd", "respace_betas", "space_timesteps",
    "ddim_sample", "ddim_sample_loop", "p_sample", "p_sample_loop", "betas_for_alpha_bar",
    "cosine", "get_named_beta_schedule", "linear",
]
