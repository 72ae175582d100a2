"""Sample files: the one writer (and reader of the record) of `.npz` sample files.

A sample file is what the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`)
and the official `sample_ddp.py` use, a zip of `.npy` members, uncompressed:

  arr_0.npy      uint8 (N, H, W, C), NHWC, the official clip(127.5 x + 128, 0, 255)
  arr_1.npy      int32 (N,), the class label of each image
  dit_jax_meta.npy   0-d unicode array: a JSON object of how the file was drawn (keys
                 include META_KEYS), so `np.load(path)["dit_jax_meta"]` needs no pickle

ADM's evaluator reads `arr_0` by name (`np.load` or its own zip reader) and never looks at
other members, so the extra ones do not bother it.

`write` streams: the images arrive in chunks (e.g. one shard file at a time) and are appended
to the open zip member after a `.npy` header that already states the final shape, so 50,000
images at 512 (39 GB) are never held in memory. The file is written under a temporary name
and renamed at the end, so a killed writer never leaves a truncated file under the real name.
Paths may be local or `gs://...` (through `etils.epath`; zipfile needs no seekable stream).
"""
from __future__ import annotations

import json
import zipfile
from typing import Any, Iterable, Mapping

from etils import epath
import numpy as np

IMAGES = "arr_0"
LABELS = "arr_1"
META = "dit_jax_meta"
META_KEYS = ("checkpoint", "step", "variant", "image_size", "sampler", "num_sampling_steps",
             "cfg_scale", "guidance_mode", "noise", "seed", "num_samples")


def _write_header(fp, shape, dtype) -> None:
  np.lib.format.write_array_header_1_0(
      fp, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
           "shape": tuple(int(s) for s in shape)})


def _write_array(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
  with zf.open(f"{name}.npy", "w", force_zip64=True) as fp:
    np.lib.format.write_array(fp, np.asarray(array, order="C"), allow_pickle=False)


def meta_json(meta: Mapping[str, Any]) -> str:
  """The JSON text stored under META; every key of META_KEYS must be present."""
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ValueError(f"sample file meta is missing {missing}; got {sorted(meta)}")
  return json.dumps(dict(meta), sort_keys=True)


def write(path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], *, num_samples: int,
          image_shape: tuple[int, int, int], meta: Mapping[str, Any]) -> None:
  """Streams `chunks` of (uint8 images (n, H, W, C), labels (n,)) into the sample file `path`.

  The chunks must hold `num_samples` images of `image_shape` in all, in order. Labels (4
  bytes an image) are kept until the images are written; images never are.
  """
  path = epath.Path(path)
  text = meta_json(meta)
  shape = (int(num_samples),) + tuple(int(s) for s in image_shape)
  tmp = path.parent / (path.name + ".tmp")
  path.parent.mkdir(parents=True, exist_ok=True)
  labels = []
  count = 0
  with tmp.open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED,
                                            allowZip64=True) as zf:
    with zf.open(f"{IMAGES}.npy", "w", force_zip64=True) as fp:
      _write_header(fp, shape, np.uint8)
      for images, chunk_labels in chunks:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != shape[1:]:
          raise ValueError(f"sample chunk {images.dtype} {images.shape}: expected uint8 "
                           f"(n,) + {shape[1:]}")
        if len(chunk_labels) != len(images):
          raise ValueError(f"sample chunk has {len(images)} images, {len(chunk_labels)} labels")
        count += len(images)
        if count > shape[0]:
          raise ValueError(f"more than num_samples={shape[0]} images were given")
        fp.write(np.ascontiguousarray(images).tobytes())
        labels.append(np.asarray(chunk_labels, np.int32))
    if count != shape[0]:
      raise ValueError(f"{count} images were given, expected num_samples={shape[0]}")
    _write_array(zf, LABELS, np.concatenate(labels) if labels else np.zeros((0,), np.int32))
    _write_array(zf, META, np.array(text))
  tmp.replace(path)


def save(path, images: np.ndarray, labels: np.ndarray, meta: Mapping[str, Any]) -> None:
  """`write` of images and labels already in memory (training's final samples)."""
  images = np.asarray(images)
  write(path, [(images, labels)], num_samples=len(images), image_shape=images.shape[1:],
        meta=meta)


def read_meta(path) -> dict | None:
  """The JSON record of a sample file, or None for a file without one (e.g. official)."""
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
    if META not in z.files:
      return None
    return json.loads(str(z[META]))


def load(path) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a sample file, in memory (small files, tests)."""
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
    return z[IMAGES], z[LABELS]
