"""A class-per-subfolder image directory (torchvision `ImageFolder` layout) as a source.

Owns the file listing and the label assignment: `root/<class_name>/<file>`; class names sorted
-> label ids 0..K-1; files with an image extension sorted within each class (the same order
as torchvision). Each example is decoded with PIL, converted to RGB and ADM centre-cropped to
`image_size` (`transforms.center_crop_arr`), exactly the official DiT `train.py` transform
before the random flip.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from dit_jax import errors
from dit_jax.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """Returns (sorted class names, [(path, label), ...]) for `root/<class>/<image>`.

  Raises:
    UserError: `root` is not a directory, has no class sub-folders, or a class folder has no
      image files.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise errors.UserError(f"image_folder data_dir {root!r} is not a directory")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise errors.UserError(
        f"image_folder data_dir {root!r} has no class sub-folders; expected "
        "root/<class_name>/<image files>")
  samples = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, name)
    files = sorted(
        e.name for e in os.scandir(class_dir)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise errors.UserError(
          f"image_folder class {name!r} ({class_dir!r}) has no image files with extensions "
          f"{IMAGE_EXTENSIONS}")
    samples.extend((os.path.join(class_dir, f), label) for f in files)
  return classes, samples


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
  """Random-access `root/<class>/<image>` directory, decoded and centre-cropped on access.

  Attributes:
    root: the directory holding one sub-folder per class.
    image_size: side of the square crop.
    classes: sorted class names; label i is classes[i].
    samples: (path, label) of every image, in class then file-name order.
  """
  root: str
  image_size: int
  classes: list[str] = dataclasses.field(init=False, repr=False)
  samples: list[tuple[str, int]] = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if int(self.image_size) != self.image_size or self.image_size <= 0:
      raise errors.UserError(f"config.data.image_size must be a positive integer, got "
                       f"{self.image_size!r}")
    classes, samples = list_image_folder(self.root)
    object.__setattr__(self, "classes", classes)
    object.__setattr__(self, "samples", samples)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (int(self.image_size), int(self.image_size), 3)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    path, label = self.samples[i]
    return transforms.load_rgb_crop(path, int(self.image_size)), label
