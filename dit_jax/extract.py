r"""Encode a data set once into cached VAE latents (`dit_jax/data/latent_cache.py`).

  # ImageNet-1k train at 256 (ADM centre crop), both flips, float16: ~42 GB
  python -m dit_jax.extract --data imagenet2012 --data-dir gs://bucket/tfds --image-size 256 \
      --vae-dir sd-vae-ft-ema --out /mnt/disks/data/latents-256 --dtype float16
  # an image folder (root/<class>/<image>)
  python -m dit_jax.extract --data image_folder --data-dir photos/ --image-size 256 \
      --vae-dir sd-vae-ft-ema --out latents/

Then train with `--config.data.latent_cache_dir=<out>`. Every device of every host encodes;
each process writes its own shards. Rerunning the same command continues an interrupted run.
"""
from __future__ import annotations

import os
import sys

from dit_jax import errors
from dit_jax.errors import UserError

PROG = "python -m dit_jax.extract"


def make_parser():
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, choices=["imagenet2012", "image_folder"])
  p.add_argument("--data-dir", help="tfds data_dir (imagenet2012) or the image folder")
  p.add_argument("--manual-dir", help="imagenet2012: where ILSVRC2012_img_*.tar lie (to "
                 "prepare the tfds data set once; needs tensorflow)")
  p.add_argument("--split", default="train")
  p.add_argument("--image-size", type=int, required=True)
  p.add_argument("--vae-dir", required=True, help="diffusers AutoencoderKL directory")
  p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"],
                 help="VAE compute dtype")
  p.add_argument("--out", required=True, help="cache directory (read back from a local disk)")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                 help="storage dtype of the moments")
  p.add_argument("--per-device-batch", type=int, default=32)
  p.add_argument("--num-workers", type=int, default=16, help="image decoding threads")
  p.add_argument("--no-progress", action="store_true")
  from dit_jax import generate  # pylint: disable=import-outside-toplevel
  generate.add_distributed_args(p)
  return p


def _main(argv) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections as mc  # pylint: disable=import-outside-toplevel
  from dit_jax import generate, input_pipeline  # pylint: disable=import-outside-toplevel
  from dit_jax import latent  # pylint: disable=import-outside-toplevel
  from dit_jax.data import latent_cache  # pylint: disable=import-outside-toplevel

  args = make_parser().parse_args(argv)
  if args.per_device_batch <= 0:
    raise UserError(f"--per-device-batch {args.per_device_batch}: must be positive")
  generate.require(args.vae_dir, "--vae-dir")
  generate.init_distributed(args)
  config_data = mc.ConfigDict({"name": args.data, "image_size": args.image_size,
                               "data_dir": args.data_dir, "manual_dir": args.manual_dir,
                               "split": args.split, "prepare": True})
  source = input_pipeline.create_source(config_data, split=args.split)
  codec, vae_params = latent.from_config(mc.ConfigDict(
      {"encoder": "sd-vae-ft-ema", "vae_dir": args.vae_dir, "scale_factor": 0.18215,
       "dtype": args.vae_dtype}))
  mesh = generate.make_mesh()
  vae_params = generate.replicate(vae_params, mesh)
  meta = {"source": {"name": args.data, "data_dir": args.data_dir, "split": args.split},
          "vae_dir": os.path.abspath(args.vae_dir) if "://" not in args.vae_dir
                     else args.vae_dir,
          "vae_dtype": args.vae_dtype}
  latent_cache.encode_dataset(source, codec, vae_params, args.out, mesh=mesh,
                              per_device_batch=args.per_device_batch, dtype=args.dtype,
                              meta=meta, num_workers=args.num_workers,
                              progress=not args.no_progress)
  if jax.process_index() == 0:
    print(f"wrote {args.out}: {len(source)} examples ({args.dtype})")
  return 0


def main(argv=None) -> int:
  return errors.run_cli(PROG, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
