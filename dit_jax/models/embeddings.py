"""Input embeddings of DiT: patches, timesteps, class labels and the fixed 2-D position table.

Owns the four embedders of the official `models.py` (facebookresearch/DiT), with the same
initialisation and the same float32 arithmetic:

* `timestep_embedding(t)`: `f_k = exp(-ln(max_period) * k / half)`, k = 0..half-1 (float32),
  `args = float32(t) * f_k`, result `[cos(args), sin(args)]` (cos first), zero-padded when
  `dim` is odd.
* `TimestepEmbedder`: `mlp_2(SiLU(mlp_0(timestep_embedding(t))))`, weights N(0, 0.02^2),
  biases 0.
* `LabelEmbedder`: `embedding_table[y]`; with `dropout_prob > 0` the table has
  `num_classes + 1` rows, the last one being the null (unconditional) class. In train mode each
  label is replaced by the null id with probability `dropout_prob` (classifier-free guidance
  training); `force_drop_ids == 1` forces the drop.
* `PatchEmbed`: conv with kernel = stride = p, VALID padding, NHWC in, `(N, T, D)` out with
  tokens in row-major order of the patch grid (`m = i * (W/p) + j`). The kernel is
  xavier-uniform over the flattened `(p*p*C) -> D` linear map, as the official
  `xavier_uniform_(w.view(w.shape[0], -1))`; bias 0.
* `get_2d_sincos_pos_embed(D, g)`: float64 numpy table `(g*g, D)`; token `m = i*g + j` gets
  `[sin(j w), cos(j w), sin(i w), cos(i w)]`, `w_k = 10000^(-k / (D/4))`: the first half
  encodes the column j, and sin comes before cos. It is a constant, never a parameter.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Official `initialize_weights`: std 0.02 for the timestep MLP and the label table.
EMBED_STD = 0.02


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: int = 10000) -> jax.Array:
  """Sinusoidal timestep features, float32 `(N, dim)`, `[cos, sin]` like the official code."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """`(M, embed_dim)` float64: `[sin(pos * w), cos(pos * w)]`, `w_k = 10000^(-k/(D/2))`."""
  if embed_dim % 2:
    raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """The official fixed position table, float64 `(grid_size**2, embed_dim)`.

  Same operations in the same order as the official numpy code, so the values agree to the
  last bit: the first half of the features encodes the column index j (the official
  `np.meshgrid(grid_w, grid_h)` puts w first), the second half the row index i.
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos position "
                     f"embedding, got {embed_dim}")
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # column index j
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # row index i
  return np.concatenate([emb_h, emb_w], axis=1)


def xavier_uniform_flat() -> nn.initializers.Initializer:
  """Xavier-uniform of a conv kernel `(kh, kw, C, D)` seen as a `(kh*kw*C) -> D` linear map."""
  return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                          out_axis=-1)


class PatchEmbed(nn.Module):
  """Patchify: `(N, H, W, C)` -> `(N, (H/p)*(W/p), D)`, row-major over the patch grid.

  Attributes:
    patch_size: p, the conv kernel and stride.
    hidden_size: D, the token width.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                kernel_init=xavier_uniform_flat(), bias_init=nn.initializers.zeros,
                dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    self.sow("intermediates", "out", x)
    return x


class TimestepEmbedder(nn.Module):
  """`t -> mlp_2(SiLU(mlp_0(timestep_embedding(t))))`, `(N,) -> (N, D)`.

  Attributes:
    hidden_size: D.
    frequency_embedding_size: width of the sinusoidal features (256 in DiT).
    dtype: computation dtype of the MLP (the features are always float32).
    param_dtype: parameter dtype.
  """
  hidden_size: int
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    dense = lambda name: nn.Dense(  # noqa: E731
        self.hidden_size, kernel_init=nn.initializers.normal(EMBED_STD),
        bias_init=nn.initializers.zeros, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    self.mlp_0 = dense("mlp_0")
    self.mlp_2 = dense("mlp_2")

  def embed_frequencies(self, t_freq: jax.Array) -> jax.Array:
    """The MLP on precomputed `timestep_embedding` features."""
    emb = self.mlp_2(nn.silu(self.mlp_0(t_freq)))
    self.sow("intermediates", "out", emb)
    return emb

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.embed_frequencies(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
  """Class labels -> `(N, D)`, with label dropout for classifier-free guidance.

  Attributes:
    num_classes: number of real classes; the null class id is `num_classes`.
    hidden_size: D.
    dropout_prob: probability of replacing a label by the null class in train mode. A null
      row exists only when it is > 0 (as in the official code).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def token_drop(self, labels: jax.Array, force_drop_ids: Optional[jax.Array] = None):
    if force_drop_ids is None:
      if not self.has_rng("label_dropout"):
        raise ValueError(
            "train=True with class_dropout_prob="
            f"{self.dropout_prob} needs a 'label_dropout' rng: "
            "model.apply(..., train=True, rngs={'label_dropout': key})")
      u = jax.random.uniform(self.make_rng("label_dropout"), labels.shape)
      drop = u < self.dropout_prob
    else:
      drop = jnp.asarray(force_drop_ids) == 1
    return jnp.where(drop, self.num_classes, labels)

  @nn.compact
  def __call__(self, labels: jax.Array, train: bool,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    use_cfg_embedding = int(self.dropout_prob > 0)
    table = nn.Embed(self.num_classes + use_cfg_embedding, self.hidden_size,
                     embedding_init=nn.initializers.normal(EMBED_STD), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embedding_table")
    labels = jnp.asarray(labels)
    if (train and self.dropout_prob > 0) or force_drop_ids is not None:
      labels = self.token_drop(labels, force_drop_ids)
    emb = table(labels)
    self.sow("intermediates", "out", emb)
    return emb
