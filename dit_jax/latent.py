"""The latent codec: images <-> scaled latents through the Stable Diffusion VAE.

The one place where DiT's latent space is defined (official train.py / sample.py):

  moments(x)     = (mean, std) of the VAE posterior q(z | x), unscaled, NHWC float32
  encode(x, rng) = (mean + std * eps) * scale_factor,  eps ~ N(0, I) from rng
                   (the official `vae.encode(x).latent_dist.sample().mul_(0.18215)`)
  decode(z)      = VAE decoder(z / scale_factor), images nominally in [-1, 1], not clipped

`scale_factor` is `config.latent.scale_factor` (0.18215, the official constant); a VAE whose
config.json names another `scaling_factor` is refused. The VAE parameters are never part of
the codec: every method takes them as its first argument, so jitted callers pass them as
explicit (replicated) arguments instead of baking ~84M constants into the compiled program.
The methods are pure and jittable; batch sharding is the caller's (inputs sharded over the
batch give outputs sharded over the batch). `dtype` is the compute dtype ("float32" by
default, "bfloat16" at scale); outputs are float32.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.convert import vae as convert_vae
from dit_jax.errors import UserError
from dit_jax.models.vae import AutoencoderKL

ENCODERS = ("none", "sd-vae-ft-ema", "sd-vae-ft-mse")  # config.latent.encoder; "none": pixels.
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """Encode/decode between images and DiT's scaled latents (see the module docstring).

  Attributes:
    vae: the `AutoencoderKL` module (its own dtype is replaced by `dtype`).
    scale_factor: latents = posterior sample * scale_factor (0.18215).
    dtype: compute dtype of the VAE, "float32" or "bfloat16".
  """
  vae: AutoencoderKL
  scale_factor: float
  dtype: str = "float32"

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise UserError(f"config.latent.dtype={self.dtype!r}; expected one of {DTYPES}")

  @property
  def _module(self) -> AutoencoderKL:
    return self.vae.clone(dtype=jnp.dtype(self.dtype))

  def moments(self, vae_params, images):
    """(mean, std) of the posterior of `images` (N, H, W, C) in [-1, 1]; unscaled, float32."""
    return self._module.apply({"params": vae_params}, images, method="moments")

  def encode(self, vae_params, images, rng):
    """A posterior sample times `scale_factor`: (mean + std * eps) * scale_factor."""
    mean, std = self.moments(vae_params, images)
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return (mean + std * eps) * self.scale_factor

  def decode(self, vae_params, latents):
    """Images (N, H, W, C), float32, nominally [-1, 1], of scaled `latents`."""
    z = latents.astype(jnp.float32) / self.scale_factor
    return self._module.apply({"params": vae_params}, z, method="decode")

  def latent_shape(self, image_shape) -> tuple[int, int, int]:
    """(h, w, c) of the latents of images of shape (H, W, C)."""
    cfg = self.vae.config
    h, w, c = (int(s) for s in image_shape)
    f = cfg.downsample
    if c != cfg.in_channels or h % f or w % f:
      raise UserError(f"images of shape {(h, w, c)} do not fit the VAE: it expects "
                      f"{cfg.in_channels} channels and a height and width divisible by {f}")
    return (h // f, w // f, cfg.latent_channels)


def from_config(config_latent) -> tuple[LatentCodec | None, dict | None]:
  """(codec, vae_params as numpy) of `config.latent`; (None, None) in pixel space.

  Reads `config.latent.vae_dir` (a local diffusers AutoencoderKL directory; nothing is
  downloaded) and checks its config.json against `scale_factor`, `channels` and `downsample`.
  """
  name = config_latent.encoder
  if name not in ENCODERS:
    raise UserError(f"config.latent.encoder={name!r}; expected one of {ENCODERS}")
  if name == "none":
    return None, None
  vae_dir = config_latent.get("vae_dir")
  if not vae_dir:
    raise UserError(
        f"config.latent.encoder={name!r} needs config.latent.vae_dir: a local diffusers VAE "
        f"directory (e.g. a copy of Hugging Face's stabilityai/{name} with config.json and "
        "diffusion_pytorch_model.safetensors); nothing is downloaded")
  vae_config, params = convert_vae.load_diffusers_vae(vae_dir)
  scale = float(config_latent.scale_factor)
  if vae_config.scaling_factor is not None and vae_config.scaling_factor != scale:
    raise UserError(f"config.latent.scale_factor={scale} but {vae_dir}/config.json has "
                    f"scaling_factor={vae_config.scaling_factor}; set one to the other")
  for field, ours, theirs in (("channels", config_latent.get("channels"),
                               vae_config.latent_channels),
                              ("downsample", config_latent.get("downsample"),
                               vae_config.downsample)):
    if ours is not None and int(ours) != theirs:
      raise UserError(f"config.latent.{field}={ours} but the VAE in {vae_dir} has {theirs}")
  dtype = config_latent.get("dtype") or "float32"
  return LatentCodec(AutoencoderKL(vae_config), scale, dtype), params


def replicate(vae_params, sharding: jax.sharding.Sharding):
  """Host (numpy) VAE parameters -> jax.Arrays with `sharding` (replicated), on every host."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, vae_params)
