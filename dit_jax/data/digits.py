"""scikit-learn's bundled 8x8 handwritten digits as an in-memory, random-access source.

Owns the uint8 mapping and the fixed stratified split. `sklearn.datasets.load_digits` ships
1797 images with values 0..16; we store u = round(v * 255 / 16) as uint8, shape (8, 8, 1), 10
classes. Splits: "heldout" takes round(0.3 * n_c) examples of each class c, chosen by the
permutation `np.random.default_rng([SPLIT_SEED, c])`; "train" is the rest; "all" is all 1797.
Indices in a split are sorted, so a split is a fixed, ordered list. No network is needed.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

NUM_EXAMPLES = 1797
NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
HELDOUT_FRACTION = 0.3
SPLIT_SEED = 20240601
SPLITS = ("train", "heldout", "all")


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  values = np.asarray(bunch.images, np.float64)  # (1797, 8, 8) in 0..16
  images = np.round(values * 255.0 / 16.0).astype(np.uint8)[..., None]
  labels = np.asarray(bunch.target, np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_indices(split: str) -> np.ndarray:
  """Sorted int64 indices into the 1797 digits of `split` ("train" | "heldout" | "all")."""
  _, labels = _load_all()
  if split == "all":
    return np.arange(len(labels), dtype=np.int64)
  if split not in SPLITS:
    raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
  heldout = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    n_heldout = int(round(HELDOUT_FRACTION * len(members)))
    perm = np.random.default_rng([SPLIT_SEED, c]).permutation(len(members))
    heldout.append(members[perm[:n_heldout]])
  heldout = np.sort(np.concatenate(heldout)).astype(np.int64)
  if split == "heldout":
    return heldout
  return np.setdiff1d(np.arange(len(labels), dtype=np.int64), heldout)


@dataclasses.dataclass(frozen=True)
class DigitsSource:
  """Random-access digits split, held in memory.

  Attributes:
    split: "train", "heldout" or "all".
    images: uint8 (N, 8, 8, 1), read-only.
    labels: int32 (N,), read-only.
  """
  split: str = "train"
  images: np.ndarray = dataclasses.field(init=False, repr=False)
  labels: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    all_images, all_labels = _load_all()
    idx = split_indices(self.split)
    images, labels = all_images[idx], all_labels[idx]
    images.setflags(write=False)
    labels.setflags(write=False)
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "labels", labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return IMAGE_SHAPE

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return self.images[i], int(self.labels[i])

  def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised gather used by the iterator for in-memory sources."""
    return self.images[indices], self.labels[indices]
