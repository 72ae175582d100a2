"""ADM's evaluation of a sample batch against a reference batch, from the two `.npz` files.

What ADM's `evaluator.py` does, in its order (features from `evaluation.features`, metrics
from `evaluation.adm_metrics`):

  ref_acts    = pool and spatial features of ref arr_0
  ref_stats   = the file's stored mu, sigma / mu_s, sigma_s if it has them (the ADM reference
                batches do), else computed from ref_acts
  sample_acts, sample_stats = features and statistics of the samples, always computed from
                the images (ADM would take a sample file's stored statistics too; computing them
                makes "the reference's arr_0 against its own stored statistics gives FID ~0" a
                check of these features against ADM's)
  IS = inception_score(softmax of the samples), FID = d(sample_stats, ref_stats) on pool,
  sFID the same on spatial, precision/recall = improved PR(ref pool acts, sample pool acts)

A reference batch is read once: its pool features (and the statistics computed from it, when
the file stores none) are cached in an `.npz` beside it (or at a given path), keyed by the
reference file's size and modification time and by a fingerprint of the Inception
parameters; a stale or foreign cache is recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Callable

import jax
import numpy as np

from dit_jax.errors import UserError
from dit_jax.evaluation import adm_metrics, features as features_lib, npz_images

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_VERSION = 1


@dataclasses.dataclass
class Batch:
  """Features and statistics of one `.npz` batch.

  Attributes:
    num_images: images in arr_0.
    pool: (N, 2048) pool features.
    softmax: (N, 1008) IS softmax (None for a reference).
    stats: {"mu", "sigma", "mu_s", "sigma_s"}.
    stored_statistics: the stats came from the file (ADM reference batches), not the images.
  """
  num_images: int
  pool: np.ndarray
  softmax: np.ndarray | None
  stats: dict
  stored_statistics: bool


def stored_statistics(path: str | os.PathLike) -> dict | None:
  """The file's mu, sigma, mu_s, sigma_s if it has all four (ADM reference batches), else None."""
  names = npz_images.members(path)
  if not all(k in names for k in STAT_KEYS):
    return None
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in STAT_KEYS}


def params_fingerprint(params) -> str:
  """sha256 over the parameter leaves (path order): which Inception weights made a cache."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()


def default_cache_path(ref_path: str | os.PathLike) -> pathlib.Path:
  p = pathlib.Path(ref_path)
  return p.with_name(p.name[:-4] + ".inception_features.npz" if p.name.endswith(".npz")
                     else p.name + ".inception_features.npz")


def _cache_key(ref_path, fingerprint: str, model) -> str:
  st = os.stat(ref_path)
  return json.dumps({"version": CACHE_VERSION, "ref_size": st.st_size,
                     "ref_mtime_ns": st.st_mtime_ns, "inception": fingerprint,
                     "resize_to": model.resize_to, "precision": model.precision},
                    sort_keys=True)


def _read_cache(cache_path, key: str) -> dict | None:
  try:
    with np.load(cache_path, allow_pickle=False) as z:
      if "key" not in z.files or str(z["key"]) != key:
        return None
      return {k: z[k] for k in z.files if k != "key"}
  except (OSError, ValueError, EOFError):
    return None


def _write_cache(cache_path, key: str, arrays: dict) -> str | None:
  """Writes atomically; returns a reason when the cache could not be written."""
  cache_path = pathlib.Path(cache_path)
  tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}.npz")
  try:
    np.savez(tmp, key=np.asarray(key), **arrays)
    os.replace(tmp, cache_path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    return str(e)
  return None


def _statistics(feats: dict) -> dict:
  mu, sigma = adm_metrics.statistics(feats["pool"])
  mu_s, sigma_s = adm_metrics.statistics(feats["spatial"])
  return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def read_batch(path, extractor: features_lib.FeatureExtractor, params, *, reference: bool,
               cache_path=None, fingerprint: str | None = None,
               progress: Callable[[int, str], Callable[[int], None]] | None = None,
               log: Callable[[str], None] = print) -> Batch:
  """Features and statistics of the npz at `path` (see module docstring).

  reference: a reference batch (no softmax; cached at `cache_path` if given).
  progress: progress(total, description) -> update(n), e.g. a tqdm bar's update.
  """
  path = os.fspath(path)
  images = npz_images.open_array(path, "arr_0")
  npz_images.check_images(images, path)
  if len(images) <= adm_metrics.NHOOD_SIZE:
    raise UserError(f"{path}: {len(images)} images; precision/recall (k="
                    f"{adm_metrics.NHOOD_SIZE}) need at least {adm_metrics.NHOOD_SIZE + 1}")
  stored = stored_statistics(path) if reference else None
  key = None
  if reference and cache_path is not None:
    key = _cache_key(path, fingerprint or params_fingerprint(params), extractor.model)
    cached = _read_cache(cache_path, key)
    if cached is not None and len(cached["pool"]) == len(images):
      log(f"reference features: read from the cache {cache_path}")
      stats = stored if stored is not None else {k: cached[k] for k in STAT_KEYS}
      return Batch(len(images), cached["pool"], None, stats, stored is not None)
  outputs = ("pool",) if reference and stored is not None else (
      ("pool", "spatial") if reference else features_lib.OUTPUTS)
  update = progress(len(images), "reference" if reference else "samples") if progress else None
  feats = extractor(params, images, outputs=outputs, progress=update)
  stats = stored if stored is not None else _statistics(feats)
  if key is not None and jax.process_index() == 0:
    arrays = {"pool": feats["pool"]}
    if stored is None:
      arrays.update(stats)
    failed = _write_cache(cache_path, key, arrays)
    log(f"reference features: cached in {cache_path}" if failed is None else
        f"reference features: not cached ({failed})")
  return Batch(len(images), feats["pool"], feats.get("softmax"), stats, stored is not None)


def metrics(samples: Batch, ref: Batch) -> dict:
  """ADM's five numbers: Inception Score, FID, sFID, precision, recall."""
  s, r = samples.stats, ref.stats
  for k in ("mu", "mu_s"):
    if np.shape(s[k]) != np.shape(r[k]):
      raise UserError(f"statistics {k} differ in shape: samples {np.shape(s[k])}, reference "
                      f"{np.shape(r[k])}")
  precision, recall = adm_metrics.precision_recall(ref.pool, samples.pool)
  return {
      "inception_score": adm_metrics.inception_score(samples.softmax),
      "fid": float(adm_metrics.fid_from_statistics(s["mu"], s["sigma"], r["mu"], r["sigma"])),
      "sfid": float(adm_metrics.fid_from_statistics(s["mu_s"], s["sigma_s"], r["mu_s"],
                                                    r["sigma_s"])),
      "precision": precision,
      "recall": recall,
  }
