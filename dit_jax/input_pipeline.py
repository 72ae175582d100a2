"""Host-local, deterministic, random-access input pipelines.

Owns the order in which examples are seen and the per-example augmentation. Each host builds
numpy batches of its own slice of the global batch; the training loop assembles them into
global `jax.Array`s. With N examples, global batch G, P processes and L = G / P:

  stream position n = s * G + j          (step s, position j in the global batch, 0 <= j < G)
  epoch e = n // N,  k = n mod N,  example(n) = perm_e[k],
  perm_e = np.random.default_rng([seed, 0, e]).permutation(N)   (identity if not shuffled)
  process p takes positions j in [p * L, (p + 1) * L)
  flip(s, j) = np.random.default_rng([seed, 1, s]).random(G)[j] < 0.5  (if random_flip)
  image = (u / 255 - 0.5) / 0.5,  u the uint8 crop (flipped left-right when flip(s, j))

so the batch of step s is a pure function of (seed, s, process_index): resuming at step k is
`start_step=k`, every example is seen exactly once per epoch, and the union of the process
slices is the single-process global batch. Epochs run on without a partial last batch: the
tail of epoch e and the head of epoch e + 1 share a batch.

File-based sources are decoded by a small thread pool, `prefetch` batches ahead; in-memory
sources (with a `get_batch(indices)` method) are gathered directly.

config.data fields read here: name, image_size, data_dir, manual_dir, split, random_flip,
num_classes, shuffle, num_workers, prefetch, prepare, latent_cache_dir (see `create_source`,
`make_iterator`). With `latent_cache_dir` the training split is read from cached VAE moments
(`data.latent_cache`): the same order and flip rule, batches {"moments", "label"}.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Iterator, Protocol

import numpy as np

from dit_jax import errors
from dit_jax.data import transforms

_PERM_TAG = 0
_FLIP_TAG = 1

SOURCE_NAMES = ("digits", "image_folder", "imagenet2012")


class Source(Protocol):
  """What a source provides: random access to (uint8 HWC image, int label)."""
  image_shape: tuple[int, int, int]
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    ...


def _get(config_data, field: str, default: Any = None) -> Any:
  """config_data.field, or `default` when the field is absent or None."""
  try:
    value = config_data.get(field, default)
  except AttributeError:
    value = getattr(config_data, field, default)
  return default if value is None else value


def create_source(config_data, split: str | None = None) -> Source:
  """Builds the random-access source named by `config_data.name`.

  Args:
    config_data: the `config.data` ConfigDict (fields: name, image_size, data_dir,
      manual_dir, split, num_classes, prepare).
    split: the split to read; None reads `config_data.split` (default "train").
      digits: "train" | "heldout" | "all"; image_folder: "train" reads `data_dir` itself
      unless `data_dir/<split>` is a directory, which is read for any split; imagenet2012:
      any TFDS split string ("train", "validation", "train[:10%]", ...); "heldout" is an
      alias of "validation", so every source has "train" and "heldout".

  Raises:
    ValueError: unknown name, or a `num_classes` / `image_size` that contradicts the data.
  """
  name = _get(config_data, "name")
  split = split if split is not None else _get(config_data, "split", "train")
  image_size = _get(config_data, "image_size")
  data_dir = _get(config_data, "data_dir")
  cache_dir = _get(config_data, "latent_cache_dir")
  if cache_dir and split == _get(config_data, "split", "train"):
    # Cached VAE moments of this split (python -m dit_jax.extract): batches hold "moments".
    from dit_jax.data import latent_cache  # pylint: disable=g-import-not-at-top
    source = latent_cache.LatentCacheSource(cache_dir)
    if image_size is not None and source.image_shape[0] != image_size:
      raise errors.UserError(f"config.data.latent_cache_dir={cache_dir} holds latents of "
                             f"{source.image_shape[0]}px images, config.data.image_size="
                             f"{image_size}")
  elif name == "digits":
    from dit_jax.data import digits  # pylint: disable=g-import-not-at-top
    if image_size is not None and image_size != digits.IMAGE_SHAPE[0]:
      raise errors.UserError(f"config.data.image_size must be {digits.IMAGE_SHAPE[0]} for digits "
                       f"(8x8 images), got {image_size!r}")
    source = digits.DigitsSource(split)
  elif name == "image_folder":
    from dit_jax.data import image_folder  # pylint: disable=g-import-not-at-top
    if not data_dir:
      raise errors.UserError(f"config.data.data_dir is required for image_folder, got {data_dir!r}")
    if image_size is None:
      raise errors.UserError("config.data.image_size is required for image_folder")
    root = f"{str(data_dir).rstrip('/')}/{split}"
    if not image_folder.is_dir(root):
      if split != "train":
        raise errors.UserError(
            f"image_folder split {split!r}: {root!r} is not a directory (only split "
            f"'train' may read config.data.data_dir={data_dir!r} itself)")
      root = data_dir
    source = image_folder.ImageFolderSource(root, image_size)
  elif name == "imagenet2012" or str(name).startswith("tfds:"):
    from dit_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    if image_size is None:
      raise errors.UserError(f"config.data.image_size is required for {name}")
    source = imagenet.TfdsImageSource(
        name=str(name).removeprefix("tfds:"),
        split="validation" if split == "heldout" else split, image_size=image_size, data_dir=data_dir or None,
        manual_dir=_get(config_data, "manual_dir") or None,
        prepare=bool(_get(config_data, "prepare", True)))
  else:
    raise errors.UserError(f"config.data.name must be one of {SOURCE_NAMES} or 'tfds:<name>' "
                           f"(a TFDS image classification data set), got {name!r}")
  num_classes = _get(config_data, "num_classes")
  if num_classes is not None and num_classes != source.num_classes:
    raise errors.UserError(f"config.data.num_classes={num_classes!r} but the {name} data has "
                     f"{source.num_classes} classes")
  return source


def examples_seen(step: int, global_batch_size: int) -> int:
  """Number of stream positions consumed before step `step` (the checkpoint data position)."""
  return int(step) * int(global_batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int, shuffle: bool = True
                      ) -> np.ndarray:
  """perm_e: the order of epoch `epoch` (int64, a permutation of range(num_examples))."""
  if not shuffle:
    return np.arange(num_examples, dtype=np.int64)
  return np.random.default_rng([seed, _PERM_TAG, epoch]).permutation(num_examples)


def global_batch_indices(num_examples: int, global_batch_size: int, step: int, seed: int,
                         shuffle: bool = True, _cache: dict | None = None) -> np.ndarray:
  """Example indices (int64, (G,)) of the global batch of step `step`."""
  n = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(n, num_examples)
  out = np.empty(global_batch_size, np.int64)
  for e in np.unique(epochs):
    e = int(e)
    perm = None if _cache is None else _cache.get(e)
    if perm is None:
      perm = epoch_permutation(num_examples, seed, e, shuffle)
      if _cache is not None:
        for old in [k for k in _cache if k < e - 1]:
          del _cache[old]
        _cache[e] = perm
    mask = epochs == e
    out[mask] = perm[offsets[mask]]
  return out


def global_batch_flips(global_batch_size: int, step: int, seed: int) -> np.ndarray:
  """Bool (G,): whether position j of the global batch of step `step` is flipped."""
  return np.random.default_rng([seed, _FLIP_TAG, step]).random(global_batch_size) < 0.5


class BatchIterator:
  """Iterator of host-local batches {"image": f32 (L,H,W,C) in [-1,1], "label": i32 (L,)}.

  Attributes:
    step: the step of the batch the next `next()` returns.
  """

  def __init__(self, source: Source, *, global_batch_size: int, process_index: int,
               process_count: int, seed: int, start_step: int = 0, shuffle: bool = True,
               random_flip: bool = True, num_workers: int = 8, prefetch: int = 2):
    if global_batch_size <= 0:
      raise errors.UserError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, process_count="
                       f"{process_count})")
    if global_batch_size % process_count:
      raise errors.UserError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if seed < 0 or start_step < 0:
      raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
    if len(source) == 0:
      raise errors.UserError("the data source is empty")
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // process_count
    self.process_index = int(process_index)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.random_flip = bool(random_flip)
    self.step = int(start_step)
    self._perm_cache: dict[int, np.ndarray] = {}
    self._in_memory = hasattr(source, "get_batch")
    self._pool = None
    self._pending: collections.deque = collections.deque()
    self._next_to_submit = self.step
    self._prefetch = max(int(prefetch), 0)
    if not self._in_memory:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=max(int(num_workers), 1), thread_name_prefix="input_pipeline")

  def local_plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, flip flags) of this process's slice of step `step`."""
    lo = self.process_index * self.local_batch_size
    hi = lo + self.local_batch_size
    idx = global_batch_indices(len(self.source), self.global_batch_size, step, self.seed,
                               self.shuffle, self._perm_cache)[lo:hi]
    if self.random_flip:
      flips = global_batch_flips(self.global_batch_size, step, self.seed)[lo:hi]
    else:
      flips = np.zeros(self.local_batch_size, bool)
    return idx, flips

  def _assemble(self, images: np.ndarray, labels, flips: np.ndarray) -> dict[str, np.ndarray]:
    if hasattr(self.source, "assemble"):  # Cached latents: the source applies the flips.
      return self.source.assemble(images, labels, flips)
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return {"image": transforms.to_model_range(images),
            "label": np.asarray(labels, np.int32)}

  def _submit(self, step: int) -> None:
    idx, flips = self.local_plan(step)
    futures = [self._pool.submit(self.source.__getitem__, int(i)) for i in idx]
    self._pending.append((step, futures, flips))

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self.step
    if self._in_memory:
      idx, flips = self.local_plan(step)
      images, labels = self.source.get_batch(idx)
      batch = self._assemble(np.asarray(images), labels, flips)
    else:
      if self._pool is None:
        raise StopIteration  # closed
      while self._next_to_submit <= step + self._prefetch:
        self._submit(self._next_to_submit)
        self._next_to_submit += 1
      got_step, futures, flips = self._pending.popleft()
      assert got_step == step, (got_step, step)
      examples = [f.result() for f in futures]
      images = np.stack([np.asarray(im, np.uint8) for im, _ in examples])
      batch = self._assemble(images, [lb for _, lb in examples], flips)
    self.step = step + 1
    return batch

  def close(self) -> None:
    """Stops the decoding threads (pending prefetches are cancelled)."""
    if self._pool is not None:
      for _, futures, _ in self._pending:
        for f in futures:
          f.cancel()
      self._pending.clear()
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def make_iterator(source: Source, config_data, *, global_batch_size: int,
                  process_index: int, process_count: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches from step `start_step` on (see the module docstring).

  Reads config_data.random_flip (default True), .shuffle (default True), .num_workers
  (decoding threads for file-based sources, default 8) and .prefetch (batches decoded ahead,
  default 2).

  Raises:
    ValueError: global_batch_size not divisible by process_count, bad process_index, a
      negative seed or start_step, or an empty source.
  """
  return BatchIterator(
      source, global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, seed=seed, start_step=start_step,
      shuffle=bool(_get(config_data, "shuffle", True)),
      random_flip=bool(_get(config_data, "random_flip", True)),
      num_workers=int(_get(config_data, "num_workers", 8)),
      prefetch=int(_get(config_data, "prefetch", 2)))
