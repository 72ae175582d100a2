"""Every config in configs/ loads, is locked, and builds its model abstractly."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import pytest
from absl import flags

from dit_jax import diffusion as dd
from dit_jax import sampling
from dit_jax import sharding
from dit_jax import train
from dit_jax.errors import UserError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name not in ("__init__.py",
                                                                            "common.py"))


def load(path, arg=None, overrides=()):
  """Loads a config file exactly as main.py's --config flag does, with overrides."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  spec = str(path) + (f":{arg}" if arg else "")
  argv = ["prog", f"--config={spec}", *overrides]
  saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv.
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv.config


def test_all_config_files_are_listed():
  assert {p.name for p in CONFIG_FILES} >= {"digits.py", "testing.py", "imagenet256.py",
                                             "imagenet512.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_builds_model_abstractly(path):
  config = load(path)
  for section in ("model", "diffusion", "data", "latent", "optimizer", "ema", "mesh",
                  "checkpoint", "logging", "sample", "eval"):
    assert section in config, section
  model = train.build_model(config.model)
  n = 2
  shape = (n, config.model.input_size, config.model.input_size, config.model.in_channels)
  out, variables = jax.eval_shape(
      model.init_with_output, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.int32))
  assert set(variables) == {"params"}
  out_c = 2 * shape[-1] if config.model.learn_sigma else shape[-1]
  assert out.shape == shape[:3] + (out_c,)
  # The config's docstring gives the command to run it.
  assert f"--config=configs/{path.name}" in path.read_text()


def test_imagenet256_is_the_paper_recipe():
  config = load(CONFIG_DIR / "imagenet256.py", "variant=XL/2")
  model = train.build_model(config.model)
  assert (model.patch_size, model.hidden_size, model.depth, model.num_heads) == (2, 1152, 28, 16)
  assert (model.input_size, model.in_channels) == (32, 4)
  assert model.class_dropout_prob == 0.1 and model.learn_sigma
  assert config.global_batch_size == 256 and config.total_steps == 400_000
  assert config.ema.decay == 0.9999
  opt = config.optimizer
  assert (opt.learning_rate, opt.b1, opt.b2, opt.eps, opt.weight_decay) == (1e-4, .9, .999, 1e-8, 0)
  assert opt.grad_clip_norm == 0 and opt.warmup_steps == 0
  assert config.diffusion.noise_schedule == "linear" and config.diffusion.diffusion_steps == 1000
  assert config.diffusion.timestep_respacing == "" and config.diffusion.learn_sigma
  assert config.data.random_flip and config.data.image_size == 256
  assert config.latent.encoder == "sd-vae-ft-ema" and config.latent.scale_factor == 0.18215
  assert config.model.dtype == "float32" and not config.model.remat
  # Sampling: the official sample.py (250 DDPM steps, cfg 4.0, forward_with_cfg's guidance of
  # eps channels 0-2, no clipping, i.i.d. noise, the null label is num_classes).
  s = config.sample
  assert (s.sampler, s.num_sampling_steps, s.cfg_scale, s.guidance_mode) == ("ddpm", 250, 4.0,
                                                                             "official")
  assert not s.clip_denoised and s.noise == "iid" and s.guidance_interval is None
  assert s.autoguidance_scale == 1.0
  assert config.logging.grid_classes == (207, 360, 387, 974, 88, 979, 417, 279)
  for path in CONFIG_FILES:  # Every config names the cached-latents field (None = encode).
    assert load(path).data.latent_cache_dir is None, path.name


def test_variant_argument_and_latent_size_follow_overrides():
  config = load(CONFIG_DIR / "imagenet512.py", "B/4")
  model = train.build_model(config.model)
  assert (model.patch_size, model.hidden_size, model.input_size) == (4, 768, 64)
  config = load(CONFIG_DIR / "imagenet256.py", "variant=DiT-S/8",
                ["--config.data.image_size=128", "--config.model.depth=3"])
  model = train.build_model(config.model)
  assert (model.patch_size, model.depth, model.input_size) == (8, 3, 16)


def test_override_typo_is_an_error():
  with pytest.raises(AttributeError, match="hiden_size"):
    load(CONFIG_DIR / "testing.py", overrides=["--config.model.hiden_size=64"])
  config = load(CONFIG_DIR / "testing.py")
  with pytest.raises(AttributeError, match="learning_rat"):
    config.optimizer.learning_rat = 1.0


def test_build_model_and_create_diffusion_pass_every_field():
  """Every config.model field, set away from DiT's defaults, reaches the model (arch fields
  override the variant; "auto" attention is None; without a variant the five arch fields are
  required), and every config.diffusion field reaches the diffusion."""
  config = load(CONFIG_DIR / "testing.py")
  m = config.model
  values = dict(input_size=16, in_channels=3, num_classes=7, learn_sigma=False,
                class_dropout_prob=0.25, block_type="in-context", dtype="bfloat16",
                param_dtype="bfloat16", attention_impl="cudnn", remat=True,
                remat_policy="dots_saveable", scan=True, fused_adaln=True, ln_grad_barrier=True)
  for k, v in values.items():
    m[k] = v
  m.variant, m.mlp_ratio = "B/4", 2.0  # B/4's patch 4; width 32, depth 2, 2 heads, mlp 2 set.
  model = train.build_model(m)
  assert {k: getattr(model, k) for k in values} == values
  arch = tuple(getattr(model, k) for k in train.ARCH_FIELDS)
  assert arch == (4, 32, 2, 2, 2.0)
  m.attention_impl = "auto"
  assert train.build_model(m).attention_impl is None
  m.variant, m.mlp_ratio = None, None
  with pytest.raises(UserError, match=r"^config.model.variant=None leaves \['patch_size', "
                                      r"'mlp_ratio'\] unset; name a variant"):
    train.build_model(m)
  m.patch_size, m.mlp_ratio = 4, 2.0
  assert tuple(getattr(train.build_model(m), k) for k in train.ARCH_FIELDS) == arch
  with m.unlocked():  # A config file from before these fields: the plain per-block model.
    for k in ("scan", "fused_adaln", "remat_policy", "ln_grad_barrier"):
      del m[k]
  model = train.build_model(m)
  assert (model.scan, model.fused_adaln, model.remat_policy, model.ln_grad_barrier) == (
      False, False, None, None)

  d = config.diffusion
  fields = dict(timestep_respacing="25", noise_schedule="squaredcos_cap_v2",
                diffusion_steps=500, learn_sigma=False, sigma_small=True, snr_shift=2.0)
  for k, v in fields.items():
    d[k] = v
  got, want = train.create_diffusion(d), dd.create_diffusion(**fields)
  for k in vars(want):
    np.testing.assert_array_equal(getattr(got, k), getattr(want, k), err_msg=k)
  # The sampling diffusion: the same fields, respaced to num_sampling_steps ("N" for DDPM,
  # "ddimN", the official stride T // N, for DDIM).
  config.sample.num_sampling_steps = 5
  for sampler, respacing, t_map in (("ddpm", "5", [0, 125, 250, 374, 499]),
                                    ("ddim", "ddim5", [0, 100, 200, 300, 400])):
    config.sample.sampler = sampler
    got = sampling.create_sampling_diffusion(d, config.sample)
    want = dd.create_diffusion(**{**fields, "timestep_respacing": respacing})
    for k in vars(want):
      np.testing.assert_array_equal(getattr(got, k), getattr(want, k), err_msg=k)
    np.testing.assert_array_equal(got.timestep_map, t_map)
  config.sample.sampler = "euler"
  with pytest.raises(UserError, match=r"^config.sample.sampler='euler'; expected one of "
                                      r"\('ddpm', 'ddim'\)\.$"):
    sampling.create_sampling_diffusion(d, config.sample)
  with d.unlocked():
    del d["snr_shift"]  # A config file from before the field: the official schedule.
  fields["snr_shift"] = 1.0
  got, want = train.create_diffusion(d), dd.create_diffusion(**fields)
  np.testing.assert_array_equal(got.betas, want.betas)
  config.sample.sampler = "ddpm"
  got = sampling.create_sampling_diffusion(d, config.sample)
  np.testing.assert_array_equal(
      got.betas, dd.create_diffusion(**{**fields, "timestep_respacing": "5"}).betas)


def test_unknown_variant_is_an_error():
  config = load(CONFIG_DIR / "imagenet256.py", "variant=XXL/2")
  with pytest.raises(ValueError, match="XXL/2"):
    train.build_model(config.model)


def test_global_batch_not_divisible_names_both_numbers():
  mesh = sharding.make_mesh(load(CONFIG_DIR / "testing.py").mesh)  # data=-1 -> 8 devices.
  with pytest.raises(ValueError, match=r"global_batch_size=12\b.*\b8\b"):
    sharding.check_global_batch(12, mesh)
  sharding.check_global_batch(16, mesh)


def test_latent_config_without_vae_dir_names_the_field():
  config = load(CONFIG_DIR / "imagenet256.py", "variant=S/8")
  assert config.latent.vae_dir is None and config.latent.dtype == "float32"
  with pytest.raises(UserError, match=r"config\.latent\.vae_dir"):
    train.latent_codec(config.latent)
  for path in CONFIG_FILES:  # Every config names the field; pixel-space ones leave it None.
    config = load(path)
    assert "vae_dir" in config.latent and "dtype" in config.latent, path.name
    if config.latent.encoder == "none":
      assert config.latent.vae_dir is None, path.name
