"""Official PyTorch DiT `state_dict` <-> Flax params, in pure numpy.

Owns the one naming rule between the two trees and the per-layer array layouts:

  official key  `blocks.3.adaLN_modulation.1.weight`
  flax path     ("blocks_3", "adaLN_modulation_1", "kernel")

* A key is split at "."; a segment made only of digits (a `ModuleList` / `nn.Sequential`
  index) is joined to the previous segment with "_"; the rest is nesting.
* Leaf names: `bias` <-> `bias`; `weight` <-> `embedding` for `embedding_table`, `scale` for a
  LayerNorm (modules named `norm*`, only in the non-official block designs), else `kernel`.
* Arrays: Linear weight `(out, in)` <-> Dense kernel `W.T`; Conv weight `(D, C, p, p)` <->
  kernel `W.transpose(2, 3, 1, 0)`; everything else unchanged.
* `pos_embed` `(1, T, D)` is a fixed buffer in the official model and a constant here: on
  import it is checked against `get_2d_sincos_pos_embed` (max abs difference <= 1e-6) and
  dropped; on export it is written as float32 `(1, T, D)`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from dit_jax.models.embeddings import get_2d_sincos_pos_embed

POS_EMBED_KEY = "pos_embed"
POS_EMBED_ATOL = 1e-6

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_TOP_ORDER = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")


def _flax_leaf(module: str, leaf: str, key: str) -> str:
  if leaf == "bias":
    return "bias"
  if leaf != "weight":
    raise ValueError(f"official key {key!r}: unknown parameter name {leaf!r} "
                     "(expected 'weight' or 'bias')")
  if module == "embedding_table":
    return "embedding"
  if module.startswith("norm"):
    return "scale"
  return "kernel"


def official_key_to_path(key: str) -> tuple[str, ...]:
  """`"blocks.3.adaLN_modulation.1.weight"` -> `("blocks_3", "adaLN_modulation_1", "kernel")`."""
  parts = key.split(".")
  names: list[str] = []
  for part in parts[:-1]:
    if part.isdigit():
      if not names:
        raise ValueError(f"official key {key!r} starts with an index")
      names[-1] = f"{names[-1]}_{part}"
    elif not part:
      raise ValueError(f"official key {key!r} has an empty segment")
    else:
      names.append(part)
  if not names:
    raise ValueError(f"official key {key!r} names no module")
  return (*names, _flax_leaf(names[-1], parts[-1], key))


def path_to_official_key(path: tuple[str, ...]) -> str:
  """`("blocks_3", "adaLN_modulation_1", "kernel")` -> `"blocks.3.adaLN_modulation.1.weight"`."""
  *modules, leaf = path
  if leaf not in ("kernel", "bias", "embedding", "scale") or not modules:
    raise ValueError(f"param path {'/'.join(path)!r}: unknown leaf {leaf!r} (expected "
                     "kernel, bias, embedding or scale)")
  out = []
  for m in modules:
    match = _INDEXED.match(m)
    out.append(f"{match.group(1)}.{match.group(2)}" if match else m)
  return ".".join(out + ["bias" if leaf == "bias" else "weight"])


def _to_flax_array(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if w.ndim == 2:
      return w.T
    if w.ndim == 4:
      return w.transpose(2, 3, 1, 0)
  return w


def _to_official_array(path: tuple[str, ...], k: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if k.ndim == 2:
      return k.T
    if k.ndim == 4:
      return k.transpose(3, 2, 0, 1)
  return k


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _check_pos_embed(pe: np.ndarray) -> list[str]:
  if pe.ndim != 3 or pe.shape[0] != 1:
    return [f"{POS_EMBED_KEY}: shape {pe.shape}, expected (1, T, D)"]
  t, d = pe.shape[1:]
  g = int(round(t ** 0.5))
  if g * g != t or d % 4:
    return [f"{POS_EMBED_KEY}: shape {pe.shape} is not (1, g*g, D) with D divisible by 4"]
  err = float(np.max(np.abs(pe[0].astype(np.float64) - get_2d_sincos_pos_embed(d, g))))
  if err > POS_EMBED_ATOL:
    return [f"{POS_EMBED_KEY}: differs from the fixed 2-D sin-cos table by {err:.3g} "
            f"(tolerance {POS_EMBED_ATOL})"]
  return []


def state_dict_to_params(sd: Mapping[str, Any], *, expected: Optional[Mapping[str, Any]] = None
                         ) -> dict:
  """Official `state_dict` (numpy or CPU torch arrays) -> nested Flax params of numpy arrays.

  Args:
    sd: official key -> array. `pos_embed` is optional; when present it must equal the fixed
      sin-cos table.
    expected: optional params tree (arrays or `jax.ShapeDtypeStruct`, e.g. from
      `jax.eval_shape(model.init, ...)["params"]`). When given, every path must be present
      with the same shape, nothing else may be present, and arrays are cast to its dtypes.

  Raises:
    ValueError listing every missing, unexpected and mis-shaped key at once.
  """
  problems: list[str] = []
  flat: dict[tuple[str, ...], np.ndarray] = {}
  origin: dict[tuple[str, ...], str] = {}
  for key, value in sd.items():
    arr = np.asarray(value)
    if key == POS_EMBED_KEY:
      problems += _check_pos_embed(arr)
      continue
    try:
      path = official_key_to_path(key)
    except ValueError as e:
      problems.append(f"unexpected key: {e}")
      continue
    flat[path] = _to_flax_array(path, arr)
    origin[path] = key

  if expected is not None:
    exp = _flatten(expected)
    missing = [path_to_official_key(p) for p in exp if p not in flat]
    unexpected = [origin[p] for p in flat if p not in exp]
    misshaped = []
    for p, e in exp.items():
      if p in flat:
        if tuple(flat[p].shape) != tuple(e.shape):
          want = _to_official_array(p, np.empty(e.shape, np.int8)).shape
          misshaped.append(f"{origin[p]}: got {tuple(np.asarray(sd[origin[p]]).shape)}, "
                           f"expected {tuple(want)}")
        elif getattr(e, "dtype", None) is not None:
          flat[p] = flat[p].astype(e.dtype)
    if missing:
      problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
      problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if misshaped:
      problems.append(f"mis-shaped keys ({len(misshaped)}): {misshaped}")
  if problems:
    raise ValueError("official state_dict does not match the DiT params:\n  " +
                     "\n  ".join(problems))
  return _unflatten(flat)


def _order(key: str):
  parts = key.split(".")
  top = _TOP_ORDER.index(parts[0]) if parts[0] in _TOP_ORDER else len(_TOP_ORDER)
  idx = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else -1
  return (top, idx, ".".join(parts[:-1]), parts[-1] != "weight")


def params_to_state_dict(params: Mapping[str, Any], *, pos_embed: Optional[Any]
                         ) -> dict[str, np.ndarray]:
  """Flax params -> official `state_dict` of numpy arrays (official layouts and key order).

  Args:
    params: the "params" collection (nested mapping of arrays).
    pos_embed: the fixed table, `(T, D)` or `(1, T, D)` (e.g. `model.pos_embed()`), written as
      float32 `(1, T, D)` under `pos_embed` like the official model; None leaves it out.
  """
  out: dict[str, np.ndarray] = {}
  if pos_embed is not None:
    pe = np.asarray(pos_embed, np.float32)
    out[POS_EMBED_KEY] = pe[None] if pe.ndim == 2 else pe
  items = []
  for path, value in _flatten(params).items():
    key = path_to_official_key(path)
    items.append((key, np.ascontiguousarray(_to_official_array(path, np.asarray(value)))))
  for key, arr in sorted(items, key=lambda kv: _order(kv[0])):
    out[key] = arr
  return out
