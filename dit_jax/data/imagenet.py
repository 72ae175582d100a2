"""ImageNet-1k (or any TFDS image-classification dataset) as a random-access source.

Owns the TFDS side: preparing the dataset in the ArrayRecord format (once; needs TensorFlow,
the `imagenet` install extra) and reading it with `tfds.data_source`, which needs no
TensorFlow. Each example's JPEG bytes are read undecoded (`tfds.decode.SkipDecoding`), decoded
with PIL, converted to RGB and ADM centre-cropped to `image_size` (`transforms.center_crop_arr`),
exactly the official DiT `train.py` transform before the random flip.

ImageNet itself cannot be downloaded automatically: `manual_dir` must hold
`ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` (a local path or gs://), and
`data_dir` receives the prepared `imagenet2012/<version>/*.array_record-*` files. Preparing
reads the tars with `tf.io.gfile`, hence TensorFlow; reading the prepared files only needs
tensorflow-datasets, array_record and Pillow.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
from typing import Any

import numpy as np

from dit_jax import errors
from dit_jax.data import transforms

DEFAULT_NAME = "imagenet2012"


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _require_tensorflow(name: str, data_dir: str | None) -> None:
  if not tensorflow_available():
    raise errors.MissingExtra(
        f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and preparing it "
        "needs TensorFlow, which is not installed. Install the extra: "
        "`pip install -e '.[imagenet]'` (tensorflow-cpu), or prepare it once on another "
        "machine and point config.data.data_dir at the prepared directory. Reading a "
        "prepared dataset does not need TensorFlow.")


def prepare_tfds_dataset(name: str, *, data_dir: str | None, manual_dir: str | None) -> None:
  """Runs `download_and_prepare` in the ArrayRecord format (needs TensorFlow).

  A no-op when the dataset is already prepared in `data_dir`. On several hosts, call this
  once (e.g. on one machine) before training: concurrent preparation into one directory is
  not supported by TFDS.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return
  _require_tensorflow(name, data_dir)
  if not manual_dir:
    raise errors.UserError(
        f"config.data.manual_dir is required to prepare {name!r} (it must hold the "
        f"manually downloaded archives), got {manual_dir!r}")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


@dataclasses.dataclass(frozen=True)
class TfdsImageSource:
  """Random-access TFDS image dataset (ArrayRecord), decoded and centre-cropped on access.

  Attributes:
    split: TFDS split string ("train", "validation", "train[:1%]", ...).
    image_size: side of the square crop.
    data_dir: TFDS data directory (None: TFDS default, ~/tensorflow_datasets).
    manual_dir: directory with the manually downloaded archives; only used to prepare.
    name: TFDS dataset name.
    prepare: prepare the dataset when it is not prepared yet (needs TensorFlow); if False,
      a missing dataset raises FileNotFoundError.
    image_key: feature holding the encoded image.
    label_key: feature holding the ClassLabel.
  """
  split: str
  image_size: int
  data_dir: str | None = None
  manual_dir: str | None = None
  name: str = DEFAULT_NAME
  prepare: bool = True
  image_key: str = "image"
  label_key: str = "label"
  data_source: Any = dataclasses.field(init=False, repr=False)
  num_classes: int = dataclasses.field(init=False)

  def __post_init__(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if int(self.image_size) != self.image_size or self.image_size <= 0:
      raise errors.UserError(f"config.data.image_size must be a positive integer, got "
                       f"{self.image_size!r}")
    builder = tfds.builder(self.name, data_dir=self.data_dir)
    if not builder.is_prepared():
      if not self.prepare:
        raise errors.UserError(
            f"TFDS dataset {self.name!r} is not prepared in data_dir={self.data_dir!r} "
            "(and config.data.prepare is False)")
      if self.name == DEFAULT_NAME:  # ImageNet's builder reads its tars through TensorFlow.
        _require_tensorflow(self.name, self.data_dir)
      if not self.manual_dir and self.name == DEFAULT_NAME:
        raise errors.UserError(
            f"config.data.manual_dir is required to prepare {self.name!r} (it must hold "
            f"the manually downloaded archives), got {self.manual_dir!r}")
    data_source = tfds.data_source(
        self.name,
        split=self.split,
        data_dir=self.data_dir,
        download=self.prepare,
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        builder_kwargs={"file_format": "array_record"},
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=self.manual_dir)},
    )
    features = data_source.dataset_info.features
    for key in (self.image_key, self.label_key):
      if key not in features:
        raise errors.UserError(f"TFDS dataset {self.name!r} has no feature {key!r}; it has "
                         f"{sorted(features.keys())}")
    object.__setattr__(self, "data_source", data_source)
    object.__setattr__(self, "num_classes", int(features[self.label_key].num_classes))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (int(self.image_size), int(self.image_size), 3)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    example = self.data_source[int(i)]
    image = transforms.load_rgb_crop(io.BytesIO(example[self.image_key]),
                                     int(self.image_size))
    return image, int(example[self.label_key])
