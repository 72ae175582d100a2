"""The ADM evaluation suite's metric definitions (openai/guided-diffusion evaluations/evaluator.py).

Given Inception features (`evaluation.inception`), this module computes what ADM's
evaluator prints, with ADM's constants:

  statistics   mu = mean(acts, 0) (in the features' dtype), sigma = cov(acts) (float64)
  FID, sFID    |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) on pool / spatial statistics,
               1e-6 added to both diagonals when sqrtm(S1 S2) is not finite
               (`frechet.frechet_distance`, which is ADM's `FIDStatistics.frechet_distance`)
  IS           exp(mean_i KL(p(y|x_i) || p(y))) per split of 5000 samples, p(y) the split's
               mean; the mean over splits (no standard deviation), in float32 as ADM
  precision,   improved precision and recall (Kynkäänniemi et al. 2019) with k = 3: a
  recall       feature's radius is the squared distance to its 3rd nearest neighbour in its
               own set (itself excluded: index 3 of the sorted distances, itself being 0);
               precision = fraction of samples within the radius of some reference feature,
               recall = fraction of reference features within the radius of some sample.

Squared distances as ADM's `DistanceBlock`, per block of 10,000 rows x 10,000 columns:

  D = max(|u|^2 - 2 u.v + |v|^2, 0) in float16; the block again in float32 if any entry of
  the float16 block is not finite (large features overflow float16's 65504).

The float16 block is computed from float16 inputs with float32 accumulation in the sums (as
cuBLAS and TensorFlow's GPU reductions accumulate half precision), rounded to float16 before
the combination. Distances run jitted on the local default device; the k-nearest radius is a
running `top_k` over column blocks (the same order statistic as ADM's `np.partition` of a
full row).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.evaluation import frechet

SPLIT_SIZE = 5000  # ADM's Inception Score split.
NHOOD_SIZE = 3  # ADM's ManifoldEstimator nhood_sizes=(3,).
ROW_BATCH_SIZE = 10000  # ADM's ManifoldEstimator row_batch_size / col_batch_size.
COL_BATCH_SIZE = 10000


def statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ADM's `compute_statistics`: mean in the activations' dtype, covariance in float64."""
  activations = np.asarray(activations)
  if activations.ndim != 2 or activations.shape[0] < 2:
    raise ValueError(f"activations must be (N >= 2, D), got shape {activations.shape}")
  return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def fid_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
  """ADM's Fréchet distance (eps 1e-6 offset when the product is singular)."""
  return frechet.frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6)


def inception_score(softmax: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
  """ADM's `compute_inception_score` on (N, classes) softmax outputs (float32 as ADM)."""
  preds = np.asarray(softmax)
  if preds.ndim != 2 or len(preds) == 0:
    raise ValueError(f"softmax must be (N >= 1, classes), got shape {preds.shape}")
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """max(|u|^2 - 2 u.v^T + |v|^2, 0) in u's dtype, sums accumulated in float32."""
  dtype = u.dtype
  norm_u = jnp.sum(jnp.square(u).astype(jnp.float32), axis=1).astype(dtype)
  norm_v = jnp.sum(jnp.square(v).astype(jnp.float32), axis=1).astype(dtype)
  uv = jnp.dot(u, v.T, preferred_element_type=jnp.float32,
               precision=jax.lax.Precision.HIGHEST).astype(dtype)
  return jnp.maximum(norm_u[:, None] - 2 * uv + norm_v[None, :], jnp.zeros((), dtype))


@jax.jit
def pairwise_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """ADM's `DistanceBlock.pairwise_distances`: float16, or float32 where that is not finite."""
  u = jnp.asarray(u, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  d16 = _squared_distances(u.astype(jnp.float16), v.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: _squared_distances(u, v))


def _padded(x: np.ndarray, size: int) -> np.ndarray:
  """x with zero rows appended up to `size` (zero rows keep a finite block finite)."""
  return np.pad(x, ((0, size - len(x)), (0, 0))) if len(x) < size else x


@functools.partial(jax.jit, static_argnames="k")
def _smallest(rows, cols, num_cols, running, k: int):
  """The k smallest distances of each row to the first `num_cols` columns and `running`."""
  d = pairwise_distances(rows, cols)
  d = jnp.where(jnp.arange(d.shape[1])[None, :] < num_cols, d, jnp.inf)
  return -jax.lax.top_k(-jnp.concatenate([running, d], axis=1), k)[0]


def manifold_radii(features: np.ndarray, k: int = NHOOD_SIZE,
                   row_batch_size: int = ROW_BATCH_SIZE,
                   col_batch_size: int = COL_BATCH_SIZE) -> np.ndarray:
  """ADM's `ManifoldEstimator.manifold_radii`: (N,) float32 squared distance to the k-th
  neighbour (sorted distances to all N features, the feature itself at index 0)."""
  features = np.asarray(features, np.float32)
  n = len(features)
  if n <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} features, got {n}")
  rows_size, cols_size = min(row_batch_size, n), min(col_batch_size, n)
  radii = np.zeros([n], np.float32)
  for begin1 in range(0, n, rows_size):
    rows = features[begin1:begin1 + rows_size]
    running = jnp.full((rows_size, k + 1), jnp.inf, jnp.float32)
    for begin2 in range(0, n, cols_size):
      cols = features[begin2:begin2 + cols_size]
      running = _smallest(_padded(rows, rows_size), _padded(cols, cols_size), len(cols),
                          running, k + 1)
    radii[begin1:begin1 + len(rows)] = np.asarray(running[:len(rows), k])
  return radii


@jax.jit
def _less_thans(batch_1, radii_1, batch_2, radii_2):
  """ADM's `DistanceBlock.less_thans`: which of batch 1 lie within some radius of batch 2,
  and which of batch 2 within some radius of batch 1 (padding has radius -1: covers none)."""
  d = pairwise_distances(batch_1, batch_2)
  return jnp.any(d <= radii_2[None, :], axis=1), jnp.any(d <= radii_1[:, None], axis=0)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = NHOOD_SIZE, row_batch_size: int = ROW_BATCH_SIZE,
                     col_batch_size: int = COL_BATCH_SIZE) -> tuple[float, float]:
  """ADM's `compute_prec_recall` (`ManifoldEstimator.evaluate_pr`): (precision, recall)."""
  ref = np.asarray(ref_features, np.float32)
  sam = np.asarray(sample_features, np.float32)
  if ref.ndim != 2 or sam.ndim != 2 or ref.shape[1] != sam.shape[1]:
    raise ValueError(f"features must be (N, D) with the same D, got {ref.shape} and {sam.shape}")
  radii_ref = manifold_radii(ref, k, row_batch_size, col_batch_size)
  radii_sam = manifold_radii(sam, k, row_batch_size, col_batch_size)
  rows_size, cols_size = min(row_batch_size, len(ref)), min(col_batch_size, len(sam))
  pad_radii = lambda r, size: np.pad(r, (0, size - len(r)), constant_values=-1.0)
  ref_in = np.zeros([len(ref)], bool)
  sam_in = np.zeros([len(sam)], bool)
  for b1 in range(0, len(ref), rows_size):
    n1 = len(ref[b1:b1 + rows_size])
    for b2 in range(0, len(sam), cols_size):
      n2 = len(sam[b2:b2 + cols_size])
      in_1, in_2 = _less_thans(_padded(ref[b1:b1 + n1], rows_size),
                               pad_radii(radii_ref[b1:b1 + n1], rows_size),
                               _padded(sam[b2:b2 + n2], cols_size),
                               pad_radii(radii_sam[b2:b2 + n2], cols_size))
      ref_in[b1:b1 + n1] |= np.asarray(in_1)[:n1]
      sam_in[b2:b2 + n2] |= np.asarray(in_2)[:n2]
  return float(np.mean(sam_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))
