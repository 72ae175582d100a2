"""Cached VAE latents (`python -m dit_jax.extract`, `data/latent_cache.py`) and the README's
ImageNet recipe end to end on a tiny image folder with a small random VAE.

The recipe's config (configs/imagenet256.py) shrunk: tiny-A DiT, 16x16 RGB images of 3
classes, a diffusers VAE that downsamples by 2 (8x8x4 latents), random flips on.
"""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_config, perturbed_params, rel_err
from dit_jax import extract, generate, input_pipeline, latent, sample, sample_files, train
from dit_jax import train_state as ts
from dit_jax.data import latent_cache

IMAGE_SIZE, NUM_IMAGES = 16, 15


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/<class>/<image>: 3 classes x 5 images of 20x24 RGB (centre-cropped to 16)."""
  from test_vae import REDUCED, _torch_vae  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("cache")
  rng = np.random.default_rng(0)
  for c in range(3):
    (root / "images" / f"class{c}").mkdir(parents=True)
    for k in range(NUM_IMAGES // 3):
      smooth = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8).repeat(4, 0).repeat(4, 1)
      Image.fromarray(smooth).save(root / "images" / f"class{c}" / f"{k}.png")
  _torch_vae(REDUCED, seed=2).save_pretrained(root / "vae")
  return root


def _config(folder, **overrides):
  config = load_config("imagenet256", data__name="image_folder",
                       data__data_dir=str(folder / "images"), data__image_size=IMAGE_SIZE,
                       data__num_classes=3, model__variant="tiny-A",
                       latent__vae_dir=str(folder / "vae"), latent__downsample=2, **overrides)
  config.data.num_workers = 2
  return config


def _extract(folder, out, dtype="float32"):
  return extract.main(["--data", "image_folder", "--data-dir", str(folder / "images"),
                       "--image-size", str(IMAGE_SIZE), "--vae-dir", str(folder / "vae"),
                       "--out", str(out), "--per-device-batch", "1", "--dtype", dtype,
                       "--no-progress"])


@pytest.fixture(scope="module")
def caches(folder):
  """The float32 and float16 caches of the folder (8 devices, 1 image each per round)."""
  out = {}
  for dtype in ("float32", "float16"):
    out[dtype] = folder / f"cache-{dtype}"
    assert _extract(folder, out[dtype], dtype) == 0
  return out


def test_cache_layout_and_resume(folder, caches):
  cache = caches["float32"]
  meta = latent_cache.read_meta(cache)
  assert (meta["num_examples"], meta["num_classes"], meta["latent_shape"], meta["dtype"],
          meta["image_size"]) == (NUM_IMAGES, 3, [8, 8, 4], "float32", IMAGE_SIZE)
  assert latent_cache.finished_shards(cache) == [(0, 8), (8, 15)]
  source = latent_cache.LatentCacheSource(str(cache))
  # Each example holds the posterior of the image and of its mirror image.
  codec, vae_params = latent.from_config(_config(folder).latent)
  images = np.stack([input_pipeline.create_source(_config(folder).data)[i][0] for i in (0, 14)])
  x = jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)
  for flip, xs in ((0, x), (1, x[:, :, ::-1])):
    mean, std = jax.jit(codec.moments)(vae_params, xs)
    got = np.stack([source[i][0][flip] for i in (0, 14)])
    assert rel_err(got[:, 0], mean) <= 1e-5 and rel_err(got[:, 1], std) <= 1e-5
  # Resume: a lost shard is redrawn, the finished one is kept as it is.
  lost = cache / latent_cache.shard_name("moments", 8, 15)
  want = lost.read_bytes()
  kept = (cache / latent_cache.shard_name("moments", 0, 8)).stat().st_mtime_ns
  lost.unlink()
  assert _extract(folder, cache) == 0
  assert lost.read_bytes() == want
  assert (cache / latent_cache.shard_name("moments", 0, 8)).stat().st_mtime_ns == kept


def test_cached_training_equals_on_the_fly_encoding(folder, caches):
  """Same flips (the pipeline's rule) and the same posterior noise (the step's k_enc): the loss
  and the updated parameters of two steps match; float16 storage within its rounding."""
  config = _config(folder)
  codec, vae_params = latent.from_config(config.latent)
  model = train.build_model(config.model)
  diffusion = train.create_diffusion(config.diffusion)
  tx, _ = ts.create_optimizer(config.optimizer)
  params = perturbed_params(model, 0, image_shape=(8, 8, 4))
  bind = functools.partial(train.train_step, model=model, diffusion=diffusion, tx=tx,
                           ema_decay=0.9999)
  scale = float(config.latent.scale_factor)
  cached_fn = functools.partial(latent_cache.encode_cached, scale_factor=scale)
  steps = {"pixels": jax.jit(functools.partial(bind, encode_fn=codec.encode)),
           "cached": jax.jit(functools.partial(bind, encode_fn=cached_fn))}
  rng = jax.random.key(7)
  results = {}
  for name, cache in (("pixels", None), ("float32", caches["float32"]),
                      ("float16", caches["float16"])):
    cfg = _config(folder)
    cfg.data.latent_cache_dir = None if cache is None else str(cache)
    it = input_pipeline.make_iterator(input_pipeline.create_source(cfg.data), cfg.data,
                                      global_batch_size=8, process_index=0, process_count=1,
                                      seed=0)
    state = ts.TrainState(step=jnp.asarray(0, jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params))
    losses = []
    step = steps["pixels" if cache is None else "cached"]
    for _ in range(3):  # 15 images, batch 8: the third batch wraps into the second epoch.
      state, metrics = step(state, next(it), rng, vae_params)
      losses.append(float(metrics["train/loss"]))
    results[name] = (np.array(losses), state.params)
  want_loss, want_params = results["pixels"]
  loss32, params32 = results["float32"]
  assert np.max(np.abs(loss32 - want_loss) / want_loss) <= 1e-5, (loss32, want_loss)
  assert max(jax.tree.leaves(jax.tree.map(rel_err, params32, want_params))) <= 1e-5
  loss16, _ = results["float16"]
  err16 = np.max(np.abs(loss16 - want_loss) / want_loss)
  print(f"\ncached float16 vs on the fly: loss rel err {err16:.2e} "
        f"(float32: {np.max(np.abs(loss32 - want_loss) / want_loss):.2e})")
  assert err16 <= 1e-4


def test_readme_recipe_end_to_end(folder, caches, tmp_path):
  """extract (above) -> train on the cache -> sample from the workdir -> an ADM sample file."""
  config = _config(folder, data__latent_cache_dir=str(caches["float16"]))
  config.total_steps = 2
  config.global_batch_size = 8
  config.checkpoint.save_every_steps = 2
  config.logging.log_every_steps = 1
  config.logging.sample_every_steps = 0
  config.logging.grid_classes = (0, 1, 2)
  config.logging.progress_bar = False
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 2
  out = tmp_path / "samples.npz"
  assert sample.main(["--workdir", str(workdir), "--vae-dir", str(folder / "vae"),
                      "--num-samples", "12", "--per-device-batch", "2",
                      "--num-sampling-steps", "3", "--out", str(out), "--no-progress"]) == 0
  images, labels = sample_files.load(out)
  assert images.shape == (12, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
  assert set(labels.tolist()) <= {0, 1, 2}
  meta = sample_files.read_meta(out)
  assert (meta["step"], meta["cfg_scale"], meta["num_samples"]) == (2, 1.5, 12)
  assert sample.main(["--workdir", str(workdir), "--step", "7", "--vae-dir",
                      str(folder / "vae"), "--out", str(out)]) == 2  # No such checkpoint.


def test_readme_recipe_commands_parse():
  """Every `python -m dit_jax.{sample,extract,main}` command of the README's sampling and recipe
  sections names only options (and config fields) that exist."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  import shlex  # pylint: disable=import-outside-toplevel
  readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = readme[readme.index("## Sampling: `python -m dit_jax.sample`"):
                   readme.index("## Performance")]
  commands = re.findall(r"^(python -m dit_jax\.\w+ .*?)(?<!\\)$", section.replace("\\\n", " "),
                        flags=re.M)
  seen = set()
  config = load_config("imagenet256")
  for command in commands:
    argv = shlex.split(command)[2:]
    seen.add(argv[0])
    if argv[0] == "dit_jax.main":
      for arg in argv[1:]:
        if arg.startswith("--config."):
          section_name, field = arg.split("=")[0][len("--config."):].split(".")
          assert field in config[section_name], arg
    else:
      module = {"dit_jax.sample": sample, "dit_jax.extract": extract}[argv[0]]
      module.make_parser().parse_args(argv[1:])
  assert seen == {"dit_jax.sample", "dit_jax.extract", "dit_jax.main"}, seen
