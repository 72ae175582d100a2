"""FID Inception-v3 weights from the published PyTorch files, read safely, into Flax params.

The 2015-12-05 TensorFlow graph's weights as the PyTorch ports publish them (no download here;
put one of these files in place by hand):

  torch-fidelity  weights-inception-2015-12-05-6726825d.pth
                  (github.com/toshas/torch-fidelity/releases/download/v0.2.0/...)
  pytorch-fid     pt_inception-2015-12-05-6726825d.pth
                  (github.com/mseitzer/pytorch-fid/releases/download/fid_weights/...)

Both are state dicts of the same module tree (torchvision's Inception3 names: `Conv2d_1a_3x3`,
`Mixed_5b` ... `Mixed_7c`, `fc`); the same 6726825d hash prefix suggests the same file.
They are read with `torch.load(weights_only=True)` (no pickle code runs); torch is needed
only here. An `.npz` of the same keys and arrays (`np.savez(out, **state_dict)`) loads without
torch. Key rule, for every `BasicConv` of `inception.InceptionV3`:

  <module path>.conv.weight (O, I, kh, kw)  -> <module path>/conv/kernel (kh, kw, I, O)
  <module path>.bn.weight / .bn.bias        -> <module path>/bn/scale / bn/bias
  <module path>.bn.running_mean / _var      -> <module path>/bn/mean / bn/var
  fc.weight (1008, 2048)                    -> fc/kernel (2048, 1008)

`fc.bias` and batch norm's `num_batches_tracked` are not used (ADM's Inception Score takes
the logits without the bias) and are skipped; any other missing, unexpected or mis-shaped key
is an error naming it.

Without `--inception-weights`, the command looks for either file name in DEFAULT_DIR.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.errors import UserError
from dit_jax.evaluation import inception

FILE_NAMES = ("weights-inception-2015-12-05-6726825d.pth",
              "pt_inception-2015-12-05-6726825d.pth")
DEFAULT_DIR = pathlib.Path("~/.cache/dit_jax/inception").expanduser()
SKIPPED_SUFFIXES = ("num_batches_tracked",)
SKIPPED_KEYS = ("fc.bias",)
_LEAF_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
                  ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
                  ("bn", "var"): "bn.running_var", ("fc", "kernel"): "fc.weight"}


def torch_key(path: tuple[str, ...]) -> str:
  """The state-dict key of the Flax parameter at `path` (e.g. ("Mixed_5b", "branch1x1",
  "conv", "kernel") -> "Mixed_5b.branch1x1.conv.weight")."""
  return ".".join(path[:-2] + (_LEAF_TO_TORCH[path[-2:]],))


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A Flax parameter in the PyTorch layout (kernels transposed)."""
  if path[-1] == "kernel":
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def _from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


@functools.lru_cache(maxsize=1)
def abstract_params() -> dict:
  """Shapes (ShapeDtypeStructs) of `InceptionV3`'s parameters (cached: tracing takes seconds;
  callers must not modify the result)."""
  model = inception.InceptionV3(resize_to=75)
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.uint8)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]




def torch_shapes() -> dict[str, tuple[int, ...]]:
  """Every used state-dict key and its PyTorch shape, in a fixed (sorted) order."""
  shapes = {}
  for path, leaf in traverse_util.flatten_dict(abstract_params()).items():
    shapes[torch_key(path)] = to_torch_layout(path, np.empty(leaf.shape, np.uint8)).shape
  return dict(sorted(shapes.items()))


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict"):
  """Flax params (float32 numpy) from a PyTorch-layout state dict of numpy arrays."""
  flat = {}
  used = set()
  for path, leaf in traverse_util.flatten_dict(abstract_params()).items():
    key = torch_key(path)
    if key not in state_dict:
      raise UserError(f"{source}: missing key {key!r}; expected the FID Inception-v3 state "
                      f"dict of {' or '.join(FILE_NAMES)}")
    value = np.asarray(state_dict[key], np.float32)
    value = _from_torch_layout(path, value)
    if value.shape != tuple(leaf.shape):
      raise UserError(f"{source}: {key!r} has shape {np.shape(state_dict[key])}, expected "
                      f"{to_torch_layout(path, np.empty(leaf.shape, np.uint8)).shape}")
    flat[path] = value
    used.add(key)
  extra = sorted(k for k in state_dict if k not in used and k not in SKIPPED_KEYS
                 and not k.endswith(SKIPPED_SUFFIXES))
  if extra:
    raise UserError(f"{source}: unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                    f"({len(extra)}); expected the FID Inception-v3 state dict")
  return traverse_util.unflatten_dict(flat)


def resolve_path(path: str | os.PathLike | None) -> pathlib.Path:
  """The weights file: `path`, or the first of FILE_NAMES found in DEFAULT_DIR."""
  if path is not None:
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
      candidates = [p / name for name in FILE_NAMES]
    else:
      if not p.is_file():
        raise UserError(f"--inception-weights {p}: no such file; expected "
                        f"{' or '.join(FILE_NAMES)} (download it by hand, see README)")
      return p
  else:
    p = DEFAULT_DIR
    candidates = [DEFAULT_DIR / name for name in FILE_NAMES]
  for c in candidates:
    if c.is_file():
      return c
  raise UserError(f"Inception weights not found: put {FILE_NAMES[0]} (torch-fidelity) or "
                  f"{FILE_NAMES[1]} (pytorch-fid) in {p} or pass --inception-weights PATH "
                  "(no download at run time; see README)")


def load(path: str | os.PathLike | None = None) -> dict:
  """Flax params from a published `.pth` (see module docstring), read with weights_only, or
  from an `.npz` of the same state dict (numpy arrays under the same keys; needs no torch)."""
  p = resolve_path(path)
  if p.suffix == ".npz":
    try:
      with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise UserError(f"{p}: not a readable .npz state dict ({e})") from e
    return params_from_state_dict(arrays, source=str(p))
  try:
    import torch  # Only this reader needs torch.
  except ImportError as e:
    raise UserError(f"reading {p} needs torch (pip install torch); {e}") from e
  try:
    state_dict = torch.load(p, map_location="cpu", weights_only=True)
  except Exception as e:  # A corrupt or non-weights file: one line naming it.
    raise UserError(f"{p}: not a readable PyTorch state dict ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from e
  if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise UserError(f"{p}: holds a {type(state_dict).__name__}, expected a state dict")
  arrays = {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()
            if hasattr(v, "detach")}
  return params_from_state_dict(arrays, source=str(p))


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Deterministic random weights in the PyTorch layout, for parity tests and timing.

  numpy PCG64(seed), the keys of `torch_shapes()` in sorted order, float32 standard normals:
  conv weights * sqrt(2 / fan_in), batch norm weight 1 + 0.1 z, bias 0.1 z, running mean
  0.1 z, running var exp(0.2 z), fc weight * sqrt(1 / 2048), fc bias 0.1 z. Activations stay
  of order one through the 94 layers.
  """
  rng = np.random.Generator(np.random.PCG64(seed))
  shapes = torch_shapes()
  shapes["fc.bias"] = (inception.NUM_CLASSES,)
  out = {}
  for key in sorted(shapes):
    shape = shapes[key]
    z = rng.standard_normal(shape, dtype=np.float32)
    if key.endswith("conv.weight"):
      v = z * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
    elif key == "fc.weight":
      v = z * np.float32(np.sqrt(1.0 / shape[1]))
    elif key.endswith("bn.weight"):
      v = 1 + np.float32(0.1) * z
    elif key.endswith("running_var"):
      v = np.exp(np.float32(0.2) * z)
    else:  # bn.bias, running_mean, fc.bias
      v = np.float32(0.1) * z
    out[key] = v.astype(np.float32)
  return out
