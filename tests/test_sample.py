"""`python -m dit_jax.sample` and `dit_jax.generate`: the official procedure, the ImageNet
recipe's sampler set-up, device-count invariance, resuming after SIGKILL, bad input.

Parity (tests/data/model_tiny.npz, tests/data/README.md): the official
`p_sample_loop(forward_with_cfg)` of `sample.py` with injected x_T and step noise
(`loop_ddpm_cfg`); measured as max|ours - ref| / max|ref| per step, 1e-4 as test_parity.
"""
import json
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

from conftest import load_config, perturbed_params, rel_err
from dit_jax import checkpointing, generate, sample, sample_files, sampling, train
from dit_jax import train_state as ts
from dit_jax.convert import io as convert_io
from dit_jax.convert import official

REPO = pathlib.Path(__file__).resolve().parent.parent
TOL_LOOP = 1e-4


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _ref_noise(ref):
  """x_T (2, 8, 8, 4) and step noise (5, 2, 8, 8, 4): the conditional half of sample.py's."""
  z = nhwc(ref["loop/z"])
  step_noise = np.asarray(ref["loop/step_noise"]).transpose(0, 1, 3, 4, 2)[:, :2]
  return z, jnp.asarray(step_noise)


def _want(ref):
  return np.asarray(ref["loop_ddpm_cfg/samples"])[-1, :2].transpose(0, 2, 3, 1)


def test_imagenet_config_sampler_reproduces_official_cfg_loop(ref_a):
  """The recipe's sampling fields (official guidance, cfg 4.0, null label = num_classes,
  respacing) reach the loop: issue 21's sampler set-up check."""
  config = load_config("imagenet256", data__image_size=64, data__num_classes=10,
                       model__variant="tiny-A")
  config.sample.num_sampling_steps = 5  # The reference loop's respacing "5".
  assert float(ref_a["loop/cfg_scale"]) == config.sample.cfg_scale == 4.0
  model = train.build_model(config.model)
  sd = {k[len("param/"):]: ref_a[k] for k in ref_a if k.startswith("param/")}
  params = jax.tree.map(jnp.asarray, official.state_dict_to_params(sd))
  diff = sampling.create_sampling_diffusion(config.diffusion, config.sample)
  np.testing.assert_array_equal(diff.timestep_map, ref_a["loop/timestep_map"])
  z, step_noise = _ref_noise(ref_a)
  s = config.sample
  out = jax.jit(lambda p: sampling.sample(
      p, jnp.asarray(ref_a["loop/y"], jnp.int32), None, model=model, diff=diff,
      cfg_scale=s.cfg_scale, guidance_mode=s.guidance_mode, sampler=s.sampler,
      clip_denoised=s.clip_denoised, latent_shape=(8, 8, 4), decode_fn=None,
      guidance_interval=s.guidance_interval, x_T=z, step_noise=step_noise))(params)
  assert rel_err(out, _want(ref_a)) <= TOL_LOOP


def test_script_path_official_weights_equal_official_loop(ref_a, tmp_path):
  """Import of an official state_dict file -> the script's guided loop -> the same latents."""
  sd = {k[len("param/"):]: ref_a[k] for k in ref_a if k.startswith("param/")}
  convert_io.save_state_dict(sd, tmp_path / "tiny.safetensors")
  loaded = generate.load_official(tmp_path / "tiny.safetensors", variant="tiny-A",
                                  input_size=8, num_classes=10)
  labels = tuple(int(v) for v in ref_a["loop/y"])
  settings = generate.Settings(num_samples=2, class_labels=labels, num_sampling_steps=5,
                               cfg_scale=4.0, guidance_mode="official")
  round_fn = generate.RoundFn(loaded, settings, generate.make_mesh(), (8, 8, 4), None)
  z, step_noise = _ref_noise(ref_a)
  out = jax.jit(lambda p: round_fn.sample_fn(p, jnp.asarray(labels, jnp.int32), None,
                                             decode_fn=None, x_T=z, step_noise=step_noise)
                )(loaded.params)
  assert rel_err(out, _want(ref_a)) <= TOL_LOOP


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pixel-space run of configs/testing.py with a checkpoint at step 3 (perturbed init)."""
  path = tmp_path_factory.mktemp("sample") / "run"
  config = load_config("testing")
  model = train.build_model(config.model)
  params = perturbed_params(model, 0)
  tx, _ = ts.create_optimizer(config.optimizer)
  state = ts.TrainState(step=jnp.asarray(3, jnp.int32), params=params, ema_params=params,
                        opt_state=tx.init(params))
  manager = checkpointing.create_manager(str(path), config.checkpoint)
  checkpointing.save(manager, 3, state, {"step": 3, "data_position": 48,
                                         "config": checkpointing.config_to_json(config)},
                     force=True)
  checkpointing.wait(manager)
  manager.close()
  return path


JOB = ["--num-samples", "64", "--per-device-batch", "4", "--num-sampling-steps", "3",
       "--cfg-scale", "2", "--seed", "5", "--no-progress"]


def _run(workdir, out, devices, **kw):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "dit_jax.sample", "--workdir", str(workdir), "--out", str(out),
         *JOB]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def test_same_images_on_1_2_8_devices_and_after_sigkill(tmp_path, workdir):
  # 8 devices: this process (conftest), uninterrupted.
  assert sample.main(["--workdir", str(workdir), "--out", str(tmp_path / "d8.npz"), *JOB]) == 0
  want = (tmp_path / "d8.npz").read_bytes()
  images, labels = sample_files.load(tmp_path / "d8.npz")
  assert images.shape == (64, 8, 8, 1) and len(set(labels.tolist())) > 5
  assert len({im.tobytes() for im in images}) == 64  # i.i.d. noise: no two alike.
  meta = sample_files.read_meta(tmp_path / "d8.npz")
  assert (meta["step"], meta["seed"], meta["per_device_batch"], meta["cfg_scale"]) == (3, 5, 4,
                                                                                        2.0)
  assert not generate.shard_dir(tmp_path / "d8.npz").exists()
  # 1 device, uninterrupted.
  one = _run(workdir, tmp_path / "d1.npz", 1)
  # 2 devices, killed after its first shards, then restarted.
  killed = _run(workdir, tmp_path / "d2.npz", 2)
  shards = generate.shard_dir(tmp_path / "d2.npz")
  deadline = time.time() + 120
  while time.time() < deadline and len(list(shards.glob("0*.npz"))) < 2:
    time.sleep(0.005)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  written = len(list(shards.glob("0*.npz")))
  assert 2 <= written < 16 and not (tmp_path / "d2.npz").exists(), written
  restarted = _run(workdir, tmp_path / "d2.npz", 2)
  for proc in (one, restarted):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  assert (tmp_path / "d1.npz").read_bytes() == want
  assert (tmp_path / "d2.npz").read_bytes() == want


def _error(capsys, argv):
  assert sample.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("python -m dit_jax.sample: error: "), err
  return err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys, workdir):
  err = _error(capsys, ["--ckpt", str(tmp_path / "missing.pt"), "--vae-dir", str(tmp_path)])
  assert "missing.pt does not exist" in err
  err = _error(capsys, ["--workdir", str(workdir), "--class-labels", "3,10"])
  assert "--class-labels: 10 is not a class" in err
  err = _error(capsys, ["--workdir", str(workdir), "--class-labels", "-1"])
  assert "-1 is not a class" in err
  err = _error(capsys, ["--workdir", str(tmp_path / "nowhere")])
  assert "nowhere" in err and "does not exist" in err
  err = _error(capsys, ["--workdir", str(workdir), "--out", str(tmp_path / "x.jpg")])
  assert "x.jpg" in err
