"""Command line for official DiT weights <-> Flax parameter files.

  # official checkpoint (.pt / .safetensors / .npz) -> Flax msgpack params
  python -m dit_jax.convert import --variant DiT-XL/2 --image-size 256 \
      DiT-XL-2-256x256.pt DiT-XL_2-256.msgpack
  # Flax msgpack params -> official layout (.safetensors, .pt or .npz)
  python -m dit_jax.convert export --variant DiT-XL/2 --image-size 256 \
      DiT-XL_2-256.msgpack DiT-XL-2-256x256.safetensors
  # what a file holds
  python -m dit_jax.convert inspect DiT-XL-2-256x256.pt

The model is `--variant` (a registered name, e.g. `DiT-XL/2`, `XL/2` or a tiny test variant)
plus any explicit architecture overrides (`--patch-size`, `--hidden-size`, ...); without
`--variant`, `--patch-size --hidden-size --depth --num-heads` are all required.
`--image-size` is the pixel resolution: DiT runs on the Stable Diffusion VAE's latents, 8x
smaller, so `input_size = image_size // 8` (256 -> 32). Give `--input-size` instead to set the
latent size directly. `--which` picks the entry of a training checkpoint (`ema` by default,
or `model`). User errors print one message and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from dit_jax.errors import UserError, run_cli

VAE_DOWNSAMPLE = 8


def _bool(value: str) -> bool:
  v = value.strip().lower()
  if v in ("1", "true", "yes", "y", "on"):
    return True
  if v in ("0", "false", "no", "n", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("model")
  g.add_argument("--variant", help="registered variant name, e.g. DiT-XL/2, XL/2")
  size = g.add_mutually_exclusive_group()
  size.add_argument("--image-size", type=int,
                    help=f"pixel resolution; latent input_size = image_size // {VAE_DOWNSAMPLE}")
  size.add_argument("--input-size", type=int, help="latent input size (H = W)")
  g.add_argument("--num-classes", type=int)
  g.add_argument("--learn-sigma", type=_bool, metavar="{true,false}")
  g.add_argument("--patch-size", type=int)
  g.add_argument("--in-channels", type=int)
  g.add_argument("--hidden-size", type=int)
  g.add_argument("--depth", type=int)
  g.add_argument("--num-heads", type=int)
  g.add_argument("--mlp-ratio", type=float)
  g.add_argument("--class-dropout-prob", type=float)
  g.add_argument("--block-type", choices=["adaLN-Zero", "adaLN", "in-context", "cross-attention"])


_OVERRIDES = ("num_classes", "learn_sigma", "patch_size", "in_channels", "hidden_size", "depth",
              "num_heads", "mlp_ratio", "class_dropout_prob", "block_type")
_REQUIRED_WITHOUT_VARIANT = ("patch_size", "hidden_size", "depth", "num_heads")




def model_kwargs_from_args(args: argparse.Namespace) -> dict:
  """The `build_model` dict for the parsed model arguments."""
  kwargs = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
  if args.image_size is not None:
    if args.image_size % VAE_DOWNSAMPLE:
      raise UserError(f"--image-size {args.image_size} is not divisible by the VAE factor "
                      f"{VAE_DOWNSAMPLE}")
    kwargs["input_size"] = args.image_size // VAE_DOWNSAMPLE
  elif args.input_size is not None:
    kwargs["input_size"] = args.input_size
  if args.variant is not None:
    kwargs["variant"] = args.variant
  else:
    missing = [k for k in _REQUIRED_WITHOUT_VARIANT if k not in kwargs]
    if missing:
      raise UserError("give --variant, or all of "
                      + ", ".join("--" + k.replace("_", "-") for k in missing))
  return kwargs


def _build(args):
  from dit_jax.convert import io  # pylint: disable=import-outside-toplevel
  kwargs = model_kwargs_from_args(args)
  try:
    return io.build_model(kwargs)
  except (KeyError, TypeError, ValueError) as e:  # ValueError: an unknown variant or field.
    raise UserError(f"cannot build the model from {kwargs}: {e}") from None


def _cmd_import(args) -> None:
  from dit_jax.convert import io  # pylint: disable=import-outside-toplevel
  model = _build(args)
  params = io.import_official(args.src, model, which=args.which)
  io.save_params(params, args.dst)
  n = sum(int(v.size) for v in io._flatten(params).values())  # pylint: disable=protected-access
  print(f"wrote {args.dst}: {n:,} parameters from {args.src}")


def _cmd_export(args) -> None:
  from dit_jax.convert import io  # pylint: disable=import-outside-toplevel
  model = _build(args)
  params = io.load_params(args.src, expected=io.abstract_params(model))
  sd = io.export_official(params, args.dst, model=model)
  print(f"wrote {args.dst}: {len(sd)} tensors")


def _cmd_inspect(args) -> None:
  from dit_jax.convert import io  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if args.src.endswith(".msgpack"):
    flat = {"/".join(k): v for k, v in io._flatten(io.load_params(args.src)).items()}  # pylint: disable=protected-access
  else:
    flat = io.load_state_dict(args.src, which=args.which)
  for k, v in flat.items():
    print(f"{k}\t{tuple(np.shape(v))}\t{np.asarray(v).dtype}")
  print(f"{len(flat)} tensors, {sum(int(np.size(v)) for v in flat.values()):,} values")


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m dit_jax.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import", help="official checkpoint -> Flax msgpack params")
  _add_model_args(p)
  p.add_argument("--which", default="ema",
                 help="entry of a training checkpoint: ema (default) or model")
  p.add_argument("src", help="official state_dict: .pt/.pth, .safetensors or .npz")
  p.add_argument("dst", help="output Flax params (.msgpack)")
  p.set_defaults(fn=_cmd_import)
  p = sub.add_parser("export", help="Flax msgpack params -> official state_dict")
  _add_model_args(p)
  p.add_argument("src", help="Flax params (.msgpack)")
  p.add_argument("dst", help="output: .safetensors, .pt/.pth or .npz")
  p.set_defaults(fn=_cmd_export)
  p = sub.add_parser("inspect", help="list the tensors of a file")
  p.add_argument("--which", default="ema")
  p.add_argument("src")
  p.set_defaults(fn=_cmd_inspect)
  return parser


def _main(argv) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.command == "import" and not args.dst.endswith(".msgpack"):
    parser.error(f"import writes flax msgpack: the output must end in .msgpack, got {args.dst}")
  if args.command == "export" and not args.src.endswith(".msgpack"):
    parser.error(f"export reads flax msgpack: the input must end in .msgpack, got {args.src}")
  try:
    args.fn(args)
  except ImportError as e:  # An optional dependency (torch, safetensors) is not installed.
    raise UserError(f"{args.command}: {e}") from e
  return 0


def main(argv=None) -> int:
  return run_cli("python -m dit_jax.convert", _main, argv)


if __name__ == "__main__":
  sys.exit(main())
