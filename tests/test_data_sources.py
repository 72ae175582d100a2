"""Tests of dit_jax.data: digits, ADM centre crop, image folders, TFDS (imagenet2012) sources."""
import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dit_jax.errors import UserError
from dit_jax import input_pipeline as ip
from dit_jax.data import digits
from dit_jax.data import imagenet
from dit_jax.data import transforms


def _config(**kw):
  cfg = dict(name="digits", image_size=8, data_dir=None, manual_dir=None, split="train",
             random_flip=True, num_classes=None)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------------------------- digits


def test_digits_sizes_balance_and_range():
  train, heldout, everything = (digits.DigitsSource(s) for s in ("train", "heldout", "all"))
  assert len(everything) == 1797
  assert len(train) + len(heldout) == 1797
  assert len(heldout) == 539  # sum over classes of round(0.3 * n_c)
  idx_train, idx_heldout = digits.split_indices("train"), digits.split_indices("heldout")
  assert not set(idx_train) & set(idx_heldout)
  all_counts = np.bincount(everything.labels, minlength=10)
  held_counts = np.bincount(heldout.labels, minlength=10)
  np.testing.assert_array_equal(held_counts, np.round(0.3 * all_counts).astype(int))
  np.testing.assert_array_equal(np.bincount(train.labels, minlength=10),
                                all_counts - held_counts)
  for src in (train, heldout):
    assert src.image_shape == (8, 8, 1) and src.num_classes == 10
    assert src.images.dtype == np.uint8 and src.images.shape[1:] == (8, 8, 1)
    assert src.images.max() == 255 and src.images.min() == 0
  image, label = everything[0]
  # sklearn digit 0, first two rows: [0 0 5 13 9 1 0 0], [0 0 13 15 10 15 5 0] -> *255/16.
  np.testing.assert_array_equal(image[0, :, 0], [0, 0, 80, 207, 143, 16, 0, 0])
  np.testing.assert_array_equal(image[1, :, 0], [0, 0, 207, 239, 159, 239, 80, 0])
  assert label == 0 and isinstance(label, int)
  # The pixel values are exactly the 17 levels round(v * 255 / 16).
  assert set(np.unique(everything.images)) <= {round(v * 255 / 16) for v in range(17)}


def test_digits_split_is_deterministic():
  a = digits.split_indices("heldout")
  digits._load_all.cache_clear()  # pylint: disable=protected-access
  np.testing.assert_array_equal(a, digits.split_indices("heldout"))
  np.testing.assert_array_equal(digits.DigitsSource("train").images,
                                digits.DigitsSource("train").images)
  with pytest.raises(ValueError, match="'test'"):
    digits.DigitsSource("test")


# ----------------------------------------------------------------------------- centre crop


def _official_center_crop_arr(pil_image, image_size):
  """Verbatim from facebookresearch/DiT train.py (ADM)."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(
        tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(
      tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


@pytest.mark.parametrize("width,height,size", [
    (600, 400, 256), (400, 600, 256), (300, 300, 256), (1030, 777, 128), (257, 513, 256),
    (100, 50, 64), (33, 17, 16), (512, 512, 256), (8, 8, 8)])
def test_center_crop_matches_official(width, height, size):
  rng = np.random.default_rng(width * 1000 + height)
  # Smooth + noisy content so the resampling filters matter.
  yy, xx = np.mgrid[0:height, 0:width]
  base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None])
  arr = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(arr)
  ours = transforms.center_crop_arr(img, size)
  assert ours.size == (size, size)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(_official_center_crop_arr(img, size)))


def test_center_crop_rejects_bad_size():
  with pytest.raises(ValueError, match="image_size"):
    transforms.center_crop_arr(Image.new("RGB", (10, 10)), 0)


# ---------------------------------------------------------------------------- image folder


def _write_png(path, arr):
  Image.fromarray(arr).save(path)


@pytest.fixture()
def folder(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  made = {}
  for cls, sizes in (("zebra", [(40, 30), (20, 50)]), ("ant", [(24, 24), (64, 33), (30, 30)])):
    (root / cls).mkdir(parents=True)
    for k, (w, h) in enumerate(sizes):
      arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      path = root / cls / f"img_{k}.png"
      _write_png(path, arr)
      made[str(path)] = arr
  gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)  # a grayscale file becomes RGB
  _write_png(root / "ant" / "img_9.png", gray)
  made[str(root / "ant" / "img_9.png")] = np.repeat(gray[..., None], 3, -1)
  (root / "ant" / "notes.txt").write_text("not an image")
  return root, made


def test_image_folder_source(folder):
  root, made = folder
  src = ip.create_source(_config(name="image_folder", data_dir=str(root), image_size=16,
                                 num_classes=2), "train")
  assert src.classes == ["ant", "zebra"] and src.num_classes == 2
  assert len(src) == 6 and src.image_shape == (16, 16, 3)
  labels = []
  for i, (path, label) in enumerate(src.samples):
    image, got_label = src[i]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    expected = np.asarray(_official_center_crop_arr(Image.fromarray(made[path]), 16))
    np.testing.assert_array_equal(image, expected)
    assert got_label == label == (0 if "/ant/" in path else 1)
    labels.append(label)
  assert labels == [0, 0, 0, 0, 1, 1]
  # Through the threaded iterator: the global batch = all 6 examples of epoch 0.
  with ip.make_iterator(src, _config(random_flip=False, num_workers=2), global_batch_size=6,
                        process_index=0, process_count=1, seed=0) as it:
    batch = next(it)
  assert batch["image"].shape == (6, 16, 16, 3)
  assert sorted(batch["label"].tolist()) == [0, 0, 0, 0, 1, 1]


def test_image_folder_errors(tmp_path, folder):
  root, _ = folder
  cfg = lambda d: _config(name="image_folder", data_dir=str(d), image_size=8)  # noqa: E731
  with pytest.raises(UserError, match="missing"):
    ip.create_source(cfg(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no class sub-folders"):
    ip.create_source(cfg(tmp_path / "empty"))
  (root / "yak").mkdir()
  (root / "yak" / "readme.md").write_text("x")
  with pytest.raises(ValueError, match="'yak'.*no image files"):
    ip.create_source(cfg(root))
  with pytest.raises(UserError, match="split 'validation'"):
    ip.create_source(cfg(tmp_path / "empty"), "validation")
  with pytest.raises(ValueError, match="data_dir"):
    ip.create_source(_config(name="image_folder", image_size=8))


# --------------------------------------------------------------------- TFDS imagenet2012


def _jpeg(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
  """A 12-example `imagenet2012` (train) + 4 (validation) prepared as ArrayRecord.

  Written by the real imagenet2012 builder class (same features, version and file layout)
  with only the archive reading replaced, which needs TensorFlow; reading it back is the
  unmodified `tfds.data_source("imagenet2012", ...)` path of `TfdsImageSource`.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as ib

  rng = np.random.default_rng(0)
  examples = {}
  for split, n in (("train", 12), ("validation", 4)):
    examples[split] = {}
    for i in range(n):
      h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
      arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      examples[split][f"n{split[0]}_{i}.JPEG"] = (_jpeg(arr), int(rng.integers(0, 1000)))

  class _Tiny(ib.Builder, skip_registration=True):
    name = "imagenet2012"

    @classmethod
    def _get_pkg_dir_path(cls):
      return ib.Builder._get_pkg_dir_path()  # labels file and metadata of the real builder

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._rows(split) for split in examples}

    def _rows(self, split):
      for fname, (jpeg, label) in examples[split].items():
        yield fname, {"file_name": fname, "image": jpeg, "label": label}

    def _generate_examples(self):
      raise NotImplementedError

  data_dir = tmp_path_factory.mktemp("tfds")
  _Tiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  assert tfds.builder("imagenet2012", data_dir=str(data_dir)).is_prepared()
  return str(data_dir), examples


def test_tfds_imagenet_source(tiny_imagenet):
  data_dir, examples = tiny_imagenet
  cfg = _config(name="imagenet2012", data_dir=data_dir, image_size=8, num_classes=1000,
                manual_dir=None)
  src = ip.create_source(cfg, "train")
  assert isinstance(src, imagenet.TfdsImageSource)
  assert len(src) == 12 and src.num_classes == 1000 and src.image_shape == (8, 8, 3)
  seen = set()
  for i in range(len(src)):
    image, label = src[i]
    fname = src.data_source[i]["file_name"].decode()
    jpeg, expected_label = examples["train"][fname]
    with Image.open(io.BytesIO(jpeg)) as img:
      expected = np.asarray(_official_center_crop_arr(img.convert("RGB"), 8))
    np.testing.assert_array_equal(image, expected)
    assert label == expected_label
    seen.add(fname)
  assert seen == set(examples["train"])
  assert len(ip.create_source(cfg, "validation")) == 4
  assert len(ip.create_source(cfg, "heldout")) == 4  # alias
  imagenet.prepare_tfds_dataset("imagenet2012", data_dir=data_dir, manual_dir=None)  # no-op
  # The iterator over it: process slices add up to the global batch, labels as stored.
  make = lambda p, count: ip.make_iterator(  # noqa: E731
      src, _config(num_workers=2), global_batch_size=8, process_index=p,
      process_count=count, seed=5, start_step=1)
  with make(0, 1) as whole, make(0, 2) as p0, make(1, 2) as p1:
    w, a, b = next(whole), next(p0), next(p1)
  np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), w["image"])
  idx = ip.global_batch_indices(12, 8, 1, seed=5)
  np.testing.assert_array_equal(w["label"], [src[i][1] for i in idx])
  assert w["image"].shape == (8, 8, 8, 3) and w["image"].dtype == np.float32


@pytest.mark.skipif(imagenet.tensorflow_available(), reason="TensorFlow is installed")
def test_tfds_unprepared_without_tensorflow(tmp_path):
  cfg = _config(name="imagenet2012", data_dir=str(tmp_path), image_size=8,
                manual_dir=str(tmp_path / "manual"))
  with pytest.raises(ImportError, match="TensorFlow.*imagenet") as e:
    ip.create_source(cfg, "train")
  assert isinstance(e.value, UserError)  # One line from every command line, no traceback.
  assert "\n" not in str(e.value)
  with pytest.raises(ImportError, match="TensorFlow"):
    imagenet.prepare_tfds_dataset("imagenet2012", data_dir=str(tmp_path), manual_dir="m")
  with pytest.raises(UserError, match="not prepared"):
    ip.create_source(_config(name="imagenet2012", data_dir=str(tmp_path), image_size=8,
                             prepare=False), "train")
