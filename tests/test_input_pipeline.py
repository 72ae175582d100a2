"""Tests of dit_jax.input_pipeline: order, resume, process slices, epochs, flips, errors."""
import ml_collections
import numpy as np
import pytest

from dit_jax import input_pipeline as ip
from dit_jax.data import digits


def _config(**overrides):
  cfg = dict(name="digits", image_size=8, data_dir=None, manual_dir=None, split="train",
             random_flip=True, num_classes=10)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


class _IndexSource:
  """File-like (no get_batch) source: image[h, w, 0] = (7 * i + w) % 256, label = i."""
  image_shape = (2, 5, 1)
  num_classes = 1000

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    w = np.arange(5)
    row = ((7 * i + w) % 256).astype(np.uint8)
    return np.broadcast_to(row[None, :, None], (2, 5, 1)).copy(), int(i)


class _NoBatchDigits:
  """DigitsSource without get_batch, so the thread-pool path is used."""

  def __init__(self, src):
    self.src = src
    self.image_shape = src.image_shape
    self.num_classes = src.num_classes

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    return self.src[i]


@pytest.fixture(scope="module")
def train_source():
  return ip.create_source(_config(), "train")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _iter(source, cfg=None, **kw):
  kw = {"global_batch_size": 16, "process_index": 0, "process_count": 1, "seed": 3, **kw}
  return ip.make_iterator(source, cfg or _config(), **kw)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_batch_format(train_source):
  batch = next(_iter(train_source))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  # Exact value mapping of the un-flipped examples of step 0.
  it = _iter(train_source, _config(random_flip=False))
  idx, _ = it.local_plan(0)
  batch = next(it)
  u = train_source.images[idx].astype(np.float32)
  np.testing.assert_array_equal(batch["image"], (u / 255.0 - 0.5) / 0.5)
  np.testing.assert_array_equal(batch["label"], train_source.labels[idx])


def test_deterministic_and_seed_dependent(train_source):
  _assert_batches_equal(_take(_iter(train_source), 4), _take(_iter(train_source), 4))
  a, b = next(_iter(train_source, seed=3)), next(_iter(train_source, seed=4))
  assert not np.array_equal(a["label"], b["label"])


@pytest.mark.parametrize("k", [1, 5, 78, 79])  # 1258 / 16: epoch 0 ends inside step 78.
def test_resume_equals_fresh(train_source, k):
  fresh = _take(_iter(train_source), k + 3)[k:]
  _assert_batches_equal(_take(_iter(train_source, start_step=k), 3), fresh)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_union_is_global_batch(train_source, process_count):
  whole = _take(_iter(train_source, global_batch_size=16), 3)
  parts = [_take(_iter(train_source, global_batch_size=16, process_index=p,
                       process_count=process_count), 3) for p in range(process_count)]
  for s in range(3):
    assert all(part[s]["image"].shape[0] == 16 // process_count for part in parts)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([part[s][key] for part in parts]), whole[s][key])


def test_threaded_path_matches_in_memory_path(train_source):
  cfg = _config(num_workers=3, prefetch=2)
  fast = _take(_iter(train_source, cfg, start_step=7), 4)
  with _iter(_NoBatchDigits(train_source), cfg, start_step=7) as it:
    slow = _take(it, 4)
  _assert_batches_equal(fast, slow)


def test_every_example_once_per_epoch():
  n, g = 10, 4
  src = _IndexSource(n)
  cfg = _config(random_flip=False, num_workers=2)
  with _iter(src, cfg, global_batch_size=g) as it:
    stream = np.concatenate([b["label"] for b in _take(it, 10)])  # 40 positions = 4 epochs
  epochs = stream.reshape(4, n)
  for e in range(4):
    np.testing.assert_array_equal(np.sort(epochs[e]), np.arange(n))
    np.testing.assert_array_equal(epochs[e], ip.epoch_permutation(n, 3, e))
  assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch
  # Unshuffled: the stream is 0..n-1 repeated.
  with _iter(src, _config(random_flip=False, shuffle=False), global_batch_size=g) as it:
    stream = np.concatenate([b["label"] for b in _take(it, 5)])
  np.testing.assert_array_equal(stream, np.tile(np.arange(n), 2))
  # A global batch larger than the data spans several epochs.
  idx = ip.global_batch_indices(n, 25, 0, seed=3)
  for e in range(3):
    np.testing.assert_array_equal(idx[e * n:(e + 1) * n], ip.epoch_permutation(n, 3, e)[:25 - e * n])


def test_random_flip():
  src = _IndexSource(50)
  steps, g = 20, 40
  with _iter(src, _config(num_workers=2), global_batch_size=g, seed=11) as it:
    batches = _take(it, steps)
  flipped = []
  for s, batch in enumerate(batches):
    plan_idx = ip.global_batch_indices(50, g, s, seed=11)
    flags = ip.global_batch_flips(g, s, seed=11)
    for j in range(g):
      orig = (src[plan_idx[j]][0].astype(np.float32) / 255.0 - 0.5) / 0.5
      image = batch["image"][j]
      if flags[j]:
        np.testing.assert_array_equal(image, orig[:, ::-1])
      else:
        np.testing.assert_array_equal(image, orig)
      flipped.append(flags[j])
  frac = np.mean(flipped)
  assert 0.42 < frac < 0.58, frac  # 800 fair draws: 5 sigma is +-0.09
  # Deterministic, and off when random_flip is False.
  with _iter(src, _config(num_workers=2), global_batch_size=g, seed=11) as it:
    _assert_batches_equal(_take(it, 2), batches[:2])
  with _iter(src, _config(random_flip=False), global_batch_size=g, seed=11) as it:
    batch = next(it)
  idx = ip.global_batch_indices(50, g, 0, seed=11)
  orig = np.stack([src[i][0] for i in idx]).astype(np.float32) / 255.0
  np.testing.assert_array_equal(batch["image"], (orig - 0.5) / 0.5)


def test_errors(train_source):
  with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=3"):
    _iter(train_source, global_batch_size=10, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    _iter(train_source, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="config.data.name.*'mnist'"):
    ip.create_source(_config(name="mnist"))
  with pytest.raises(ValueError, match="num_classes=7"):
    ip.create_source(_config(num_classes=7))
  with pytest.raises(ValueError, match="image_size.*32"):
    ip.create_source(_config(image_size=32))


def test_examples_seen():
  assert ip.examples_seen(0, 256) == 0
  assert ip.examples_seen(1000, 256) == 256_000


def test_create_source_splits():
  assert len(ip.create_source(_config(), "heldout")) == len(digits.split_indices("heldout"))
  assert len(ip.create_source(_config(split="all"))) == digits.NUM_EXAMPLES
