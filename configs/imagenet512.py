r"""The paper's ImageNet 512x512 recipe (Peebles & Xie 2023, Sec. 4 and the official train.py).

  python -m dit_jax.main --config=configs/imagenet512.py:variant=XL/2 --workdir=gs://BUCKET/dit-xl2-512 \
      --config.data.manual_dir=gs://BUCKET/imagenet-manual --config.data.data_dir=gs://BUCKET/tfds \
      --config.latent.vae_dir=/path/to/sd-vae-ft-ema

`variant` is any registered name ("S/8" ... "XL/2", with or without the "DiT-" prefix; also
`:XL/2`). Recipe: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping, no
warmup, global batch 256, EMA 0.9999 updated after every step (EMA starts equal to the
parameters), label dropout 0.1, T = 1000 linear betas, learned sigma (hybrid loss L_simple +
L_vb), random horizontal flip, ADM centre crop, 400K steps, float32, 64x64x4 latents of the
Stable Diffusion VAE ("sd-vae-ft-ema", scaled by 0.18215) from 512x512 images.
Expected result: the paper trains DiT-XL/2-512 for 3M steps (set --config.total_steps) to
FID-50K 3.04 with cfg scale 1.5 (paper Table 3; official 250-step DDPM sampler).
`config.latent.vae_dir` is required: a local diffusers VAE directory (a copy of Hugging Face's
stabilityai/sd-vae-ft-ema: config.json + diffusion_pytorch_model.safetensors or .bin; nothing
is downloaded); without it a run stops at start-up naming the field. `config.latent.dtype` is
the VAE's compute dtype ("bfloat16" at scale).
Scale options (all off in the recipe): --config.model.dtype=bfloat16, --config.model.remat=True,
--config.optimizer.grad_clip_norm=1.0, --config.optimizer.warmup_steps=N, --config.mesh.fsdp=N.
"""
import importlib.util
import pathlib

IMAGE_SIZE = 512

# Config files are loaded by path, not as a package: load the 256 recipe beside this file.
_spec = importlib.util.spec_from_file_location(
    "dit_jax_configs_imagenet256", pathlib.Path(__file__).with_name("imagenet256.py"))
_imagenet256 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_imagenet256)


def get_config(arg=None):
  """Returns the locked ImageNet-512 config for the variant in `arg`: the 256 recipe at 512."""
  return _imagenet256.make_config(arg, IMAGE_SIZE)
