"""A class-per-subfolder image directory (torchvision `ImageFolder` layout) as a source.

Owns the file listing and the label assignment: `root/<class_name>/<file>`; class names sorted
-> label ids 0..K-1; files with an image extension sorted within each class (the same order
as torchvision). Each example is decoded with PIL, converted to RGB and ADM centre-cropped to
`image_size` (`transforms.center_crop_arr`), exactly the official DiT `train.py` transform
before the random flip.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from dit_jax import errors
from dit_jax.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                    ".webp", ".gif")


def _is_remote(path: str) -> bool:
  return "://" in path


def _list(directory: str) -> tuple[list[str], list[str]]:
  """(sub-directory names, file names) of `directory`; gs:// through etils.epath."""
  if not _is_remote(directory):
    entries = list(os.scandir(directory))
    return ([e.name for e in entries if e.is_dir()], [e.name for e in entries if e.is_file()])
  from etils import epath  # pylint: disable=g-import-not-at-top
  dirs, files = [], []
  for p in epath.Path(directory).iterdir():
    # One listing per class; only names that look like images are taken for files (no
    # per-object request: an ImageNet-sized class has 1300).
    (files if p.name.lower().endswith(IMAGE_EXTENSIONS) else dirs).append(p.name)
  return dirs, files


def is_dir(path: str) -> bool:
  if not _is_remote(path):
    return os.path.isdir(path)
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).is_dir()


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
  """Returns (sorted class names, [(path, label), ...]) for `root/<class>/<image>`.

  `root` may be local or gs:// (the `gcs` extra).

  Raises:
    UserError: `root` is not a directory, has no class sub-folders, or a class folder has
      no image files.
  """
  root = os.fspath(root).rstrip("/") or "/"
  if not is_dir(root):
    raise errors.UserError(f"image_folder data_dir {root!r} is not a directory")
  classes = sorted(_list(root)[0])
  if not classes:
    raise errors.UserError(
        f"image_folder data_dir {root!r} has no class sub-folders; expected "
        "root/<class_name>/<image files>")
  samples = []
  for label, name in enumerate(classes):
    class_dir = f"{root}/{name}"
    files = sorted(f for f in _list(class_dir)[1] if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise errors.UserError(
          f"image_folder class {name!r} ({class_dir!r}) has no image files with extensions "
          f"{IMAGE_EXTENSIONS}")
    samples.extend((f"{class_dir}/{f}", label) for f in files)
  return classes, samples


def _open(path: str):
  if not _is_remote(path):
    return path
  from etils import epath  # pylint: disable=g-import-not-at-top
  return io.BytesIO(epath.Path(path).read_bytes())


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
    return transforms.load_rgb_crop(_open(path), int(self.image_size)), label
