"""diffusers `AutoencoderKL` directories <-> (VAEConfig, Flax params of `models.vae`).

A VAE directory is what diffusers' `save_pretrained` writes, or a local copy of the Hugging
Face `stabilityai/sd-vae-ft-ema` (or `-mse`) directory: `config.json` and
`diffusion_pytorch_model.safetensors` (preferred) or `diffusion_pytorch_model.bin` (read
with `torch.load(weights_only=True)`: no pickled code runs; torch is then needed). Nothing is
ever downloaded.

The name rule (`flax_path_to_key` / `key_to_flax_path`): a parameter path's segments are
joined by ".", a `_<n>` suffix becomes `.<n>` and the leaf `kernel` / `scale` is `weight`:

  encoder/down_blocks_0/resnets_1/conv1/kernel  <->  encoder.down_blocks.0.resnets.1.conv1.weight
  decoder/mid_block/attentions_0/to_out_0/bias  <->  decoder.mid_block.attentions.0.to_out.0.bias

Layouts: conv weights (O, I, kh, kw) <-> kernels (kh, kw, I, O); linear weights (O, I) <->
(I, O); GroupNorm weight/bias <-> scale/bias. The early-diffusers attention names of the
published sd-vae-ft-* files (`query`, `key`, `value`, `proj_attn`, weights sometimes stored
as (O, I, 1, 1)) are read as `to_q`, `to_k`, `to_v`, `to_out.0`. Any missing, extra or
mis-shaped key is one `UserError` naming it. Weights are converted to float32.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
from typing import Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.convert import io
from dit_jax.errors import UserError
from dit_jax.models.vae import AutoencoderKL, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                          "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.\d+)\.(query|key|value|"
                        r"proj_attn)\.(weight|bias)$")


def flax_path_to_key(path: tuple[str, ...]) -> str:
  """The diffusers state_dict key of a Flax parameter path (see the module docstring)."""
  *modules, leaf = path
  parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(parts + ["weight" if leaf in ("kernel", "scale") else leaf])




def abstract_params(config: VAEConfig) -> dict:
  """The parameter tree of `AutoencoderKL(config)` as ShapeDtypeStructs (nothing allocated)."""
  model = AutoencoderKL(config)
  n = 2 ** (len(config.block_out_channels) - 1)
  x = jax.ShapeDtypeStruct((1, n, n, config.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def init_params(config: VAEConfig, seed: int = 0) -> dict:
  """Freshly initialised parameters (Flax's default init), as numpy float32 arrays."""
  model = AutoencoderKL(config)
  n = 2 ** (len(config.block_out_channels) - 1)
  x = jnp.zeros((1, n, n, config.in_channels), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(seed), x)["params"]
  return jax.tree.map(np.asarray, params)


@functools.lru_cache(maxsize=8)
def _expected(config: VAEConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{diffusers key: (Flax path, torch shape)} of every parameter of `config`."""
  return {flax_path_to_key(p): (p, _torch_shape(p, tuple(s.shape)))
          for p, s in traverse_util.flatten_dict(abstract_params(config)).items()}


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if path[-1] == "kernel" and len(shape) == 2:
    return tuple(reversed(shape))
  return tuple(shape)


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  return value


def _to_torch(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  return value


def _canonical(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Legacy attention names -> today's; (O, I, 1, 1) attention weights -> (O, I)."""
  out = {}
  for key, value in sd.items():
    m = _LEGACY_RE.match(key)
    if m:
      key = f"{m.group(1)}.{LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
      if key in sd:
        raise UserError(f"state_dict has both {m.group(0)!r} and {key!r}")
    if ".attentions." in key and key.endswith(".weight") and value.ndim == 4 \
        and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    out[key] = value
  return out


def params_from_state_dict(sd: Mapping[str, np.ndarray], config: VAEConfig, *,
                           source: str = "state_dict") -> dict:
  """Flax params of `config` from a diffusers state_dict (either attention naming); checked."""
  expected = _expected(config)
  sd = _canonical(sd)
  missing = sorted(set(expected) - set(sd))
  extra = sorted(set(sd) - set(expected))
  for what, keys in (("missing", missing), ("unexpected", extra)):
    if keys:
      more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
      raise UserError(f"{source}: {what} key{'s' if len(keys) > 1 else ''} "
                      f"{', '.join(keys[:3])}{more} for the VAE of its config.json "
                      f"(block_out_channels={list(config.block_out_channels)}, "
                      f"layers_per_block={config.layers_per_block})")
  flat = {}
  for key, (path, shape) in expected.items():
    value = np.asarray(sd[key])
    if tuple(value.shape) != shape:
      raise UserError(f"{source}: {key} has shape {tuple(value.shape)}; expected {shape}")
    flat[path] = _to_flax(path, value.astype(np.float32, copy=False))
  return traverse_util.unflatten_dict(flat)


def state_dict_from_params(params, *, legacy: bool = False) -> dict[str, np.ndarray]:
  """The diffusers state_dict (torch layouts, float32 numpy) of Flax params.

  legacy=True writes the early-diffusers attention names (`query`, ..., `proj_attn`) of the
  published sd-vae-ft-* files.
  """
  sd = {}
  inverse = {v: k for k, v in LEGACY_ATTENTION_NAMES.items()}
  for path, value in traverse_util.flatten_dict(params).items():
    key = flax_path_to_key(path)
    if legacy and "attentions" in key:
      head, name, leaf = re.match(r"^(.*attentions\.\d+)\.(.+)\.(weight|bias)$", key).groups()
      key = f"{head}.{inverse.get(name, name)}.{leaf}"
    sd[key] = np.ascontiguousarray(_to_torch(path, np.asarray(value, np.float32)))
  return sd


def save_diffusers_vae(directory, config: VAEConfig, params, *, legacy: bool = False) -> None:
  """Writes `config.json` + `diffusion_pytorch_model.safetensors` (no torch needed)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_NAME).write_text(json.dumps(config.to_diffusers(), indent=2))
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  safetensors.numpy.save_file(state_dict_from_params(params, legacy=legacy),
                              os.fspath(directory / WEIGHTS_NAMES[0]))


def read_config(directory) -> VAEConfig:
  """The VAEConfig of `<directory>/config.json`; a UserError names a missing or bad file."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise UserError(f"VAE directory {directory}: no such directory (expected a diffusers "
                    f"AutoencoderKL directory with {CONFIG_NAME} and {WEIGHTS_NAMES[0]})")
  path = directory / CONFIG_NAME
  if not path.is_file():
    raise UserError(f"{path}: no such file (a diffusers VAE directory holds {CONFIG_NAME} and "
                    f"{' or '.join(WEIGHTS_NAMES)})")
  try:
    raw = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  return VAEConfig.from_diffusers(raw, source=str(path))


def load_diffusers_vae(directory) -> tuple[VAEConfig, dict]:
  """(VAEConfig, Flax params as numpy float32) of a local diffusers AutoencoderKL directory."""
  config = read_config(directory)
  directory = pathlib.Path(directory)
  weights = next((directory / n for n in WEIGHTS_NAMES if (directory / n).is_file()), None)
  if weights is None:
    raise UserError(f"VAE directory {directory}: has no {' or '.join(WEIGHTS_NAMES)}")
  try:
    sd = io.load_state_dict(weights)
  except (ValueError, FileNotFoundError, ImportError) as e:
    raise UserError(str(e)) from None
  return config, params_from_state_dict(sd, config, source=str(weights))
