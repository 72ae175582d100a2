"""The Flax Stable Diffusion VAE against diffusers' PyTorch AutoencoderKL, its importer, the codec.

Parity: random weights (every tensor perturbed, GroupNorm affine parameters included), written
by diffusers' `save_pretrained` and read by `convert.vae.load_diffusers_vae`; the reference is
diffusers run in float64 on the same weights and inputs (diffusers' own float32 forward is
1.2e-5 away from it on the full SD decoder at 64x64, which is no test of ours), ours runs in
float32 with `jax_default_matmul_precision="highest"`: max|ours - ref| / max|ref| <= 1e-5.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from dit_jax import latent
from dit_jax.convert import vae as convert_vae
from dit_jax.errors import UserError
from dit_jax.models.vae import AutoencoderKL, VAEConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCALE = 0.18215
REDUCED = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
               latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2)
FULL_SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _torch_vae(kwargs, seed):
  """diffusers' AutoencoderKL with random weights in every tensor: uniform kernels of
  variance 1 / fan_in, GroupNorm scales 1 + U(-0.2, 0.2) and biases U(-0.2, 0.2) (the default
  init leaves GroupNorm at (1, 0) and biases at 0, which would hide a mis-mapped parameter).
  Built on the meta device and filled from numpy: torch's own init of 84M parameters is slow."""
  with torch.device("meta"):
    model = diffusers.AutoencoderKL(**kwargs)
  model = model.to_empty(device="cpu").eval()
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      u = rng.random(p.shape, dtype=np.float32) * 2 - 1
      if p.ndim > 1:
        u *= np.float32(np.sqrt(3.0 / np.prod(p.shape[1:])))
      elif "norm" in name and name.endswith(".weight"):
        u = 1 + 0.2 * u
      else:
        u *= 0.2
      p.copy_(torch.from_numpy(u))
  return model


def _reference(model, images_nhwc):
  """diffusers in float64: posterior mean, std (NHWC) and the decoder output of the mean."""
  model = model.double()
  with torch.no_grad():
    post = model.encode(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)).double()).latent_dist
    dec = model.decode(post.mean).sample
  model.float()
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return nhwc(post.mean), nhwc(post.std), nhwc(dec)


def _images(n, size, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _legacy_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  """The directory `src` with the early-diffusers attention names of the published
  sd-vae-ft-* files; the encoder's q/k/v/proj weights also stored as 1x1 convs (O, I, 1, 1)."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  sd = safetensors.numpy.load_file(str(src / convert_vae.WEIGHTS_NAMES[0]))
  names = {v: k for k, v in convert_vae.LEGACY_ATTENTION_NAMES.items()}
  out = {}
  for key, value in sd.items():
    for new, old in names.items():
      tag = f".attentions.0.{new}."
      if tag in key:
        key = key.replace(tag, f".attentions.0.{old}.")
        if key.startswith("encoder.") and key.endswith(".weight"):
          value = value[:, :, None, None]
    out[key] = value
  assert sum(".query." in k or ".proj_attn." in k for k in out) == 8  # 2 x (w, b) x 2 coders.
  safetensors.numpy.save_file(out, str(dst / convert_vae.WEIGHTS_NAMES[0]))


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
  """A reduced diffusers VAE, its save_pretrained directory and our jitted codec functions."""
  root = tmp_path_factory.mktemp("vae_reduced")
  model = _torch_vae(REDUCED, seed=0)
  model.save_pretrained(root / "vae")
  _legacy_copy(root / "vae", root / "legacy")
  config, params = convert_vae.load_diffusers_vae(root / "vae")
  codec = latent.LatentCodec(AutoencoderKL(config), SCALE)
  return dict(model=model, dir=root / "vae", legacy=root / "legacy", config=config,
              params=params, codec=codec, moments=jax.jit(codec.moments),
              encode=jax.jit(codec.encode), decode=jax.jit(codec.decode))


def test_reduced_config_matches_diffusers(reduced):
  images = _images(2, 16)
  mean, std, dec = _reference(reduced["model"], images)
  ours_mean, ours_std = reduced["moments"](reduced["params"], images)
  ours_dec = reduced["decode"](reduced["params"], jnp.asarray(mean, jnp.float32) * SCALE)
  assert ours_mean.shape == (2, 8, 8, 4) and ours_dec.shape == (2, 16, 16, 3)
  assert rel_err(ours_mean, mean) <= 1e-5
  assert rel_err(ours_std, std) <= 1e-5
  assert rel_err(ours_dec, dec) <= 1e-5
  assert 0.2 < np.min(std) and np.max(std) < 5  # The posterior std is a real test, not exp(0).


def test_legacy_attention_names_load_the_same_weights(reduced):
  config, params = convert_vae.load_diffusers_vae(reduced["legacy"])
  assert config == reduced["config"]
  jax.tree.map(np.testing.assert_array_equal, params, reduced["params"])
  # Our writer round-trips both namings bit for bit.
  sd = convert_vae.state_dict_from_params(params, legacy=True)
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in sd
  back = convert_vae.params_from_state_dict(sd, config)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_name_rule_maps_every_parameter_to_a_diffusers_key(reduced):
  ours = set(convert_vae.state_dict_from_params(reduced["params"]))
  theirs = set(reduced["model"].state_dict())
  assert ours == theirs
  assert convert_vae.flax_path_to_key(
      ("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel")) == \
      "encoder.down_blocks.0.resnets.1.conv1.weight"


def test_encode_is_scaled_posterior_sample_and_decode_unscales(reduced):
  params, images = reduced["params"], _images(2, 16, seed=1)
  rng = jax.random.key(3)
  mean, std = reduced["moments"](params, images)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  z = reduced["encode"](params, images, rng)
  np.testing.assert_allclose(z, (mean + std * eps) * SCALE, rtol=1e-6, atol=1e-7)
  # (decode dividing by the scale factor first is checked against diffusers' decoder of the
  # unscaled mean in the parity tests.)
  assert reduced["codec"].latent_shape((16, 16, 3)) == (8, 8, 4)
  with pytest.raises(UserError, match=r"divisible by 2"):
    reduced["codec"].latent_shape((15, 16, 3))


def test_bfloat16_compute_is_close_to_float32(reduced):
  codec = latent.LatentCodec(reduced["codec"].vae, SCALE, "bfloat16")
  images = _images(2, 16, seed=2)
  mean, _ = jax.jit(codec.moments)(reduced["params"], images)
  ref, _ = reduced["moments"](reduced["params"], images)
  assert mean.dtype == jnp.float32
  assert 0 < rel_err(mean, ref) < 0.05


def test_full_sd_config_matches_diffusers(tmp_path):
  model = _torch_vae(FULL_SD, seed=1)
  model.save_pretrained(tmp_path)
  config, params = convert_vae.load_diffusers_vae(tmp_path)
  assert config.block_out_channels == (128, 256, 512, 512) and config.downsample == 8
  n_params = sum(np.size(p) for p in jax.tree.leaves(params))
  assert n_params == sum(p.numel() for p in model.parameters()) == 83_653_863
  images = _images(1, 32, seed=4)
  mean, std, dec = _reference(model, images)
  codec = latent.LatentCodec(AutoencoderKL(config), SCALE)
  ours_mean, ours_std = jax.jit(codec.moments)(params, images)
  ours_dec = jax.jit(codec.decode)(params, jnp.asarray(mean, jnp.float32) * SCALE)
  assert rel_err(ours_mean, mean) <= 1e-5
  assert rel_err(ours_std, std) <= 1e-5
  assert rel_err(ours_dec, dec) <= 1e-5


# ------------------------------------------------------------------------------------------
# Bad input: one UserError, one line, naming the thing.


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, reduced):
  """The reduced VAE written by our own writer (no torch), as the error tests' starting point."""
  path = tmp_path_factory.mktemp("vae_small") / "vae"
  convert_vae.save_diffusers_vae(path, reduced["config"], reduced["params"])
  return path


def _copy(small_dir, tmp_path, edit_sd=None, edit_config=None):
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  dst = tmp_path / "vae"
  dst.mkdir()
  config = json.loads((small_dir / "config.json").read_text())
  sd = safetensors.numpy.load_file(str(small_dir / convert_vae.WEIGHTS_NAMES[0]))
  if edit_config:
    edit_config(config)
  if edit_sd:
    edit_sd(sd)
  (dst / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(sd, str(dst / convert_vae.WEIGHTS_NAMES[0]))
  return dst


def _one_line_error(match, fn, *args):
  with pytest.raises(UserError, match=match) as e:
    fn(*args)
  assert "\n" not in str(e.value)


KEY = "decoder.up_blocks.1.resnets.1.norm1.weight"


@pytest.mark.parametrize("case,match", [
    ("missing_key", r"missing key " + KEY.replace(".", r"\.")),
    ("extra_key", r"unexpected key encoder\.extra\.weight"),
    ("wrong_shape", KEY.replace(".", r"\.") + r" has shape \(3,\); expected \(16,\)"),
    ("bad_block_type", r"down_block_types"),
])
def test_bad_weights_or_config_name_the_key(small_dir, tmp_path, case, match):
  edits = {
      "missing_key": dict(edit_sd=lambda sd: sd.pop(KEY)),
      "extra_key": dict(edit_sd=lambda sd: sd.update({"encoder.extra.weight": np.zeros(2)})),
      "wrong_shape": dict(edit_sd=lambda sd: sd.update({KEY: np.zeros(3, np.float32)})),
      "bad_block_type": dict(edit_config=lambda c: c.update(
          down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"])),
  }
  _one_line_error(match, convert_vae.load_diffusers_vae, _copy(small_dir, tmp_path, **edits[case]))


def test_missing_directory_or_files_name_them(small_dir, tmp_path):
  _one_line_error(r"nowhere: no such directory", convert_vae.load_diffusers_vae,
                  tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  _one_line_error(r"empty/config\.json: no such file", convert_vae.load_diffusers_vae,
                  tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text((small_dir / "config.json").read_text())
  _one_line_error(r"has no diffusion_pytorch_model\.safetensors or "
                  r"diffusion_pytorch_model\.bin", convert_vae.load_diffusers_vae,
                  tmp_path / "empty")


def test_torch_bin_file_loads_with_weights_only(small_dir, reduced, tmp_path):
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  dst = tmp_path / "vae"
  dst.mkdir()
  (dst / "config.json").write_text((small_dir / "config.json").read_text())
  sd = safetensors.numpy.load_file(str(small_dir / convert_vae.WEIGHTS_NAMES[0]))
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, dst / convert_vae.WEIGHTS_NAMES[1])
  _, params = convert_vae.load_diffusers_vae(dst)
  jax.tree.map(np.testing.assert_array_equal, params, reduced["params"])


class _Latent(dict):
  """A stand-in for config.latent (a ConfigDict reads the same way)."""
  __getattr__ = dict.__getitem__


def test_from_config_checks_the_scale_factor_and_vae_dir(small_dir, tmp_path):
  base = dict(encoder="sd-vae-ft-ema", scale_factor=SCALE, channels=4, downsample=2,
              vae_dir=str(small_dir), dtype="float32")
  codec, params = latent.from_config(_Latent(base))
  assert codec.scale_factor == SCALE and codec.vae.config.block_out_channels == (16, 32)
  assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
  assert latent.from_config(_Latent(base, encoder="none")) == (None, None)
  other = _copy(small_dir, tmp_path, edit_config=lambda c: c.update(scaling_factor=0.13025))
  _one_line_error(r"config\.latent\.scale_factor=0\.18215 .*scaling_factor=0\.13025",
                  latent.from_config, _Latent(base, vae_dir=str(other)))
  _one_line_error(r"config\.latent\.vae_dir", latent.from_config, _Latent(base, vae_dir=None))
  _one_line_error(r"config\.latent\.downsample=8 but the VAE .* has 2", latent.from_config,
                  _Latent(base, downsample=8))
  _one_line_error(r"config\.latent\.dtype='float16'", latent.from_config,
                  _Latent(base, dtype="float16"))


# ------------------------------------------------------------------------------------------
# Latent training end to end.


def test_imagenet_config_trains_on_latents_and_writes_decoded_grids(small_dir, tmp_path):
  """configs/imagenet256.py shrunk (32 px images, the reduced VAE, a 2-block DiT): it starts,
  trains on posterior samples and writes an EMA grid decoded to 32x32 RGB pixels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from conftest import load_config  # pylint: disable=import-outside-toplevel
  from dit_jax import train  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for c in ("cat", "dog"):
    (tmp_path / "images" / c).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(
          tmp_path / "images" / c / f"{i}.png")
  config = load_config("imagenet256", data__name="image_folder", data__image_size=32,
                       data__data_dir=str(tmp_path / "images"), data__num_classes=2,
                       data__num_workers=1, latent__downsample=2,
                       latent__vae_dir=str(small_dir), model__variant="S/4",
                       model__hidden_size=32, model__depth=2, model__num_heads=2)
  config.update(total_steps=2, global_batch_size=8)
  config.logging.update(sample_every_steps=2, log_every_steps=1, grid_classes=(0, 1),
                        progress_bar=False)
  config.sample.num_sampling_steps = 2
  config.checkpoint.update(save_every_steps=2, async_save=False)
  assert (config.model.input_size, config.model.in_channels) == (16, 4)
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 2
  grid = np.asarray(Image.open(tmp_path / "run" / f"grid_{2:07d}.png"))
  assert grid.shape == (2 + 32 + 2, 2 + 2 * (32 + 2), 3)  # make_grid: 2 px padding.
  assert grid[2:34, 2:34].std() > 0  # Decoded pixels, not the padding.
