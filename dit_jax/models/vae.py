"""The Stable Diffusion VAE (`AutoencoderKL`, diffusers' layout) in Flax linen, NHWC.

Owns the network and its configuration (`VAEConfig`, read from a diffusers `config.json`); the
weight files are read by `dit_jax.convert.vae`, the scaling and sampling of latents live in
`dit_jax.latent`. With `GN` a GroupNorm (`norm_num_groups` groups, eps 1e-6, affine), `Res` a
ResnetBlock2D `x -> s(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))` (s: a 1x1 `conv_shortcut`
where the channels change, else the identity) and `Attn` the mid-block attention
`x -> x + to_out_0(softmax(q k^T / sqrt(C)) v)`, q, k, v = to_q/to_k/to_v(GN(x)) over the H*W
positions (one head of all C channels):

  encoder: conv_in; down_blocks_i = layers_per_block x Res, then (except the last block)
           downsamplers_0: zero-pad bottom/right by 1, 3x3 conv stride 2 (diffusers'
           asymmetric (0, 1, 0, 1) padding); mid_block = Res, Attn, Res;
           conv_norm_out (GN), SiLU, conv_out -> 2 * latent_channels
  moments = quant_conv(encoder(x));  mean, logvar = split(moments);  logvar clipped to
           [-30, 20];  std = exp(logvar / 2)          (diffusers' DiagonalGaussianDistribution)
  decoder: post_quant_conv; conv_in; mid_block; up_blocks_i = (layers_per_block + 1) x Res,
           then (except the last block) upsamplers_0: nearest 2x upsampling, 3x3 conv;
           conv_norm_out, SiLU, conv_out -> out_channels

Every parameter path maps to a diffusers state_dict key by one rule (`dit_jax.convert.vae`):
`encoder/down_blocks_0/resnets_1/conv1/kernel` <-> `encoder.down_blocks.0.resnets.1.conv1.weight`
(a `_<n>` suffix is the `.<n>` index; `kernel`/`scale` are `weight`). Computation runs in
`dtype` (float32 by default, bfloat16 at scale); normalisation statistics and the attention
softmax stay in float32; parameters are float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.errors import UserError

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
GROUP_NORM_EPS = 1e-6  # diffusers' resnet_eps and conv_norm_out eps in the VAE.

# The diffusers AutoencoderKL defaults for keys a config.json may leave out.
_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,),
                 layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
                 scaling_factor=None, mid_block_add_attention=True, use_quant_conv=True,
                 use_post_quant_conv=True)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture of an `AutoencoderKL` (the fields of a diffusers `config.json`).

  Attributes:
    in_channels: image channels in (3).
    out_channels: image channels out (3).
    block_out_channels: channels of each resolution level, highest resolution first; the
      spatial downsampling factor is 2 ** (len(block_out_channels) - 1).
    layers_per_block: resnets per encoder block (decoder blocks have one more).
    latent_channels: channels of the latent (4 for Stable Diffusion).
    norm_num_groups: GroupNorm groups (32).
    scaling_factor: the `scaling_factor` of the config.json, or None if it has none (the
      published sd-vae-ft-* directories have none; the scale used is config.latent's).
    mid_block_add_attention: whether the mid blocks have their attention layer.
    use_quant_conv, use_post_quant_conv: whether the 1x1 quant convs exist.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float | None = None
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  @property
  def downsample(self) -> int:
    """Spatial factor between image and latent (8 for Stable Diffusion)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "config.json") -> VAEConfig:
    """The config of a diffusers `AutoencoderKL` `config.json` (a dict); checks what we support.

    Unknown keys (`_class_name`, `sample_size`, `force_upcast`, ...) are ignored; an
    architecture this module does not implement is a UserError naming the key.
    """
    if not isinstance(config, Mapping):
      raise UserError(f"{source}: expected a JSON object, got {type(config).__name__}")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise UserError(f"{source}: _class_name={name!r}; expected 'AutoencoderKL'")
    channels = tuple(int(x) for x in c["block_out_channels"])
    n = len(channels)
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
      types = tuple(c[key])
      if len(types) != n or any(t not in allowed for t in types):
        raise UserError(f"{source}: {key}={list(types)}; expected {n} x {allowed[0]!r} (one per "
                        f"block_out_channels entry)")
    if c["act_fn"] != "silu":
      raise UserError(f"{source}: act_fn={c['act_fn']!r}; only 'silu' is supported")
    groups = int(c["norm_num_groups"])
    if groups <= 0 or any(ch % groups for ch in channels):
      raise UserError(f"{source}: norm_num_groups={groups} must divide every "
                      f"block_out_channels entry {list(channels)}")
    if int(c["layers_per_block"]) < 1 or int(c["latent_channels"]) < 1:
      raise UserError(f"{source}: layers_per_block={c['layers_per_block']} and latent_channels="
                      f"{c['latent_channels']} must be positive")
    scale = c["scaling_factor"]
    return cls(in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
               block_out_channels=channels, layers_per_block=int(c["layers_per_block"]),
               latent_channels=int(c["latent_channels"]), norm_num_groups=groups,
               scaling_factor=None if scale is None else float(scale),
               mid_block_add_attention=bool(c["mid_block_add_attention"]),
               use_quant_conv=bool(c["use_quant_conv"]),
               use_post_quant_conv=bool(c["use_post_quant_conv"]))

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers `config.json` dict of this architecture (for writing test directories)."""
    n = len(self.block_out_channels)
    out = {"_class_name": "AutoencoderKL", "in_channels": self.in_channels,
           "out_channels": self.out_channels, "down_block_types": ["DownEncoderBlock2D"] * n,
           "up_block_types": ["UpDecoderBlock2D"] * n,
           "block_out_channels": list(self.block_out_channels),
           "layers_per_block": self.layers_per_block, "act_fn": "silu",
           "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
           "mid_block_add_attention": self.mid_block_add_attention,
           "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv}
    if self.scaling_factor is not None:
      out["scaling_factor"] = self.scaling_factor
    return out


def _group_norm(groups: int, name: str, dtype) -> nn.GroupNorm:
  # use_fast_variance=False: the two-pass variance of torch's GroupNorm (E[x^2] - E[x]^2 loses
  # digits on the large activations of the decoder).
  return nn.GroupNorm(num_groups=groups, epsilon=GROUP_NORM_EPS, use_fast_variance=False,
                      dtype=dtype, name=name)


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, padding=None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding (dropout 0, output scale 1)."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """The mid-block self-attention: one head over all channels, GroupNorm first, residual."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, hh, ww, c = x.shape
    h = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(n, hh * ww, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(c), axis=-1)  # float32 (diffusers upcasts).
    h = jnp.einsum("nqk,nkc->nqc", weights.astype(v.dtype), v)
    h = dense("to_out_0")(h)
    return x + h.reshape(x.shape)


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D with one layer: resnets_0, attentions_0, resnets_1."""
  channels: int
  groups: int
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """diffusers' Downsample2D(padding=0): pad (0, 1) at the bottom and right, 3x3 stride 2."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """diffusers' Upsample2D: nearest-neighbour 2x, then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, "conv", self.dtype)(x)


class EncoderBlock(nn.Module):
  """DownEncoderBlock2D: `num_layers` resnets, then `downsamplers_0` unless the last block."""
  channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.downsample:
      x = Downsample(self.channels, self.dtype, name="downsamplers_0")(x)
    return x


class DecoderBlock(nn.Module):
  """UpDecoderBlock2D: `num_layers` resnets, then `upsamplers_0` unless the last block."""
  channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.upsample:
      x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (N, H, W, in_channels) -> (N, H/f, W/f, 2 * latent_channels), f = downsample."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, g = self.config, self.config.norm_num_groups
    chans = cfg.block_out_channels
    x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
    for i, ch in enumerate(chans):
      x = EncoderBlock(ch, cfg.layers_per_block, g, i < len(chans) - 1, self.dtype,
                       name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", self.dtype)(x))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, g = self.config, self.config.norm_num_groups
    chans = tuple(reversed(cfg.block_out_channels))
    x = _conv(chans[0], 3, "conv_in", self.dtype)(z)
    x = MidBlock(chans[0], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = DecoderBlock(ch, cfg.layers_per_block + 1, g, i < len(chans) - 1, self.dtype,
                       name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(g, "conv_norm_out", self.dtype)(x))
    return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder: `moments(images) -> (mean, std)`, `decode(z) -> images`; NHWC.

  `__call__(images)` decodes the posterior mean (used to initialise all parameters).
  Outputs are float32 whatever the compute dtype.
  """
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype)

  def moments(self, images):
    """The diagonal Gaussian posterior q(z | images): (mean, std), float32, unscaled."""
    h = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return mean, jnp.exp(0.5 * logvar)

  def decode(self, z):
    """Images (float32, nominally [-1, 1], not clipped) of unscaled latents `z`."""
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    return self.decode(self.moments(images)[0])
