"""Image grids and PNG files.

Owns the conversion of model outputs in [-1, 1] to uint8 (the official sample.py rule,
`clamp(127.5 * x + 128, 0, 255)`), tiling a batch into one grid image, and writing PNGs to a
local or `gs://` path (through `etils.epath`).
"""
from __future__ import annotations

import io
import math

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 with the official rounding: clip(127.5 x + 128, 0, 255)."""
  x = np.asarray(images, np.float32)
  return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, padding: int = 2,
              pad_value: int = 0, scale: int = 1) -> np.ndarray:
  """Tiles uint8 (N, H, W, C) images row-major into one (rows*(H+p)+p, cols*(W+p)+p, C) image.

  `scale` > 1 enlarges every image by pixel repetition first (for 8x8 digits).
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {images.dtype}")
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  ncols = int(ncols or math.ceil(math.sqrt(n)))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                 pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = images[i]
  return grid


def save_png(path, image: np.ndarray) -> None:
  """Writes a uint8 (H, W, C) image with C in {1, 3, 4} (local path or gs://)."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
