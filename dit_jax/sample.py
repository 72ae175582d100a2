r"""Draw samples from a DiT: a grid PNG (official sample.py) or a 50K .npz (sample_ddp.py).

  # the official picture: classes 207 360 387 974 88 979 417 279, 250 DDPM steps, cfg 4.0
  python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --vae-dir sd-vae-ft-ema --out sample.png
  # FID samples: 50,000 images, random labels, cfg 1.5, on every device of every host
  python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --vae-dir sd-vae-ft-ema \
      --num-samples 50000 --out samples.npz --per-device-batch 64 --dtype bfloat16
  # from a dit_jax run (latest checkpoint, EMA parameters)
  python -m dit_jax.sample --workdir gs://bucket/dit-xl2-256 --vae-dir sd-vae-ft-ema \
      --out samples.npz

`--out` decides the mode: `.png` draws a grid (defaults: cfg 4.0, the official classes),
`.npz` draws an ADM-format sample file (defaults: cfg 1.5, 50,000 images, labels drawn at
random), resumably: rerun the same command after an interruption. Image i's label and noise
depend on (--seed, i) only, so the same --per-device-batch gives the same images on any
number of devices. Every device of every host draws (on a multi-host launch, Cloud TPU pod
slices or Slurm, `jax.distributed.initialize()` is called). See `dit_jax/generate.py`.
"""
from __future__ import annotations

import argparse
import math
import sys

from dit_jax import errors
from dit_jax.errors import UserError

PROG = "python -m dit_jax.sample"
GRID_CFG, FILE_CFG = 4.0, 1.5
FILE_NUM_SAMPLES = 50_000


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--ckpt", help="official DiT weights: .pt (weights_only), .safetensors, .npz")
  src.add_argument("--workdir", help="a dit_jax run directory (local or gs://)")
  p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--params", default="ema", choices=["ema", "params"],
                 help="--workdir: EMA (default) or raw parameters")
  p.add_argument("--vae-dir", help="diffusers AutoencoderKL directory (sd-vae-ft-ema or -mse)")
  p.add_argument("--variant", help="--ckpt: DiT variant (default DiT-XL/2)")
  p.add_argument("--image-size", type=int, help="--ckpt: image size in pixels (default 256)")
  p.add_argument("--num-classes", type=int, default=1000, help="--ckpt: classes (1000)")
  p.add_argument("--class-labels", help="comma-separated labels, cycled over the images "
                 "(default: the official 8 for a grid, random for a .npz)")
  p.add_argument("--num-samples", type=int,
                 help="images (default: one per class label for a grid, 50000 for a .npz)")
  p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
  p.add_argument("--num-sampling-steps", type=int, default=250)
  p.add_argument("--cfg-scale", type=float, help="default 4.0 for a grid, 1.5 for a .npz")
  p.add_argument("--guidance-mode", choices=["official", "all"],
                 help="official: eps channels 0-2 as the released FIDs (default for 4 "
                 "channels); all: every eps channel")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="compute dtype of the DiT (and VAE)")
  p.add_argument("--per-device-batch", type=int,
                 help="images per device per round (default 32; a grid: all at once)")
  p.add_argument("--out", default="sample.png", help=".png (grid) or .npz (sample file)")
  p.add_argument("--no-progress", action="store_true")
  from dit_jax import generate  # pylint: disable=import-outside-toplevel
  generate.add_distributed_args(p)
  return p


def _labels(text: str | None):
  if text is None:
    return None
  try:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
  except ValueError:
    raise UserError(f"--class-labels {text!r}: expected comma-separated integers") from None


def _codec(vae_dir, dtype: str):
  """(decode(vae_params, latents), vae_params, latent_shape_fn) of --vae-dir."""
  from dit_jax import latent  # pylint: disable=import-outside-toplevel
  import ml_collections as mc  # pylint: disable=import-outside-toplevel
  config_latent = mc.ConfigDict({"encoder": "sd-vae-ft-ema", "vae_dir": str(vae_dir),
                                 "scale_factor": 0.18215, "dtype": dtype})
  try:
    codec, vae_params = latent.from_config(config_latent)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise UserError(f"--vae-dir {vae_dir}: {e}") from None
  return codec.decode, vae_params, codec.latent_shape


def _main(argv) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from dit_jax import generate  # pylint: disable=import-outside-toplevel

  args = make_parser().parse_args(argv)
  generate.init_distributed(args)
  out = str(args.out)
  if not out.endswith((".png", ".npz")):
    raise UserError(f"--out {out}: expected a .png (grid) or .npz (sample file) path")
  grid = out.endswith(".png")
  labels = _labels(args.class_labels)
  if grid and labels is None:
    labels = generate.OFFICIAL_GRID_CLASSES
  for name in ("num_samples", "per_device_batch", "num_sampling_steps"):
    value = getattr(args, name)
    if value is not None and value <= 0:
      raise UserError(f"--{name.replace('_', '-')} {value}: must be positive")
  if args.ckpt is not None:
    generate.require(args.ckpt, "--ckpt")
  if args.vae_dir is not None:
    generate.require(args.vae_dir, "--vae-dir")

  # The model.
  if args.ckpt is not None:
    image_size = int(args.image_size or 256)
    if image_size % generate.VAE_DOWNSAMPLE:
      raise UserError(f"--image-size {image_size} is not divisible by the VAE factor "
                      f"{generate.VAE_DOWNSAMPLE}")
    if args.vae_dir is None:
      raise UserError("--vae-dir is required with --ckpt (official DiTs sample VAE latents)")
    decode, vae_params, latent_shape_fn = _codec(args.vae_dir, args.dtype)
    latent_shape = tuple(latent_shape_fn((image_size, image_size, 3)))
    loaded = generate.load_official(
        args.ckpt, variant=args.variant or "DiT-XL/2", input_size=latent_shape[0],
        num_classes=args.num_classes,
        latent_source=f"--image-size {image_size} with --vae-dir {args.vae_dir}")
  else:
    loaded = generate.load_workdir(args.workdir, step=args.step, which=args.params)
    model = loaded.model
    if args.vae_dir is not None:
      image_size = int(args.image_size or loaded.image_size)
      decode, vae_params, latent_shape_fn = _codec(args.vae_dir, args.dtype)
      latent_shape = tuple(latent_shape_fn((image_size, image_size, 3)))
    elif loaded.latent is not None and loaded.latent.get("encoder", "none") != "none":
      raise UserError(f"--workdir {args.workdir} trained on {loaded.latent.encoder} latents: "
                      "give its --vae-dir")
    else:  # Pixel space.
      decode, vae_params = None, None
      latent_shape = (model.input_size, model.input_size, model.in_channels)
      image_size = model.input_size
  model = loaded.model
  want = (model.input_size, model.input_size, model.in_channels)
  if latent_shape != want:
    raise UserError(
        f"{loaded.checkpoint} is a DiT for {want[0]}x{want[1]}x{want[2]} inputs, but "
        f"{image_size}x{image_size} images give {latent_shape[0]}x{latent_shape[1]}x"
        f"{latent_shape[2]} latents with --vae-dir {args.vae_dir} (set --image-size to match)")
  if args.dtype != "float32":
    loaded = generate.dataclasses.replace(loaded, model=model.clone(dtype=args.dtype))
  if labels is not None:
    labels = generate.check_labels(labels, model.num_classes)
  num_samples = args.num_samples or (len(labels) if grid else FILE_NUM_SAMPLES)
  guidance_mode = args.guidance_mode or ("official" if model.in_channels == 4 else "all")

  mesh = generate.make_mesh()
  devices = int(mesh.devices.size)
  per_device = args.per_device_batch or (math.ceil(num_samples / devices) if grid else 32)
  settings = generate.Settings(
      num_samples=num_samples, class_labels=labels, sampler=args.sampler,
      num_sampling_steps=args.num_sampling_steps,
      cfg_scale=float(args.cfg_scale if args.cfg_scale is not None
                      else (GRID_CFG if grid else FILE_CFG)),
      guidance_mode=guidance_mode, seed=args.seed, per_device_batch=per_device)
  round_fn = generate.RoundFn(loaded, settings, mesh, latent_shape, decode,
                              replicate_output=grid)
  params = generate.replicate(loaded.params, mesh)
  vae_params = None if vae_params is None else generate.replicate(vae_params, mesh)
  image_shape = (image_size, image_size, 3 if decode is not None else model.in_channels)
  if grid:
    images, _ = generate.draw_in_memory(round_fn, params, vae_params, settings)
    if jax.process_index() == 0:
      generate.save_grid(out, images)
      print(f"wrote {out}: {len(images)} samples of classes {list(labels)}")
    return 0
  meta = generate.file_meta(loaded, settings, image_size=image_size, vae_dir=args.vae_dir,
                            dtype=args.dtype)
  generate.draw_to_file(round_fn, params, vae_params, settings, out, meta, image_shape,
                        progress=not args.no_progress)
  if jax.process_index() == 0:
    print(f"wrote {out}: {num_samples} samples ({np.prod(image_shape)} values each)")
  return 0


def main(argv=None) -> int:
  return errors.run_cli(PROG, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
