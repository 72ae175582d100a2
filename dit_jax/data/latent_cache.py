"""Cached VAE latents: the on-disk format, its writer's bookkeeping and the training source.

`python -m dit_jax.extract` encodes a data set once. For every example n (in the source's
order) it stores the VAE posterior of the image AND of its horizontal flip, unscaled:

  moments[n, f, 0] = mean of q(z | flip_f(x_n)),  moments[n, f, 1] = its std   (f = 0, 1)
  labels[n]

A training step then draws, for each batch position, the flip f chosen by the pixel pipeline's
rule (`input_pipeline.global_batch_flips`) and a fresh posterior sample

  x_0 = (mean_f + std_f * eps) * scale_factor,  eps ~ N(0, I) from the step's k_enc

(`posterior_sample`, exactly `latent.LatentCodec.encode` on the flipped image), so the flip
and the posterior noise stay fresh every epoch, as with on-the-fly encoding.

Layout of a cache directory (local disk: the shards are memory-mapped):

  meta.json                          {"format", "num_examples", "num_classes", "latent_shape",
                                      "dtype", "image_size", "source", "vae_dir", ...}
  labels-<lo>-<hi>.npy               int32 (hi - lo,)
  moments-<lo>-<hi>.npy              dtype (hi - lo, 2, 2, h, w, c): [flip, (mean, std)]

Shards hold consecutive examples [lo, hi) (9-digit numbers) and tile [0, num_examples);
each is written under a temporary name and renamed, `moments` last, so a `moments` file is a
finished shard. Plain `.npy` files: random access by `np.load(mmap_mode="r")`, no new
dependency, readable by anything that reads numpy. Size: 2 x 2 x h x w x c values an
example; ImageNet-1k at 256 (1,281,167 x 2 x 2 x 32 x 32 x 4) is 84 GB in float32, 42 GB in
float16.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.errors import UserError

FORMAT = "dit_jax latent cache v1"
META = "meta.json"
DTYPES = ("float32", "float16")
_SHARD = re.compile(r"^moments-(\d+)-(\d+)\.npy$")


def shard_name(kind: str, lo: int, hi: int) -> str:
  return f"{kind}-{lo:09d}-{hi:09d}.npy"


def finished_shards(directory) -> list[tuple[int, int]]:
  """[(lo, hi)] of the finished shards in `directory`, sorted."""
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  out = []
  for p in directory.iterdir():
    m = _SHARD.match(p.name)
    if m:
      out.append((int(m.group(1)), int(m.group(2))))
  return sorted(out)


def _write_npy(path: epath.Path, array: np.ndarray) -> None:
  tmp = path.parent / f".{path.name}.tmp{jax.process_index()}"
  with tmp.open("wb") as f:
    np.lib.format.write_array(f, np.asarray(array, order="C"), allow_pickle=False)
  tmp.replace(path)


def write_shard(directory, lo: int, hi: int, moments: np.ndarray, labels: np.ndarray) -> None:
  """Writes examples [lo, hi): labels first, then moments (its presence marks it finished)."""
  directory = epath.Path(directory)
  if moments.shape[0] != hi - lo or labels.shape[0] != hi - lo:
    raise ValueError(f"shard [{lo}, {hi}): {moments.shape[0]} moments, {labels.shape[0]} labels")
  _write_npy(directory / shard_name("labels", lo, hi), np.asarray(labels, np.int32))
  _write_npy(directory / shard_name("moments", lo, hi), moments)


def write_meta(directory, meta: dict) -> None:
  """Writes meta.json, or checks that an existing one (a resumed extraction) agrees."""
  path = epath.Path(directory) / META
  meta = dict(meta, format=FORMAT)
  if path.exists():
    old = json.loads(path.read_text())
    if old != json.loads(json.dumps(meta)):
      keys = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
      raise UserError(f"{path} was written with other settings ({', '.join(keys)} differ); "
                      "use another --out or delete it")
    return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, sort_keys=True, indent=1))


def read_meta(directory) -> dict:
  path = epath.Path(directory) / META
  if not path.exists():
    raise UserError(f"config.data.latent_cache_dir={directory}: no {META} (write the cache "
                    "with python -m dit_jax.extract)")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise UserError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


@dataclasses.dataclass
class LatentCacheSource:
  """Random access to the cached moments of a directory (memory-mapped shards).

  `get_batch(indices)` returns (moments (L, 2, 2, h, w, c), labels (L,)); `assemble` keeps the
  flip each position asks for. The iterator (`input_pipeline.BatchIterator`) then yields
  {"moments": float32 (L, 2, h, w, c) = (mean, std) of the chosen flip, "label": int32 (L,)}.

  Attributes:
    directory: the cache directory (a local path: shards are memory-mapped).
    meta: its meta.json.
  """
  directory: str
  meta: dict = dataclasses.field(init=False)

  def __post_init__(self):
    if "://" in str(self.directory):
      raise UserError(f"config.data.latent_cache_dir={self.directory}: the cache is read by "
                      "memory-mapping; copy it to a local disk (or mount the bucket)")
    self.meta = read_meta(self.directory)
    n = int(self.meta["num_examples"])
    shards = finished_shards(self.directory)
    pos = 0
    self._starts, self._ends = [], []
    for lo, hi in shards:
      if hi <= pos:
        continue
      if lo != pos:
        break
      self._starts.append(lo)
      self._ends.append(hi)
      pos = hi
    if pos < n:
      raise UserError(f"config.data.latent_cache_dir={self.directory}: the shards cover "
                      f"examples [0, {pos}) of {n}; finish the extraction (rerun "
                      "python -m dit_jax.extract with the same arguments)")
    self._moments = [None] * len(self._starts)
    self._labels = np.concatenate([
        np.load(os.path.join(self.directory, shard_name("labels", lo, hi)))
        for lo, hi in zip(self._starts, self._ends)])[:n]

  @property
  def num_classes(self) -> int:
    return int(self.meta["num_classes"])

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(int(s) for s in self.meta["latent_shape"])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The pixel shape the latents were encoded from."""
    s = int(self.meta["image_size"])
    return (s, s, 3)

  def __len__(self) -> int:
    return int(self.meta["num_examples"])

  def _shard(self, k: int) -> np.ndarray:
    if self._moments[k] is None:
      self._moments[k] = np.load(
          os.path.join(self.directory, shard_name("moments", self._starts[k], self._ends[k])),
          mmap_mode="r")
    return self._moments[k]

  def __getitem__(self, i: int):
    k = bisect.bisect_right(self._starts, int(i)) - 1
    return self._shard(k)[int(i) - self._starts[k]], int(self._labels[int(i)])

  def get_batch(self, indices):
    items = np.stack([self[int(i)][0] for i in indices])
    return items, self._labels[np.asarray(indices, np.int64)]

  def assemble(self, items: np.ndarray, labels, flips: np.ndarray) -> dict:
    """The batch of the chosen flips: {"moments": f32 (L, 2, h, w, c), "label": i32 (L,)}."""
    chosen = items[np.arange(len(items)), np.asarray(flips, np.int64)]
    return {"moments": chosen.astype(np.float32), "label": np.asarray(labels, np.int32)}


def posterior_sample(moments, rng, scale_factor: float):
  """(mean + std * eps) * scale_factor, eps ~ N(0, I) from rng: `LatentCodec.encode`'s draw
  on cached moments (N, 2, h, w, c)."""
  mean, std = moments[:, 0].astype(jnp.float32), moments[:, 1].astype(jnp.float32)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean + std * eps) * scale_factor


def _local_rows(array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (one copy of each row)."""
  seen, parts = set(), []
  for s in sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = s.index[0].start or 0
    if start not in seen:
      seen.add(start)
      parts.append(np.asarray(s.data))
  return np.concatenate(parts)


def encode_dataset(source, codec, vae_params, directory, *, mesh, per_device_batch: int,
                   dtype: str, meta: dict, num_workers: int = 16, progress: bool = True) -> None:
  """Writes the cache of `source` into `directory` (see the module docstring); resumable.

  Rounds of G = per_device_batch x devices examples in the source's order; process p encodes
  rows [p L, (p + 1) L) of each round (L = G / processes) and writes them as one shard. A
  restarted run skips the rounds whose shards all processes have finished.
  """
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  from dit_jax import generate  # pylint: disable=import-outside-toplevel
  from dit_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from dit_jax import sharding  # pylint: disable=import-outside-toplevel
  from dit_jax.data import transforms  # pylint: disable=import-outside-toplevel
  if dtype not in DTYPES:
    raise UserError(f"--dtype {dtype!r}: expected one of {DTYPES}")
  directory = epath.Path(directory)
  n = len(source)
  g = int(per_device_batch) * int(mesh.devices.size)
  pc, p = jax.process_count(), jax.process_index()
  if g % pc:
    raise UserError(f"{g} examples a round do not split over {pc} processes")
  local = g // pc
  h, w, c = codec.latent_shape(source.image_shape)
  write_meta(directory, dict(meta, num_examples=n, num_classes=int(source.num_classes),
                             latent_shape=[h, w, c], dtype=dtype,
                             image_size=int(source.image_shape[0])))
  generate.sync("dit_jax.extract.meta")
  directory.mkdir(parents=True, exist_ok=True)
  batch_sh = sharding.batch_sharding(mesh)

  def moments_fn(params, x):
    out = [jnp.stack(codec.moments(params, v), axis=1) for v in (x, x[:, :, ::-1])]
    return jnp.stack(out, axis=1).astype(dtype)  # (G, flip, (mean, std), h, w, c)

  encode = jax.jit(moments_fn, out_shardings=batch_sh)
  starts = list(range(0, n, g))
  done = set(finished_shards(directory))
  mine = lambda s: (min(s + p * local, n), min(s + (p + 1) * local, n))
  skip = generate.all_processes_agree(
      np.array([mine(s)[0] == mine(s)[1] or mine(s) in done for s in starts], bool))
  todo = [s for s, k in zip(starts, skip) if not k]
  bar = metrics_lib.ProgressBar(n, initial=n - sum(min(g, n - s) for s in todo),
                                enabled=p == 0 and progress, unit="img")
  with concurrent.futures.ThreadPoolExecutor(max(int(num_workers), 1)) as pool:
    def load(s):  # Positions past the end wrap around (computed, never written).
      return [pool.submit(source.__getitem__, int(i % n))
              for i in range(s + p * local, s + (p + 1) * local)]
    pending = load(todo[0]) if todo else None
    for k, s in enumerate(todo):
      items = [f.result() for f in pending]
      if k + 1 < len(todo):
        pending = load(todo[k + 1])
      images = transforms.to_model_range(np.stack([np.asarray(im, np.uint8) for im, _ in items]))
      labels = np.asarray([lb for _, lb in items], np.int32)
      batch = sharding.global_batch({"image": images}, batch_sh)["image"]
      moments = _local_rows(encode(vae_params, batch))
      lo, hi = mine(s)
      if hi > lo:
        write_shard(directory, lo, hi, moments[:hi - lo], labels[:hi - lo])
      bar.update(min(g, n - s))
  bar.close()
  generate.sync("dit_jax.extract.done")


def encode_cached(vae_params, moments, rng, *, scale_factor: float):
  """The train step's `encode_fn` for cached moments: `posterior_sample` (no VAE needed)."""
  del vae_params
  return posterior_sample(moments, rng, scale_factor)
