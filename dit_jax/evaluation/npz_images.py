"""Random access to the image array of an ADM-format `.npz` without loading it whole.

50,000 samples at 512 x 512 are 39 GB: an uncompressed (`np.savez`, ZIP_STORED) member is
memory-mapped straight from the zip file (its data is contiguous after the local header and
the `.npy` header), so each process reads only its rows of each batch. A compressed member
(`np.savez_compressed`) cannot be mapped and is read into memory. No pickle: object arrays
are refused.
"""
from __future__ import annotations

import os
import struct
import zipfile

import numpy as np

from dit_jax.errors import UserError

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # The zip local file header (30 bytes).


def members(path: str | os.PathLike) -> list[str]:
  """Array names in the npz (without `.npy`)."""
  try:
    with zipfile.ZipFile(path) as z:
      return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
  except (OSError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: not a readable .npz file ({e})") from e


def open_array(path: str | os.PathLike, name: str) -> np.ndarray:
  """The array `name` of the npz at `path`: a read-only memmap if stored, else in memory."""
  path = os.fspath(path)
  if name not in members(path):
    raise UserError(f"{path}: no array {name!r} (has {members(path)})")
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
      with np.load(path, allow_pickle=False) as f:
        return f[name]
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
      raise UserError(f"{path}: corrupt zip header for {name}.npy")
    name_len, extra_len = fields[-2], fields[-1]
    f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      with np.load(path, allow_pickle=False) as z:
        return z[name]
    offset = f.tell()
  if dtype.hasobject:
    raise UserError(f"{path}: {name} is an object array (refused: loading it would unpickle)")
  return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                   order="F" if fortran else "C")


def check_images(images: np.ndarray, path: str, name: str = "arr_0") -> None:
  """ADM's image format: uint8 NHWC RGB."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(f"{path}: {name} is {images.dtype} {tuple(images.shape)}; expected uint8 "
                    "images (N, H, W, 3) as ADM's evaluator reads them")
  if images.shape[0] == 0:
    raise UserError(f"{path}: {name} holds no images")
