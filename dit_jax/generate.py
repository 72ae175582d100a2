"""Drawing samples from a trained DiT: the library behind `python -m dit_jax.sample`.

Owns loading a DiT to sample from (an official `.pt` / `.safetensors` state_dict through
`dit_jax.convert`, or a dit_jax workdir's checkpoint, EMA parameters by default) and the
sharded, resumable drawing of many samples.

Image i (0 <= i < N) depends on (seed, i) alone:

  k_i = fold_in(key(seed), i)
  y_i = the given labels cycled (labels[i mod len]), or uniform in [0, num_classes) from
        fold_in(k_i, 2) (the official sample_ddp.py draws labels at random)
  x_T = normal(fold_in(k_i, 0));  step k's noise = normal(fold_in(fold_in(k_i, 1), k))
  x_0 = the guided DDPM / DDIM loop (`sampling.sample`), images = decode(x_0)
  uint8 = clip(127.5 images + 128, 0, 255)   (the official rule, `images.to_uint8`)

so the noise is i.i.d. over images, and an image does not depend on which device or round
draws it. The work is cut into rounds of G = per_device_batch x devices images; each device
draws its B = per_device_batch images with the same per-device program (`jax.shard_map`), so
with the same B the same uint8 images come out on 1, 8 or 256 devices.

At scale (`draw_to_file`) every process writes the images of its own devices after each round
as shard files `<out>.shards/<first>-<end>.npz` (written under a temporary name, then
renamed); a restarted job skips the rounds whose shards are all there (all processes agree)
and, after the last round, process 0 streams the shards in order into the sample file
(`sample_files.write`): the N images are never held in memory. `<out>.shards/job.json`
records the settings; a restart with different settings is refused. For several hosts,
`--out` must be on storage all of them see (e.g. gs://).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import re
from typing import Any, Callable, Iterator

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import checkpointing
from dit_jax import images as image_lib
from dit_jax import metrics as metrics_lib
from dit_jax import sample_files
from dit_jax import sampling
from dit_jax import sharding
from dit_jax.errors import UserError

OFFICIAL_GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # Official sample.py.
OFFICIAL_NUM_CLASSES = 1000
VAE_DOWNSAMPLE = 8
# Official create_diffusion defaults (sample.py / sample_ddp.py).
OFFICIAL_DIFFUSION = dict(timestep_respacing="", noise_schedule="linear", diffusion_steps=1000,
                          learn_sigma=True, sigma_small=False, snr_shift=1.0)
_SHARD = re.compile(r"^(\d+)-(\d+)\.npz$")
JOB_FILE = "job.json"


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A DiT to sample from.

  Attributes:
    model: the `DiT` module.
    params: its parameters (numpy tree).
    diffusion: the training diffusion's config (a ConfigDict like `config.diffusion`).
    checkpoint: what was read (a file or `<workdir>@<step>`).
    step: the training step (None for an official file).
    variant: the variant name, if known.
    latent: the run's `config.latent` (workdirs), else None.
    image_size: the run's `config.data.image_size` (workdirs), else None.
  """
  model: Any
  params: Any
  diffusion: Any
  checkpoint: str
  step: int | None = None
  variant: str | None = None
  latent: Any = None
  image_size: int | None = None


def require(path, what: str) -> epath.Path:
  """`path` as an epath.Path; a UserError naming `what` if it does not exist."""
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"{what} {path} does not exist")
  return path


def checkpoint_input_size(sd) -> int | None:
  """The latent side a DiT state_dict was trained on: sqrt(tokens) x patch (None if unknown)."""
  pe, proj = sd.get("pos_embed"), sd.get("x_embedder.proj.weight")
  if pe is None or proj is None or np.ndim(pe) != 3 or np.ndim(proj) != 4:
    return None
  side = int(round(math.sqrt(pe.shape[1])))
  return side * int(proj.shape[-1]) if side * side == pe.shape[1] else None


def add_distributed_args(parser) -> None:
  """--coordinator-address / --num-processes / --process-id, as `python -m dit_jax.main`."""
  g = parser.add_argument_group("multi-process (auto-detected on Cloud TPU pods and Slurm)")
  g.add_argument("--coordinator-address", help="host:port of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)


def init_distributed(args) -> None:
  """`jax.distributed.initialize` when the flags or the environment show several processes."""
  from dit_jax import main as main_lib  # pylint: disable=import-outside-toplevel
  kwargs = main_lib.distributed_kwargs(None, args.coordinator_address, args.num_processes,
                                       args.process_id)
  if kwargs is not None:
    jax.distributed.initialize(**kwargs)


def load_official(path, *, variant: str, input_size: int,
                  num_classes: int = OFFICIAL_NUM_CLASSES, which: str = "ema",
                  latent_source: str = "") -> Loaded:
  """An official DiT state_dict file (`DiT-XL-2-256x256.pt`, `.safetensors`, `.npz`) for
  latents of side `input_size` (`latent_source` says where that size comes from)."""
  from dit_jax.convert import io  # pylint: disable=import-outside-toplevel
  from dit_jax.convert import official  # pylint: disable=import-outside-toplevel
  require(path, "--ckpt")
  try:
    sd = io.load_state_dict(str(path), which=which)
  except (ValueError, KeyError) as e:
    raise UserError(f"--ckpt {path}: {e}") from None
  side = checkpoint_input_size(sd)
  if side is not None and side != int(input_size):
    raise UserError(f"--ckpt {path} is a DiT for {side}x{side} latents, but {latent_source} "
                    f"gives {input_size}x{input_size} latents")
  kwargs = {"variant": variant, "input_size": int(input_size), "num_classes": int(num_classes)}
  try:
    model = io.build_model(kwargs)
    expected = io.abstract_params(model)
    params = official.state_dict_to_params(sd, expected=expected)
    io.check_params(params, expected, source=str(path))
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"cannot load --ckpt {path} as {kwargs}: {e}") from None
  return Loaded(model=model, params=params, diffusion=mc.ConfigDict(OFFICIAL_DIFFUSION),
                checkpoint=str(path), variant=variant)


def load_workdir(workdir, *, step: int | None = None, which: str = "ema") -> Loaded:
  """The EMA (or `which="params"`) parameters of a dit_jax run's checkpoint (default latest).

  Reads only those with `checkpointing.load_params_on_host` (read-only: no lock, no write).
  """
  from dit_jax import train  # pylint: disable=import-outside-toplevel
  require(checkpointing.checkpoint_directory(str(workdir)), "--workdir checkpoints")
  if which not in ("ema", "params"):
    raise UserError(f"--params {which!r}: expected 'ema' or 'params'")
  try:
    params, meta, step = checkpointing.load_params_on_host(
        str(workdir), step, "ema_params" if which == "ema" else "params")
  except (FileNotFoundError, KeyError) as e:
    raise UserError(str(e)) from None
  config = mc.ConfigDict(json.loads(meta["config"]) if isinstance(meta["config"], str)
                         else meta["config"])
  return Loaded(model=train.build_model(config.model), params=params,
                diffusion=config.diffusion, checkpoint=f"{workdir}",
                step=step, variant=config.model.get("variant"),
                latent=config.get("latent"), image_size=config.data.get("image_size"))


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the samples are drawn (all recorded in the sample file).

  Attributes:
    num_samples: N.
    class_labels: labels cycled over the images, or None: drawn at random.
    sampler: "ddpm" | "ddim".
    num_sampling_steps: respaced steps.
    cfg_scale: classifier-free guidance scale (1 = none).
    guidance_mode: "official" (eps channels [0, 3), the released FIDs) | "all".
    seed: the global seed.
    per_device_batch: B; the same B gives the same images on any number of devices.
    clip_denoised: clamp x_0 predictions to [-1, 1] (official: False).
  """
  num_samples: int
  class_labels: tuple[int, ...] | None
  sampler: str = "ddpm"
  num_sampling_steps: int = 250
  cfg_scale: float = 1.5
  guidance_mode: str = "official"
  seed: int = 0
  per_device_batch: int = 32
  clip_denoised: bool = False


def check_labels(labels, num_classes: int) -> tuple[int, ...]:
  """The labels as ints, each in [0, num_classes); else a UserError naming it."""
  out = []
  for y in labels:
    if int(y) != y or not 0 <= int(y) < num_classes:
      raise UserError(f"--class-labels: {y} is not a class of this model (0 <= label < "
                      f"{num_classes})")
    out.append(int(y))
  return tuple(out)


def make_mesh():
  """A 1-D data-parallel mesh over every device of every process."""
  return sharding.make_mesh(mc.ConfigDict({"data": -1, "fsdp": 1}))


def _batch_spec():
  return P(sharding.AXES)


class RoundFn:
  """The jitted draw of one round: (params, vae_params, indices, labels) -> (images, labels).

  indices (G,) int32 image numbers; labels (G,) int32, -1 = draw at random. Each device runs
  the same program on its B rows (`jax.shard_map`); images (G, H, W, C) float32 in [-1, 1].
  """

  def __init__(self, loaded: Loaded, settings: Settings, mesh, latent_shape,
               decode: Callable | None, replicate_output: bool = False):
    model = loaded.model
    self.mesh = mesh
    self.global_batch = int(settings.per_device_batch) * int(mesh.devices.size)
    config_sample = mc.ConfigDict({"sampler": settings.sampler,
                                   "num_sampling_steps": settings.num_sampling_steps})
    try:
      diff = sampling.create_sampling_diffusion(loaded.diffusion, config_sample)
    except ValueError as e:
      raise UserError(str(e)) from None
    num_classes = int(model.num_classes)
    seed = int(settings.seed)
    self.sample_fn = sample_fn = functools.partial(
        sampling.sample, model=model, diff=diff, cfg_scale=float(settings.cfg_scale),
        guidance_mode=settings.guidance_mode, sampler=settings.sampler,
        clip_denoised=bool(settings.clip_denoised), latent_shape=tuple(latent_shape))

    def local(params, vae_params, indices, labels):
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
      drawn = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0,
                                                    num_classes, jnp.int32))(keys)
      labels = jnp.where(labels < 0, drawn, labels)
      return sample_fn(params, labels, keys, decode_fn=decode, vae_params=vae_params), labels

    spec = _batch_spec()
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), spec, spec),
                       out_specs=(spec, spec), check_vma=False)
    out = NamedSharding(mesh, P() if replicate_output else spec)
    self._fn = jax.jit(fn, out_shardings=(out, out))
    self.batch_sharding = NamedSharding(mesh, spec)

  def rows(self) -> list[tuple[int, int]]:
    """The row ranges [lo, hi) of a round held by this process's devices, in order."""
    index_map = self.batch_sharding.addressable_devices_indices_map((self.global_batch,))
    rows = sorted({(s[0].start or 0, s[0].stop or self.global_batch)
                   for s in index_map.values()})
    return rows

  def __call__(self, params, vae_params, start: int, labels_table, num_samples: int):
    """Draws images start .. start + G - 1 (padded past N; callers drop those)."""
    g = self.global_batch
    idx = np.arange(start, start + g, dtype=np.int64)
    if labels_table is None:
      labels = np.full(g, -1, np.int32)
    else:
      labels = np.asarray(labels_table, np.int32)[idx % len(labels_table)]
    make = lambda a: jax.make_array_from_callback(a.shape, self.batch_sharding,
                                                  lambda i: a[i])
    return self._fn(params, vae_params, make(idx.astype(np.int32)), make(labels))


def replicate(tree, mesh):
  """Host numpy tree -> arrays replicated on every device of `mesh` (all processes)."""
  repl = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda a: jax.make_array_from_callback(np.shape(a), repl, lambda i: np.asarray(a)[i]),
      tree)


def draw_in_memory(round_fn: RoundFn, params, vae_params, settings: Settings):
  """(uint8 images (N, H, W, C), labels (N,)) on every process: small jobs (grids)."""
  n = int(settings.num_samples)
  images, labels = [], []
  for start in range(0, n, round_fn.global_batch):
    x, y = round_fn(params, vae_params, start, settings.class_labels, n)
    images.append(image_lib.to_uint8(np.asarray(jax.device_get(x))))
    labels.append(np.asarray(jax.device_get(y)))
  return np.concatenate(images)[:n], np.concatenate(labels)[:n]


def shard_dir(out) -> epath.Path:
  """Where the shards of sample file `out` are kept until it is written."""
  out = epath.Path(out)
  return out.parent / (out.name + ".shards")


def _shard_ranges(directory: epath.Path) -> list[tuple[int, int]]:
  if not directory.exists():
    return []
  ranges = []
  for p in directory.iterdir():
    m = _SHARD.match(p.name)
    if m:
      ranges.append((int(m.group(1)), int(m.group(2))))
  return sorted(ranges)


def _write_shard(directory: epath.Path, lo: int, hi: int, images, labels) -> None:
  buf = io.BytesIO()
  np.savez(buf, images=images, labels=labels)
  final = directory / f"{lo:09d}-{hi:09d}.npz"
  tmp = directory / f".{final.name}.tmp{jax.process_index()}"
  tmp.write_bytes(buf.getvalue())
  tmp.replace(final)


def _read_shard(directory: epath.Path, lo: int, hi: int):
  with (directory / f"{lo:09d}-{hi:09d}.npz").open("rb") as f, np.load(f) as z:
    return z["images"], z["labels"]


def _check_job(directory: epath.Path, record: dict) -> None:
  """Writes job.json (process 0) or refuses shards drawn with other settings."""
  path = directory / JOB_FILE
  text = json.dumps(record, sort_keys=True)
  if path.exists():
    old = json.loads(path.read_text())
    if old != json.loads(text):
      diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
      raise UserError(f"{directory} holds shards drawn with other settings ({', '.join(diff)} "
                      f"differ); delete it or use another --out")
  elif jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def all_processes_agree(flags: np.ndarray) -> np.ndarray:
  """Elementwise AND of each process's `flags` (the same decision on every process)."""
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.all(multihost_utils.process_allgather(flags), axis=0)


def sync(name: str) -> None:
  """A barrier of all processes (nothing on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def draw_to_file(round_fn: RoundFn, params, vae_params, settings: Settings, out,
                 meta: dict, image_shape, progress: bool = True) -> None:
  """Draws N images into the sample file `out`, resumably (see the module docstring)."""
  n = int(settings.num_samples)
  g = round_fn.global_batch
  directory = shard_dir(out)
  if epath.Path(out).exists() and sample_files.read_meta(out) == json.loads(json.dumps(meta)):
    return  # Finished earlier with the same settings.
  # The record holds no device count: a restart on other devices continues the same images.
  _check_job(directory, dict(meta, per_device_batch=int(settings.per_device_batch)))
  sync("dit_jax.generate.job")
  directory.mkdir(parents=True, exist_ok=True)
  starts = list(range(0, n, g))
  done = np.zeros(n, bool)
  for lo, hi in _shard_ranges(directory):
    done[lo:min(hi, n)] = True
  mine = round_fn.rows()

  def round_done(start):
    return all(done[start + lo:min(start + hi, n)].all() for lo, hi in mine)

  skip = all_processes_agree(np.array([round_done(s) for s in starts], bool))
  is_main = jax.process_index() == 0
  bar = metrics_lib.ProgressBar(n, initial=int(min(n, g * int(skip.sum()))),
                                enabled=is_main and progress, unit="img")
  for start, skipped in zip(starts, skip):
    if skipped:
      continue
    images, labels = round_fn(params, vae_params, start, settings.class_labels, n)
    for shard_x, shard_y in zip(images.addressable_shards, labels.addressable_shards):
      lo = start + (shard_x.index[0].start or 0)
      hi = min(lo + shard_x.data.shape[0], n)
      if lo >= hi or done[lo:hi].all():
        continue
      x = image_lib.to_uint8(np.asarray(shard_x.data))[:hi - lo]
      _write_shard(directory, lo, hi, x, np.asarray(shard_y.data)[:hi - lo])
    bar.update(min(g, n - start))
  bar.close()
  sync("dit_jax.generate.shards")
  if is_main:
    sample_files.write(out, _stream(directory, n), num_samples=n, image_shape=image_shape,
                       meta=meta)
    directory.rmtree()
  sync("dit_jax.generate.file")


def _stream(directory: epath.Path, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The shards' (images, labels) in image order; they must tile [0, n) exactly."""
  pos = 0
  for lo, hi in _shard_ranges(directory):
    if hi <= pos or lo >= n:
      continue  # Rows already given (shards of a restart on another number of devices).
    if lo > pos:
      raise ValueError(f"{directory}: shards do not cover [0, {n}): {pos} .. {lo} is missing")
    images, labels = _read_shard(directory, lo, hi)
    yield images[pos - lo:n - lo], labels[pos - lo:n - lo]
    pos = min(hi, n)
  if pos != n:
    raise ValueError(f"{directory}: shards end at image {pos}, expected {n}")


def save_grid(path, images: np.ndarray, ncols: int = 4) -> None:
  """The official sample.py picture: `save_image(..., nrow=4, normalize=True,
  value_range=(-1, 1))`, i.e. torchvision's grid (padding 2, black) of the uint8 images."""
  image_lib.save_png(path, image_lib.make_grid(images, ncols=min(ncols, len(images))))


def file_meta(loaded: Loaded, settings: Settings, **extra) -> dict:
  """The `sample_files` record of a job."""
  meta = {
      "checkpoint": loaded.checkpoint, "step": loaded.step, "variant": loaded.variant,
      "image_size": extra.pop("image_size", loaded.image_size), "sampler": settings.sampler,
      "num_sampling_steps": int(settings.num_sampling_steps),
      "cfg_scale": float(settings.cfg_scale), "guidance_mode": settings.guidance_mode,
      "noise": "iid", "noise_rule": "image i: fold_in(key(seed), i)", "seed": int(settings.seed),
      "num_samples": int(settings.num_samples), "per_device_batch": int(settings.per_device_batch),
      "class_labels": None if settings.class_labels is None else list(settings.class_labels),
      "clip_denoised": bool(settings.clip_denoised),
  }
  meta.update(extra)
  return meta
