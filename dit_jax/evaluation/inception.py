"""The FID Inception-v3 (TensorFlow graph 2015-12-05) in Flax linen, NHWC, fed as ADM feeds it.

ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) feeds float32 images in
[0, 255] into the graph after its JPEG decoder (`ExpandDims:0`); the graph then resizes and
normalises them itself:

  x = ResizeBilinear(images, 299 x 299)   TensorFlow 1.x: align_corners=False and no
                                          half-pixel centres (`resize_bilinear_tf1` below;
                                          not `jax.image.resize`, which uses centres)
  x = (x - 128) / 128
  x -> the Inception-v3 trunk (torch-fidelity's TF-exact port: TF's avg pools exclude the
       padding, the last block max-pools its pool branch, batch norm eps 1e-3)

and reads (the names of the TF graph; torch-fidelity / pytorch-fid module names in brackets):

  pool     `pool_3:0`: the 2048 spatial means of the last block (FID, precision, recall)
  spatial  `mixed_6/conv:0` [Mixed_6d.branch1x1 after batch norm and ReLU], 17 x 17 x 192,
           its first 7 channels flattened in (h, w, c) order to 2023 values (sFID)
  logits   `softmax/logits/MatMul`: pool @ W, the 2048 x 1008 weight without the bias
           [torch-fidelity `logits_unbiased`]; ADM's Inception Score takes their softmax.

Module and parameter names follow the PyTorch ports (`Mixed_6d/branch1x1/conv/kernel` is
`Mixed_6d.branch1x1.conv.weight`), so `inception_weights` maps a published state dict by a
simple rule. The parameters are plain arrays (batch-norm statistics included) in one
`params` tree, an explicit argument of every jitted function that uses them.

Convolutions run at `precision="highest"` by default: float32 as the reference graph (GPUs
would otherwise use TF32, TPUs bfloat16 passes).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RESIZE_TO = 299
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7].
NUM_CLASSES = 1008
BN_EPS = 1e-3


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TensorFlow 1.x `ResizeBilinear(align_corners=False)` of NHWC float images.

  Output pixel i samples input coordinate i * (in / out) (no half-pixel offset), from the
  floor and the next pixel (clamped at the edge), lerped along W then H:
    top = a + (b - a) dx,  bottom = c + (d - c) dx,  out = top + (bottom - top) dy
  with the scale rounded to float32 as torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x` does.
  """
  _, h, w, _ = images.shape

  def grid(n_in, n_out):
    # Constants, computed in numpy float32 (XLA may fuse arithmetic it computes itself).
    pos = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = pos.astype(np.int32)  # Positions are >= 0: truncation is floor.
    return lo, np.minimum(lo + 1, n_in - 1), pos - lo.astype(np.float32)

  y_lo, y_hi, dy = grid(h, size[0])
  x_lo, x_hi, dx = grid(w, size[1])
  rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
  dx = dx[None, None, :, None]
  top = rows_lo[:, :, x_lo] + (rows_lo[:, :, x_hi] - rows_lo[:, :, x_lo]) * dx
  bottom = rows_hi[:, :, x_lo] + (rows_hi[:, :, x_hi] - rows_hi[:, :, x_lo]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with its statistics as parameters: x * a + (bias - mean * a),
  a = scale / sqrt(var + eps) (the order PyTorch's CPU kernel computes)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    alpha = scale / jnp.sqrt(var + BN_EPS)
    return x * alpha + (bias - mean * alpha)


class BasicConv(nn.Module):
  """conv (no bias) -> batch norm -> ReLU (torch-fidelity `BasicConv2d`).

  Attributes:
    features: output channels.
    kernel: (kh, kw).
    strides: stride in both directions.
    padding: (ph, pw) zero padding on both sides.
    precision: the convolution's `jax.lax.Precision` name.
  """
  features: int
  kernel: Sequence[int] = (1, 1)
  strides: int = 1
  padding: Sequence[int] = (0, 0)
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=jax.lax.Precision(self.precision), name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3_same(x):
  # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda name, f, k=(1, 1), p=(0, 0): BasicConv(f, k, 1, p, self.precision, name=name)
    b1 = conv("branch1x1", 64)(x)
    b5 = conv("branch5x5_2", 64, (5, 5), (2, 2))(conv("branch5x5_1", 48)(x))
    b3 = conv("branch3x3dbl_1", 64)(x)
    b3 = conv("branch3x3dbl_3", 96, (3, 3), (1, 1))(conv("branch3x3dbl_2", 96, (3, 3), (1, 1))(b3))
    bp = conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda name, f, k=(1, 1), s=1, p=(0, 0): BasicConv(f, k, s, p, self.precision,
                                                             name=name)
    b3 = conv("branch3x3", 384, (3, 3), 2)(x)
    bd = conv("branch3x3dbl_1", 64)(x)
    bd = conv("branch3x3dbl_2", 96, (3, 3), 1, (1, 1))(bd)
    bd = conv("branch3x3dbl_3", 96, (3, 3), 2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Returns (block output, the 1x1 branch: `mixed_N/conv` of the TF graph)."""
  channels_7x7: int
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda name, f, k=(1, 1), p=(0, 0): BasicConv(f, k, 1, p, self.precision, name=name)
    c7 = self.channels_7x7
    b1 = conv("branch1x1", 192)(x)
    b7 = conv("branch7x7_1", c7)(x)
    b7 = conv("branch7x7_2", c7, (1, 7), (0, 3))(b7)
    b7 = conv("branch7x7_3", 192, (7, 1), (3, 0))(b7)
    bd = conv("branch7x7dbl_1", c7)(x)
    bd = conv("branch7x7dbl_2", c7, (7, 1), (3, 0))(bd)
    bd = conv("branch7x7dbl_3", c7, (1, 7), (0, 3))(bd)
    bd = conv("branch7x7dbl_4", c7, (7, 1), (3, 0))(bd)
    bd = conv("branch7x7dbl_5", 192, (1, 7), (0, 3))(bd)
    bp = conv("branch_pool", 192)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda name, f, k=(1, 1), s=1, p=(0, 0): BasicConv(f, k, s, p, self.precision,
                                                             name=name)
    b3 = conv("branch3x3_2", 320, (3, 3), 2)(conv("branch3x3_1", 192)(x))
    b7 = conv("branch7x7x3_1", 192)(x)
    b7 = conv("branch7x7x3_2", 192, (1, 7), 1, (0, 3))(b7)
    b7 = conv("branch7x7x3_3", 192, (7, 1), 1, (3, 0))(b7)
    b7 = conv("branch7x7x3_4", 192, (3, 3), 2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """max_pool: the graph's last block pools its pool branch with a max (torch-fidelity
  `InceptionE_2`), the one before with an average excluding padding (`InceptionE_1`)."""
  max_pool: bool = False
  precision: str = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda name, f, k=(1, 1), p=(0, 0): BasicConv(f, k, 1, p, self.precision, name=name)
    b1 = conv("branch1x1", 320)(x)
    b3 = conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([conv("branch3x3_2a", 384, (1, 3), (0, 1))(b3),
                          conv("branch3x3_2b", 384, (3, 1), (1, 0))(b3)], axis=-1)
    bd = conv("branch3x3dbl_2", 384, (3, 3), (1, 1))(conv("branch3x3dbl_1", 448)(x))
    bd = jnp.concatenate([conv("branch3x3dbl_3a", 384, (1, 3), (0, 1))(bd),
                          conv("branch3x3dbl_3b", 384, (3, 1), (1, 0))(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """uint8 (or [0, 255] float) NHWC RGB images of any size -> {"pool", "spatial", "logits"}.

  Attributes:
    resize_to: the graph's resize target (299; smaller sizes >= 75 only for fast tests).
    precision: convolution and matmul precision ("highest": float32 as the reference).
  """
  resize_to: int = RESIZE_TO
  precision: str = "highest"

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = images.astype(jnp.float32)
    if x.shape[1:3] != (self.resize_to, self.resize_to):
      x = resize_bilinear_tf1(x, (self.resize_to, self.resize_to))
    x = (x - 128.0) / 128.0
    p = self.precision
    conv = lambda name, f, k, s=1, pad=(0, 0): BasicConv(f, k, s, pad, p, name=name)
    x = conv("Conv2d_1a_3x3", 32, (3, 3), 2)(x)
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = conv("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1))(x)
    x = _max_pool_3x3_s2(x)
    x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, p, name="Mixed_5b")(x)
    x = InceptionA(64, p, name="Mixed_5c")(x)
    x = InceptionA(64, p, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, p, name="Mixed_6d")(x)
    x, _ = InceptionC(192, p, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(False, p, name="Mixed_7b")(x)
    x = InceptionE(True, p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    # softmax/logits/MatMul: the weight only (the bias is not part of ADM's IS logits).
    logits = nn.Dense(NUM_CLASSES, use_bias=False, precision=jax.lax.Precision(p),
                      name="fc")(pool)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(len(images), -1)
    return {"pool": pool, "spatial": spatial, "logits": logits}
