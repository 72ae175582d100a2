"""Weight files: official DiT state_dicts on disk <-> numpy dicts <-> Flax params.

This module owns reading and writing files; the pure key/layout mapping between an official
`state_dict` and our Flax parameter tree lives in `dit_jax.convert.official`.

State-dict files (flat `{official key: array}`, e.g. `x_embedder.proj.weight`):

* `.pt` / `.pth` / `.bin`: read with `torch.load(path, map_location="cpu", weights_only=True)`,
  so no pickled code is ever executed (the one extra type allowed is `argparse.Namespace`,
  which the official `train.py` stores under `"args"`; it holds data only). torch is an
  optional extra (`pip install "dit_jax[torch]"`) and imported only here, only when needed.
* `.safetensors`: `safetensors.numpy`, no torch needed.
* `.npz`: `np.load(..., allow_pickle=False)`.

A file holds either a flat state_dict (the released `DiT-XL-2-256x256.pt`) or a training
checkpoint (`{"model": sd, "ema": sd, "opt": ..., "args": ...}` as the official `train.py`
writes it); `which` picks the entry ("ema" by default: the released weights are EMA weights).
In `.npz` / `.safetensors` files the same grouping is written with key prefixes
(`ema/x_embedder.proj.weight`). The chosen state_dict must map strings to tensors and nothing
else; anything else is refused with a UserError (a ValueError) that names the file and the offending key.

Flax parameter files (`save_params` / `load_params`): `flax.serialization.msgpack_serialize`
of the nested dict of numpy arrays `params` (no `{"params": ...}` wrapper), the format
`--config.model.init_from=...` loads.

The high-level `import_official` / `export_official` combine both and check shapes against
the model's abstract parameters (`jax.eval_shape` of `model.init`, nothing allocated).
"""
from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from dit_jax.errors import UserError

PathLike = str | os.PathLike
StateDict = dict[str, np.ndarray]

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_STATE_DICT_SUFFIXES = _TORCH_SUFFIXES + (".safetensors", ".npz")
_PARAMS_SUFFIXES = (".msgpack",)


def _import_torch(what: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"{what} needs PyTorch, an optional extra of dit_jax: "
        'pip install "dit_jax[torch]" (or use a .safetensors / .npz file instead).') from e
  return torch


def _suffix(path: PathLike) -> str:
  return pathlib.Path(path).suffix.lower()


# ------------------------------------------------------------------------------------------
# State dicts.


def _torch_to_numpy(torch, value, *, path, key) -> np.ndarray:
  if not isinstance(value, torch.Tensor):
    raise UserError(
        f"{path}: state_dict entry {key!r} is a {type(value).__module__}.{type(value).__name__}, "
        "not a tensor; only a flat mapping of names to tensors can be imported.")
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16; keep the bits via ml_dtypes.
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return value.numpy().copy()


def _load_torch(path: PathLike) -> Any:
  torch = _import_torch(f"Reading {path}")
  import pickle  # pylint: disable=import-outside-toplevel
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    lines = [l.strip() for l in str(e).splitlines()]
    detail = [l for l in lines if "GLOBAL" in l or "WeightsUnpickler" in l or "Unsupported" in l]
    raise UserError(
        f"{path}: refused to load: the file is not a plain dict of tensors and loading it "
        "would run pickled code (torch.load(weights_only=True) stopped: "
        f"{' '.join(detail) if detail else lines[0]}). Convert it where you trust it, e.g. "
        "to .safetensors.") from None
  except RuntimeError as e:
    raise UserError(f"{path}: not a readable PyTorch file: {e}") from None


def _split_prefixed(flat: Mapping[str, Any], *, path, which: str) -> Mapping[str, Any]:
  """`{"ema/k": v, "model/k": v}` -> the `which` group; a flat dict is returned as is."""
  if not any("/" in k for k in flat):
    return flat
  groups: dict[str, dict[str, Any]] = {}
  for k, v in flat.items():
    head, sep, rest = k.partition("/")
    if not sep:
      raise UserError(f"{path}: mixes prefixed keys ('<group>/<key>') with the plain key {k!r}.")
    groups.setdefault(head, {})[rest] = v
  if which not in groups:
    raise UserError(f"{path}: has no entry {which!r}; available entries: {sorted(groups)} "
                     "(choose one with which=... / --which).")
  return groups[which]


def _select_checkpoint_entry(obj: Any, *, path, which: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise UserError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensors) "
                     "or a training checkpoint dict with 'model' / 'ema' entries.")
  nested = {k: v for k, v in obj.items() if isinstance(v, Mapping)}
  if nested:  # A training checkpoint {"model": sd, "ema": sd, "opt": ..., "args": ...}.
    if which not in nested:
      raise UserError(f"{path}: training checkpoint has no entry {which!r}; available "
                       f"entries: {sorted(nested)} (choose one with which=... / --which).")
    return nested[which]
  return obj


def load_state_dict(path: PathLike, *, which: str = "ema") -> StateDict:
  """Reads an official-layout state_dict as `{key: np.ndarray}` (see the module docstring).

  Args:
    path: a `.pt`/`.pth`/`.bin`/`.ckpt` (torch), `.safetensors` or `.npz` file.
    which: the entry of a training checkpoint to read ("ema" or "model"); ignored for a flat
      state_dict.
  Raises:
    UserError (no such file, unknown suffix, unsafe or non-tensor content, missing entry),
    ImportError (a torch file without torch installed).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  suffix = _suffix(path)
  if suffix in _TORCH_SUFFIXES:
    torch = _import_torch(f"Reading {path}")
    sd = _select_checkpoint_entry(_load_torch(path), path=path, which=which)
    for k in sd:
      if not isinstance(k, str):
        raise UserError(f"{path}: state_dict key {k!r} is not a string.")
    return {k: _torch_to_numpy(torch, v, path=path, key=k) for k, v in sd.items()}
  if suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    try:
      flat = safetensors.numpy.load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own error types.
      raise UserError(f"{path}: not a readable safetensors file: {e}") from None
    return dict(_split_prefixed(flat, path=path, which=which))
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    except ValueError as e:  # Object arrays need pickle; refused.
      raise UserError(f"{path}: refused: holds non-numeric (pickled) arrays: {e}") from None
    sd = dict(_split_prefixed(flat, path=path, which=which))
    for k, v in sd.items():
      if not np.issubdtype(v.dtype, np.number) and v.dtype != np.bool_:
        raise UserError(f"{path}: entry {k!r} has dtype {v.dtype}, not a numeric tensor.")
    return sd
  raise UserError(f"{path}: unknown state_dict file type {suffix!r}; expected one of "
                   f"{', '.join(_STATE_DICT_SUFFIXES)}.")


def save_state_dict(sd: Mapping[str, Any], path: PathLike) -> None:
  """Writes `{key: array}` as `.safetensors`, `.pt`/`.pth` (torch.save of tensors) or `.npz`."""
  path = pathlib.Path(path)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}
  suffix = _suffix(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    safetensors.numpy.save_file(arrays, os.fspath(path))
  elif suffix in (".pt", ".pth"):
    torch = _import_torch(f"Writing {path}")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, os.fspath(path))
  elif suffix == ".npz":
    np.savez(path, **arrays)
  else:
    raise UserError(f"{path}: unknown state_dict file type {suffix!r}; expected .safetensors, "
                     ".pt, .pth or .npz.")


# ------------------------------------------------------------------------------------------
# Flax parameter files.


def _to_numpy_tree(tree):
  import jax  # pylint: disable=import-outside-toplevel
  tree = jax.device_get(tree)
  return jax.tree.map(np.asarray, tree)


def _to_plain_dict(tree):
  if isinstance(tree, Mapping):
    return {str(k): _to_plain_dict(v) for k, v in tree.items()}
  return tree


def save_params(params, path: PathLike) -> None:
  """Writes a Flax parameter tree (without a {"params": ...} wrapper) as flax msgpack."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  params = _to_plain_dict(_to_numpy_tree(params))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(serialization.msgpack_serialize(params))


def load_params(path: PathLike, *, expected=None) -> dict:
  """Reads a parameter tree written by `save_params` (nested dict of numpy arrays).

  A file holding `{"params": tree}` (a whole `variables` dict) is unwrapped. With `expected`
  (a params tree of arrays or `jax.ShapeDtypeStruct`s, e.g. from `abstract_params`), the tree
  structure and shapes are checked (`check_params`).
  """
  from flax import serialization  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  try:
    params = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several error types.
    raise UserError(f"{path}: not a flax msgpack parameter file: {e}") from None
  if not isinstance(params, dict):
    raise UserError(f"{path}: holds a {type(params).__name__}, not a parameter dict.")
  if set(params) == {"params"} and isinstance(params["params"], dict):
    params = params["params"]
  if expected is not None:
    check_params(params, expected, source=str(path))
  return params


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def check_params(params, expected, *, source: str = "params") -> None:
  """Raises one UserError listing missing, unexpected and mis-shaped parameter paths."""
  got, want = _flatten(params), _flatten(expected)
  missing = sorted("/".join(k) for k in want.keys() - got.keys())
  unexpected = sorted("/".join(k) for k in got.keys() - want.keys())
  misshaped = sorted(f"{'/'.join(k)}: got {tuple(np.shape(got[k]))}, expected "
                     f"{tuple(want[k].shape)}" for k in want.keys() & got.keys()
                     if tuple(np.shape(got[k])) != tuple(want[k].shape))
  if missing or unexpected or misshaped:
    parts = [f"{source} does not match the model's parameters:"]
    for name, items in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
      if items:
        parts.append(f"  {len(items)} {name}: " + "; ".join(items))
    raise UserError("\n".join(parts))


# ------------------------------------------------------------------------------------------
# Official checkpoints <-> Flax params.


def build_model(model_or_kwargs):
  """A `DiT` from a DiT instance, a variant name ("DiT-XL/2") or a dict of DiT kwargs.

  A dict may name a variant under "variant"; its other entries override the variant's.
  """
  from dit_jax.models import DiT, variants  # pylint: disable=import-outside-toplevel
  if isinstance(model_or_kwargs, DiT):
    return model_or_kwargs
  if isinstance(model_or_kwargs, str):
    return variants.build(model_or_kwargs)
  if isinstance(model_or_kwargs, Mapping):
    kwargs = dict(model_or_kwargs)
    variant = kwargs.pop("variant", None)
    if variant is not None:
      return variants.build(variant, **kwargs)
    return DiT(**kwargs)
  raise TypeError(f"expected a DiT, a variant name or a dict of DiT kwargs, got "
                  f"{type(model_or_kwargs).__name__}")


def abstract_params(model):
  """The model's parameter shapes (`jax.ShapeDtypeStruct` tree), nothing allocated."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jax.ShapeDtypeStruct((1, model.input_size, model.input_size, model.in_channels),
                           jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  return variables["params"]


def model_pos_embed(model) -> np.ndarray:
  """The model's fixed sin-cos position table in the official layout `(1, T, D)` float32."""
  return np.asarray(model.pos_embed(), np.float32)[None]


def import_official(path: PathLike, model_or_kwargs, *, which: str = "ema") -> dict:
  """Reads an official checkpoint and returns Flax `params` for the given model.

  Args:
    path: state_dict file (see `load_state_dict`).
    model_or_kwargs: a `DiT`, a variant name or a dict of DiT kwargs (see `build_model`).
    which: the entry of a training checkpoint ("ema" or "model").
  Raises:
    UserError listing every missing, unexpected and mis-shaped key.
  """
  from dit_jax.convert import official  # pylint: disable=import-outside-toplevel
  model = build_model(model_or_kwargs)
  sd = load_state_dict(path, which=which)
  expected = abstract_params(model)
  pos_embed = sd.get(official.POS_EMBED_KEY)
  want = (1, model.num_tokens, model.hidden_size)
  if pos_embed is not None and tuple(pos_embed.shape) != want:
    # The only size-dependent tensor: without this check a 512x512 checkpoint would import
    # silently into a 256x256 model.
    t = pos_embed.shape[1] if pos_embed.ndim == 3 else None
    side = int(round(t ** 0.5)) * model.patch_size if t else None
    raise UserError(
        f"{path}: pos_embed has shape {tuple(pos_embed.shape)}, expected {want} for "
        f"input_size={model.input_size}, patch_size={model.patch_size}"
        + (f"; the checkpoint looks like input_size={side} (image size {side * 8})"
           if side else ""))
  try:
    params = official.state_dict_to_params(sd, expected=expected)
  except ValueError as e:
    raise UserError(f"{path}: {e}") from None
  check_params(params, expected, source=str(path))
  return params


def export_official(params, path: PathLike, *, model=None, pos_embed=None) -> StateDict:
  """Writes Flax `params` as an official state_dict (`.safetensors`, `.pt` or `.npz`).

  The official state_dict carries the fixed `pos_embed`; give either `pos_embed` (`(1, T, D)`)
  or the `model` (DiT, variant name or kwargs dict) to compute it. Returns the state_dict.
  """
  from dit_jax.convert import official  # pylint: disable=import-outside-toplevel
  if (model is None) == (pos_embed is None):
    raise ValueError("export_official needs exactly one of model=... or pos_embed=...")
  params = _to_numpy_tree(params)
  if set(params) == {"params"}:
    params = params["params"]
  if model is not None:
    model = build_model(model)
    check_params(params, abstract_params(model))
    pos_embed = model_pos_embed(model)
  sd = official.params_to_state_dict(params, pos_embed=np.asarray(pos_embed, np.float32))
  save_state_dict(sd, path)
  return sd
