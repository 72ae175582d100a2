"""Inception features of an image array, batch-sharded over all devices and hosts.

One jitted function per global batch shape: `features(params, images)` with the parameters
an explicit replicated argument (never a closed-over constant), the uint8 batch split over
the mesh's ("data", "fsdp") axes, and a replicated output so that every process can read the
features of the whole batch:

  pool (B, 2048), spatial (B, 2023), softmax (B, 1008) = softmax(pool @ W)   (float32)

Process p of P reads rows [p B/P, (p+1) B/P) of each global batch (the layout of
`sharding.global_batch`); the last batch is padded with zeros and the padding dropped.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dit_jax import sharding
from dit_jax.evaluation import inception

OUTPUTS = ("pool", "spatial", "softmax")


def _features(params, images, *, model: inception.InceptionV3) -> dict:
  out = model.apply({"params": params}, images)
  return {"pool": out["pool"], "spatial": out["spatial"],
          "softmax": jax.nn.softmax(out["logits"], axis=-1)}


@functools.lru_cache(maxsize=8)
def _jitted(model_type: type, resize_to: int, precision: str, mesh: Mesh):
  """One jitted feature function per model and mesh (extractors share its compilations)."""
  model = model_type(resize_to=resize_to, precision=precision)
  return jax.jit(functools.partial(_features, model=model),
                 in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


class FeatureExtractor:
  """Batch-sharded Inception features.

  Attributes:
    mesh: the ("data", "fsdp") mesh; the batch is split over both axes.
    batch_size: the global batch (per-device batch x data shards).
  """

  def __init__(self, mesh: Mesh, model: inception.InceptionV3 | None = None,
               per_device_batch: int = 64):
    self.mesh = mesh
    self.model = model or inception.InceptionV3()
    self.batch_size = int(per_device_batch) * sharding.num_data_shards(mesh)
    sharding.check_global_batch(self.batch_size, mesh, jax.process_count())
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._replicated = sharding.replicated(mesh)
    self._fn = _jitted(type(self.model), self.model.resize_to, self.model.precision, mesh)

  def replicate(self, params):
    """The parameters placed on every device of the mesh (do this once). Built from each
    process's host copy: device_put of a host value cannot target a multi-process sharding."""
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self._replicated, lambda index: x[index])
    return jax.tree.map(put, params)

  def batch(self, params, local_images: np.ndarray) -> dict:
    """Features (numpy) of one global batch given this process's rows of it."""
    x = sharding.global_batch({"x": np.asarray(local_images)}, self._batch_sharding)["x"]
    return {k: np.asarray(v) for k, v in self._fn(params, x).items()}

  def __call__(self, params, images: np.ndarray, outputs: Sequence[str] = OUTPUTS,
               progress: Callable | None = None) -> dict:
    """Features of all `images` (N, H, W, 3) uint8, an array every process can index
    (e.g. a memmap); `progress(n)` is called with the number of images done per batch."""
    n = len(images)
    b = self.batch_size
    local = b // jax.process_count()
    lo = jax.process_index() * local
    out = {k: [] for k in outputs}
    for start in range(0, n, b):
      rows = np.asarray(images[start + lo:start + lo + local])  # Empty past the end.
      if len(rows) < local:  # The last batch: zero padding, dropped below.
        rows = np.concatenate([rows, np.zeros((local - len(rows),) + rows.shape[1:],
                                              rows.dtype)])
      feats = self.batch(params, rows)
      count = min(b, n - start)
      for k in outputs:
        out[k].append(feats[k][:count])
      if progress is not None:
        progress(count)
    return {k: np.concatenate(v) for k, v in out.items()}
