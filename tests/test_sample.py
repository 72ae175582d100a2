"""`python -m dit_jax.sample` and `dit_jax.generate`: the official procedure, the ImageNet
recipe's sampler set-up, device-count invariance, resuming after SIGKILL, bad input.

Parity (tests/data/model_tiny.npz, tests/data/README.md): the official
`p_sample_loop(forward_with_cfg)` of `sample.py` with injected x_T and step noise
(`loop_ddpm_cfg`); measured as max|ours - ref| / max|ref| per step, 2e-5 as test_parity.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_config, official_tree, rel_err
from dit_jax import generate, sample, sample_files, sampling, sharding, train
from dit_jax import images as image_lib
from dit_jax.convert import io as convert_io
from dit_jax.diffusion import noise as noise_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TOL_LOOP = 2e-5  # as tests/test_parity.py (observed 3.9e-6)

def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))

def _ref_noise(ref):
  """x_T (2, 8, 8, 4) and step noise (5, 2, 8, 8, 4): the conditional half of sample.py's."""
  z = nhwc(ref["loop/z"])
  step_noise = np.asarray(ref["loop/step_noise"]).transpose(0, 1, 3, 4, 2)[:, :2]
  return z, jnp.asarray(step_noise)

def _want(ref):
  return np.asarray(ref["loop_ddpm_cfg/samples"])[-1, :2].transpose(0, 2, 3, 1)

def _tiny_a_recipe(ref_a):
  """(config, model, params): the ImageNet recipe on tiny-A, 10 classes, official parameters."""
  config = load_config("imagenet256", data__image_size=64, data__num_classes=10,
                       model__variant="tiny-A")
  return config, train.build_model(config.model), official_tree(ref_a)


def test_imagenet_config_sampler_reproduces_official_cfg_loop(ref_a):
  """The recipe's sampling fields (official guidance, cfg 4.0, null label = num_classes,
  respacing) reach the loop: issue 21's sampler set-up check."""
  config, model, params = _tiny_a_recipe(ref_a)
  config.sample.num_sampling_steps = 5  # The reference loop's respacing "5".
  assert float(ref_a["loop/cfg_scale"]) == config.sample.cfg_scale == 4.0
  diff = sampling.create_sampling_diffusion(config.diffusion, config.sample)
  np.testing.assert_array_equal(diff.timestep_map, ref_a["loop/timestep_map"])
  z, step_noise = _ref_noise(ref_a)
  s = config.sample
  out = jax.jit(lambda p: sampling.sample(
      p, jnp.asarray(ref_a["loop/y"], jnp.int32), None, model=model, diff=diff,
      cfg_scale=s.cfg_scale, guidance_mode=s.guidance_mode, sampler=s.sampler,
      clip_denoised=s.clip_denoised, latent_shape=(8, 8, 4), decode_fn=None,
      guidance_interval=s.guidance_interval, x_T=z, step_noise=step_noise))(params)
  err = rel_err(out, _want(ref_a))
  assert err <= TOL_LOOP, err



def _recipe(ref_a, steps):
  """(params, fn): `sampling.sample` with the recipe's sampling fields on tiny-A, `steps`
  steps; keyword arguments of `fn` override the recipe's."""
  config, model, params = _tiny_a_recipe(ref_a)
  config.sample.num_sampling_steps = steps
  diff = sampling.create_sampling_diffusion(config.diffusion, config.sample)
  s = config.sample
  recipe = dict(sampler=s.sampler, clip_denoised=s.clip_denoised, cfg_scale=s.cfg_scale,
                guidance_mode=s.guidance_mode)
  fn = lambda p, y, key, **kw: sampling.sample(  # noqa: E731
      p, y, key, model=model, diff=diff, latent_shape=(8, 8, 4), decode_fn=None,
      **{**recipe, **kw})
  return params, fn


def test_ddim_path_reproduces_official_ddim_cfg_loop(ref_a):
  """sampler="ddim" reaches the DDIM loop (eta = 0): the official `loop_ddim_cfg` vectors, on
  the reference's respacing "5" (the recipe's DDIM respacing would be "ddim5")."""
  params, fn = _recipe(ref_a, 5)
  z, step_noise = _ref_noise(ref_a)
  out = jax.jit(lambda p: fn(p, jnp.asarray(ref_a["loop/y"], jnp.int32), None, sampler="ddim",
                             x_T=z, step_noise=step_noise))(params)
  want = np.asarray(ref_a["loop_ddim_cfg/samples"])[-1, :2].transpose(0, 2, 3, 1)
  err = rel_err(out, want)
  assert err <= TOL_LOOP, err


def test_own_noise_follows_the_documented_keys(ref_a):
  """Without x_T and step_noise, `sampling.sample` draws them from its key as its docstring
  says, so the script's samples are the official loop of the test above on those draws: one
  key: x_T = N(fold_in(key, 0)), step k's noise N(fold_in(fold_in(key, 1), k)); typed keys
  (N,): the same per sample, each of its own shape (`dit_jax.generate`)."""
  params, fn = _recipe(ref_a, 5)
  y = jnp.asarray(ref_a["loop/y"], jnp.int32)
  n, shape, k_steps = len(y), (8, 8, 4), 5
  run = jax.jit(lambda p, key, x_T, step_noise: fn(p, y, key, x_T=x_T, step_noise=step_noise))
  normal = lambda k, shp: jax.random.normal(k, shp, jnp.float32)  # noqa: E731
  key = jax.random.key(11)
  keys = jax.random.split(jax.random.key(12), n)
  per = lambda f: jax.vmap(f)(keys)  # noqa: E731
  cases = {
      "one key": (key, normal(jax.random.fold_in(key, 0), (n,) + shape),
                  jnp.stack([normal(jax.random.fold_in(jax.random.fold_in(key, 1), k),
                                    (n,) + shape) for k in range(k_steps)])),
      "per-sample keys": (keys, per(lambda k: normal(jax.random.fold_in(k, 0), shape)),
                          jnp.stack([per(lambda kk, k=k: normal(jax.random.fold_in(
                              jax.random.fold_in(kk, 1), k), shape)) for k in range(k_steps)])),
  }
  outs = []
  for name, (k, x_T, step_noise) in cases.items():
    own = run(params, k, None, None)
    fed = run(params, None, x_T, step_noise)
    assert rel_err(own, fed) <= 1e-6, name
    outs.append(np.asarray(own))
  assert np.abs(outs[0] - outs[1]).max() > 0.1  # Different keys, different samples.

  # A noise design ties x_T and every step's draw within the label groups (`noise.apply`).
  pair = jnp.asarray([y[0], y[0]])
  tie = lambda a: noise_lib.apply(a, pair, "antithetic")  # noqa: E731
  own = jax.jit(lambda p: fn(p, pair, key, noise_design="antithetic"))(params)
  x_T, step_noise = cases["one key"][1:]
  fed = jax.jit(lambda p: fn(p, pair, None, x_T=x_T, noise_design="antithetic",
                             step_noise=jax.vmap(tie)(step_noise)))(params)
  assert rel_err(own, fed) <= 1e-6


def test_guidance_scale_and_interval_reach_the_loop(ref_a):
  """One DDPM step (no noise is added at t = 0) is affine in the guided eps, so the sample is
  affine in the scale: s = 2 lies a third of the way from s = 1 (unguided) to the official
  s = 4. An interval that leaves out the step's t (0) is unguided, one that holds it guided."""
  params, fn = _recipe(ref_a, 1)
  y = jnp.asarray(ref_a["loop/y"], jnp.int32)
  z, _ = _ref_noise(ref_a)
  run = jax.jit(lambda p, cfg, interval: fn(p, y, jax.random.key(0), x_T=z, cfg_scale=cfg,
                                            guidance_interval=interval), static_argnums=(1, 2))
  one, two, four = (np.asarray(run(params, s, None), np.float64) for s in (1.0, 2.0, 4.0))
  assert np.abs(four - one).max() > 0.1
  # Observed: 4.9e-8 of max|x| off the line; the two intervals reproduce s = 4 and s = 1 exactly.
  np.testing.assert_allclose(two, one + (four - one) / 3, atol=1e-6 * np.abs(four).max())
  np.testing.assert_allclose(np.asarray(run(params, 4.0, (0, 1000))), four, rtol=0,
                             atol=1e-6 * np.abs(four).max())
  np.testing.assert_allclose(np.asarray(run(params, 4.0, (500, 1000))), one, rtol=0,
                             atol=1e-6 * np.abs(one).max())
  # At t = 0 the posterior mean is pred_xstart itself: clip_denoised=True clips the sample.
  clipped = jax.jit(lambda p: fn(p, y, jax.random.key(0), x_T=z, clip_denoised=True))(params)
  assert np.abs(four).max() > 1.5
  np.testing.assert_allclose(np.asarray(clipped), np.clip(four, -1, 1), rtol=0, atol=1e-6)
  # So is DDIM's (eta = 0) at t = 0: x_prev = pred_xstart.
  ddim = jax.jit(lambda p: fn(p, y, jax.random.key(0), x_T=z, sampler="ddim",
                             clip_denoised=True))(params)
  np.testing.assert_allclose(np.asarray(ddim), np.clip(four, -1, 1), rtol=0, atol=1e-6)


def test_sampler_binds_every_sample_field(ref_a):
  """`sampling.Sampler` (training's grids and final samples) passes every `config.sample`
  field, the decoder and its parameters, and the guide to `sampling.sample`, in batches of
  `batch_size` from fold_in(key(seed), b), padding entries in groups of their own; a config
  without `sample.noise` (older files) samples i.i.d.; DDIM configs sample with DDIM; a bad
  interval names its field."""
  config, model, params = _tiny_a_recipe(ref_a)
  s = config.sample
  s.sampler, s.num_sampling_steps, s.cfg_scale, s.guidance_mode = "ddpm", 3, 2.5, "all"
  s.clip_denoised, s.guidance_interval, s.noise = True, (0, 700), "centered"
  s.autoguidance_scale, s.batch_size = 1.5, 64
  guide = jax.tree.map(lambda a: 0.9 * a, params)
  decode = lambda v, x: jnp.tanh(v["gain"] * x)  # noqa: E731
  vae = {"gain": jnp.float32(0.7)}
  mesh = sharding.make_mesh(config.mesh)
  # The last batch is [3, 0] and two padding entries: groups 0 or 1 for the padding would tie
  # it to the real sample of class 0.
  labels = np.array([3, 3, 9, 1, 3, 0], np.int32)

  def want(noise, sampler="ddpm", **kw):
    diff = sampling.create_sampling_diffusion(config.diffusion, s)
    run = jax.jit(lambda p, g, v, y, grp, key: sampling.sample(
        p, y, key, model=model, diff=diff, cfg_scale=2.5, guidance_mode="all", sampler=sampler,
        clip_denoised=True, latent_shape=(8, 8, 4), decode_fn=decode,
        guidance_interval=(0, 700), guide_params=g, noise_design=noise, groups=grp,
        vae_params=v, **kw))
    out = []
    for b, start in enumerate(range(0, 6, 4)):  # batch_size=4 given to the Sampler.
      chunk = labels[start:start + 4]
      pad = 4 - len(chunk)
      images = run(params, guide, vae, np.pad(chunk, (0, pad)),
                   np.concatenate([chunk, -1 - np.arange(pad, dtype=np.int32)]),
                   jax.random.fold_in(jax.random.key(5), b))
      out.append(image_lib.to_uint8(np.asarray(images))[:len(chunk)])
    return np.concatenate(out)

  def check(got, ref):
    assert got.shape == ref.shape == (6, 8, 8, 4) and got.dtype == np.uint8
    diff_ = np.abs(got.astype(int) - ref.astype(int))
    assert diff_.max() <= 1 and diff_.mean() < 1e-2, (diff_.max(), diff_.mean())

  got = sampling.Sampler(model, config, mesh, (8, 8, 4), decode, batch_size=4)(
      params, labels, 5, guide_params=guide, vae_params=vae)
  check(got, want("centered", autoguidance_scale=1.5))
  with config.sample.unlocked():
    del config.sample["noise"]
  s.sampler = "ddim"
  plain = sampling.Sampler(model, config, mesh, (8, 8, 4), decode, batch_size=4,
                           autoguided=False)(params, labels, 5, guide_params=guide,
                                             vae_params=vae)
  check(plain, want("iid", sampler="ddim"))
  s.guidance_interval = (700, 0)
  with pytest.raises(ValueError, match=r"^config.sample.guidance_interval=\(700, 0\) must "):
    sampling.Sampler(model, config, mesh, (8, 8, 4), decode)


@pytest.fixture(scope="module")
def files(tmp_path_factory, ref_a):
  """tiny-A's official weights as a .safetensors state_dict, and a small random diffusers VAE
  directory (downsampling 2: 16x16 images <-> tiny-A's 8x8x4 latents) with its torch model."""
  from test_vae import REDUCED, _torch_vae  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("sample")
  sd = {k[len("param/"):]: ref_a[k] for k in ref_a if k.startswith("param/")}
  convert_io.save_state_dict(sd, root / "tiny.safetensors")
  vae = _torch_vae(REDUCED, seed=1)
  vae.save_pretrained(root / "vae")
  return {"ckpt": root / "tiny.safetensors", "vae_dir": root / "vae", "vae": vae}


def test_script_path_equals_official_loop_and_diffusers_decode(ref_a, files):
  """Import of an official state_dict file -> the script's guided loop -> the official latents;
  then the script's decode -> diffusers' `vae.decode(z / 0.18215)`; then the uint8 rule."""
  import ml_collections as mc  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from dit_jax import latent  # pylint: disable=import-outside-toplevel
  codec, vae_params = latent.from_config(mc.ConfigDict(
      {"encoder": "sd-vae-ft-ema", "vae_dir": str(files["vae_dir"]), "scale_factor": 0.18215}))
  assert codec.latent_shape((16, 16, 3)) == (8, 8, 4)
  loaded = generate.load_official(files["ckpt"], variant="tiny-A", input_size=8, num_classes=10)
  labels = tuple(int(v) for v in ref_a["loop/y"])
  settings = generate.Settings(num_samples=2, class_labels=labels, num_sampling_steps=5,
                               cfg_scale=4.0, guidance_mode="official")
  round_fn = generate.RoundFn(loaded, settings, generate.make_mesh(), (8, 8, 4), codec.decode)
  z, step_noise = _ref_noise(ref_a)
  y = jnp.asarray(labels, jnp.int32)
  with jax.default_matmul_precision("highest"):
    latents = jax.jit(lambda p: round_fn.sample_fn(p, y, None, decode_fn=None, x_T=z,
                                                   step_noise=step_noise))(loaded.params)
    images = jax.jit(lambda p, v: round_fn.sample_fn(
        p, y, None, decode_fn=codec.decode, vae_params=v, x_T=z, step_noise=step_noise))(
            loaded.params, vae_params)
  err = rel_err(latents, _want(ref_a))
  assert err <= TOL_LOOP, err
  with torch.no_grad():
    ref = files["vae"].decode(torch.from_numpy(np.array(latents).transpose(0, 3, 1, 2))
                              / 0.18215).sample
  err = rel_err(images, ref.numpy().transpose(0, 2, 3, 1))
  assert err <= 1e-5, err
  # sample_ddp.py's uint8: torch.clamp(127.5 * x + 128, 0, 255).to(uint8), on our float32.
  ours = image_lib.to_uint8(images)
  want = torch.clamp(127.5 * torch.from_numpy(np.asarray(images)) + 128.0, 0, 255)
  np.testing.assert_array_equal(ours, want.to(torch.uint8).numpy())
  assert np.mean((ours > 0) & (ours < 255)) > 0.05  # Not all saturated.


JOB = ["--variant", "tiny-A", "--num-classes", "10", "--image-size", "16", "--num-samples", "64",
       "--per-device-batch", "4", "--num-sampling-steps", "3", "--seed", "5", "--no-progress"]


def _args(files, out):
  return ["--ckpt", str(files["ckpt"]), "--vae-dir", str(files["vae_dir"]), "--out", str(out),
          *JOB]


def _run(files, out, devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-m", "dit_jax.sample", *_args(files, out)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_same_images_on_1_2_8_devices_and_after_sigkill(tmp_path, files):
  # 8 devices: this process (conftest), uninterrupted.
  assert sample.main(_args(files, tmp_path / "d8.npz")) == 0
  want = (tmp_path / "d8.npz").read_bytes()
  images, labels = sample_files.load(tmp_path / "d8.npz")
  assert images.shape == (64, 16, 16, 3) and len(set(labels.tolist())) > 5
  assert len({im.tobytes() for im in images}) == 64  # i.i.d. noise: no two alike.
  meta = sample_files.read_meta(tmp_path / "d8.npz")
  assert (meta["seed"], meta["per_device_batch"], meta["cfg_scale"], meta["guidance_mode"],
          meta["num_sampling_steps"]) == (5, 4, 1.5, "official", 3)
  assert not generate.shard_dir(tmp_path / "d8.npz").exists()
  # 1 device, uninterrupted; 2 devices killed after its first shards, then restarted.
  one = _run(files, tmp_path / "d1.npz", 1)
  killed = _run(files, tmp_path / "d2.npz", 2)
  shards = generate.shard_dir(tmp_path / "d2.npz")
  deadline = time.time() + 120
  while time.time() < deadline and len(list(shards.glob("0*.npz"))) < 2:
    time.sleep(0.002)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  written = len(list(shards.glob("0*.npz")))
  assert 2 <= written < 16 and not (tmp_path / "d2.npz").exists(), written  # 8 rounds x 2.
  restarted = _run(files, tmp_path / "d2.npz", 2)
  for proc in (one, restarted):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  assert (tmp_path / "d1.npz").read_bytes() == want
  assert (tmp_path / "d2.npz").read_bytes() == want
  # A finished file with the same settings is kept; a grid is the official sample.py picture.
  mtime = (tmp_path / "d8.npz").stat().st_mtime_ns
  assert sample.main(_args(files, tmp_path / "d8.npz")) == 0
  assert (tmp_path / "d8.npz").stat().st_mtime_ns == mtime
  args = _args(files, tmp_path / "grid.png")
  assert sample.main(args[:args.index("--num-samples")] + ["--class-labels", "1,2,3,4,5",
                                                           "--num-sampling-steps", "2"]) == 0
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  assert grid.shape == (2 * 18 + 2, 4 * 18 + 2, 3)  # torchvision's make_grid: nrow=4, padding 2.


def _error(capsys, argv):
  assert sample.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("python -m dit_jax.sample: error: "), err
  return err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys, files):
  base = ["--ckpt", str(files["ckpt"]), "--vae-dir", str(files["vae_dir"]), "--variant",
          "tiny-A", "--num-classes", "10", "--image-size", "16"]
  err = _error(capsys, ["--ckpt", str(tmp_path / "missing.pt"), "--vae-dir", str(tmp_path)])
  assert "missing.pt does not exist" in err
  err = _error(capsys, [*base, "--class-labels", "3,10"])
  assert "--class-labels: 10 is not a class" in err
  err = _error(capsys, [*base, "--class-labels", "-1"])
  assert "-1 is not a class" in err
  err = _error(capsys, [*base, "--image-size", "32"])
  assert "is a DiT for 8x8 latents, but --image-size 32" in err and "16x16 latents" in err
  err = _error(capsys, ["--workdir", str(tmp_path / "nowhere")])
  assert "nowhere" in err and "does not exist" in err
  err = _error(capsys, [*base, "--out", str(tmp_path / "x.jpg")])
  assert "x.jpg" in err
  broken = tmp_path / "vae"
  broken.mkdir()
  (broken / "config.json").write_text((files["vae_dir"] / "config.json").read_text())
  err = _error(capsys, [*base, "--vae-dir", str(broken)])
  assert str(broken) in err
