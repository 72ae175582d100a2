"""Per-example image transforms shared by the file-based sources and the iterator.

Owns the ADM centre crop used by the official DiT `train.py` (`center_crop_arr`, itself from
openai/guided-diffusion) and the uint8 -> model-range mapping.

Centre crop of a PIL image of size (W, H) to `size` x `size`:
  1. while min(W, H) >= 2 * size: (W, H) <- (W // 2, H // 2) with a BOX filter;
  2. s = size / min(W, H); resize to (round(W * s), round(H * s)) with a BICUBIC filter;
  3. keep rows [(H' - size) // 2, ... + size) and columns [(W' - size) // 2, ... + size).
The model range is x = (u / 255 - 0.5) / 0.5 in [-1, 1], exactly torchvision's
`ToTensor()` followed by `Normalize([0.5] * 3, [0.5] * 3)`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
  """The ADM centre crop of the official DiT `train.py`; returns a new PIL image.

  Args:
    pil_image: any PIL image (convert to RGB before if the channel layout matters).
    image_size: the side of the square output, in pixels.

  Returns:
    A PIL image of size (image_size, image_size) and the mode of the input.
  """
  if int(image_size) != image_size or image_size <= 0:
    raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
  image_size = int(image_size)
  if min(*pil_image.size) <= 0:
    raise ValueError(f"cannot crop an empty image of size {pil_image.size}")
  # Halving with a box filter first avoids the aliasing of one large bicubic step.
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(
        tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(
      tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  width, height = pil_image.size
  top = (height - image_size) // 2
  left = (width - image_size) // 2
  return pil_image.crop((left, top, left + image_size, top + image_size))


def load_rgb_crop(fileobj_or_path, image_size: int) -> np.ndarray:
  """Decodes an image file (path or file object), converts it to RGB, centre-crops it.

  Returns:
    uint8 array of shape (image_size, image_size, 3).
  """
  with Image.open(fileobj_or_path) as img:
    img = img.convert("RGB")
  return np.asarray(center_crop_arr(img, image_size), dtype=np.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 images (any shape) -> float32 in [-1, 1]: (u / 255 - 0.5) / 0.5."""
  if images.dtype != np.uint8:
    raise TypeError(f"expected uint8 images, got dtype {images.dtype}")
  return (images.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
