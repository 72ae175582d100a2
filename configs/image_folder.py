r"""Class-conditional DiT on your own images: a `root/<class_name>/<image>` folder, in pixel space.

  python -m dit_jax.main \
      --config=configs/image_folder.py:data_dir=/data/flowers,num_classes=5,image_size=32 \
      --workdir=runs/flowers

The argument names the folder (local or gs://), its number of classes (the sub-folders, default
10; the run refuses a different count) and the training resolution (images are ADM centre-cropped to
it, as the official DiT; default 32). Everything that follows from them is set here: the model
sees image_size x image_size x 3 pixels, `num_classes` labels plus the null label, and the
sample grids show classes 0..min(num_classes, 10) - 1. Class ids are the sorted sub-folder
names' positions (the torchvision ImageFolder order). Optional: `variant=B/2` (default S/2),
`batch=256` (global batch, default 128).

The recipe is the official DiT one (AdamW 1e-4, no weight decay, EMA 0.9999, label dropout
0.1, linear schedule, learned sigma, random flips) in pixel space at a small resolution: no
result is claimed for it; train long enough for your data (~100k steps for a few thousand
images) and look at the grids. Writes TensorBoard events, `grid_<step>.png` every
`logging.sample_every_steps`, checkpoints, and at the end `samples.npz` (10 per class) and
`samples_grid.png`. For latent-space training of larger images use configs/imagenet256.py's
recipe with `data.name="image_folder"`.
"""
import ml_collections as mc
from ml_collections import config_dict

_KEYS = ("data_dir", "num_classes", "image_size", "variant", "batch")


def _parse_arg(arg):
  values = {}
  for item in (arg or "").split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if not sep or key not in _KEYS:
      raise ValueError(f"configs/image_folder.py argument {item!r}: expected key=value with "
                       f"keys {_KEYS}, e.g. 'data_dir=/data/flowers,num_classes=5'.")
    values[key] = value
  return values


def get_config(arg=None):
  """Returns the locked image-folder config for `data_dir=...,num_classes=K[,image_size=N]`."""
  args = _parse_arg(arg)
  num_classes = int(args.get("num_classes", 10))
  config = mc.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000
  config.global_batch_size = int(args.get("batch", 128))

  config.data = mc.ConfigDict()
  config.data.name = "image_folder"
  config.data.image_size = int(args.get("image_size", 32))
  config.data.data_dir = config_dict.placeholder(str)
  if args.get("data_dir"):
    config.data.data_dir = args["data_dir"]
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.prepare = False  # Nothing to build: the folder is read as it is.
  config.data.split = "train"
  config.data.random_flip = True
  config.data.num_classes = num_classes
  config.data.shuffle = True
  config.data.num_workers = 16  # Decoding threads.
  config.data.prefetch = 4  # Batches decoded ahead.
  config.data.latent_cache_dir = config_dict.placeholder(str)  # Pixel space: no latents.

  config.latent = mc.ConfigDict()
  config.latent.encoder = "none"  # Pixel space.
  config.latent.scale_factor = 1.0
  config.latent.channels = 4
  config.latent.downsample = 8
  config.latent.vae_dir = config_dict.placeholder(str)  # None: pixel space, no VAE.
  config.latent.dtype = "float32"

  config.diffusion = mc.ConfigDict()
  config.diffusion.timestep_respacing = ""
  config.diffusion.noise_schedule = "linear"
  config.diffusion.snr_shift = 1.0
  config.diffusion.diffusion_steps = 1000
  config.diffusion.learn_sigma = True
  config.diffusion.sigma_small = False
  config.diffusion.min_snr_gamma = config_dict.placeholder(float)
  config.diffusion.timestep_sampling = "uniform"
  config.diffusion.timestep_power = 0.0

  config.model = mc.ConfigDict()
  config.model.variant = args.get("variant", "S/2")
  config.model.patch_size = config_dict.placeholder(int)
  config.model.hidden_size = config_dict.placeholder(int)
  config.model.depth = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  config.model.mlp_ratio = config_dict.placeholder(float)
  config.model.input_size = config.data.get_ref("image_size")
  config.model.in_channels = 3  # RGB pixels.
  config.model.num_classes = config.data.get_ref("num_classes")
  config.model.learn_sigma = config.diffusion.get_ref("learn_sigma")
  config.model.class_dropout_prob = 0.1
  config.model.block_type = "adaLN-Zero"
  config.model.dtype = "float32"
  config.model.param_dtype = "float32"
  config.model.attention_impl = "auto"
  config.model.remat = False
  config.model.remat_policy = config_dict.placeholder(str)  # With remat: "dots_saveable"...
  config.model.scan = False  # True: the blocks as one lax.scan (one block compiled; same values).
  config.model.fused_adaln = False  # True: every block's adaLN modulation in one matmul.
  # None: on for a CPU backend (faster backward on XLA:CPU, same values), off elsewhere.
  config.model.ln_grad_barrier = config_dict.placeholder(bool)

  config.optimizer = mc.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.cosine_decay_steps = 0

  config.ema = mc.ConfigDict()
  config.ema.decay = 0.9999

  config.mesh = mc.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.strategy = "fsdp"
  config.mesh.num_cpu_devices = config_dict.placeholder(int)

  config.checkpoint = mc.ConfigDict()
  config.checkpoint.save_every_steps = 5000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_every_steps = 0
  config.checkpoint.async_save = True
  config.checkpoint.fallback = True  # A damaged latest checkpoint: resume the previous one.
  config.checkpoint.allow_seed_change = False
  config.checkpoint.lock_lease_secs = 60.0  # One training run per workdir.

  config.logging = mc.ConfigDict()
  config.logging.log_every_steps = 100
  config.logging.sample_every_steps = 5000
  config.logging.grid_classes = tuple(range(min(num_classes, 10)))
  config.logging.grid_samples_per_class = 8
  config.logging.grid_seed = 0
  config.logging.grid_scale = max(1, 128 // config.data.image_size)
  config.logging.peak_flops_per_device = config_dict.placeholder(float)
  config.logging.progress_bar = True

  config.sample = mc.ConfigDict()
  config.sample.sampler = "ddpm"
  config.sample.num_sampling_steps = 250
  config.sample.cfg_scale = 1.5
  config.sample.guidance_mode = "all"
  config.sample.guidance_interval = config_dict.placeholder(tuple)
  config.sample.autoguidance_scale = 1.0
  config.sample.autoguidance_step = config_dict.placeholder(int)
  config.sample.noise = "iid"
  config.sample.clip_denoised = False
  config.sample.final_num_samples_per_class = 10
  config.sample.batch_size = 100
  config.sample.seed = 0

  config.eval = mc.ConfigDict()  # FID during training: dit_jax/evaluation/in_training.py.
  config.eval.fid_every_steps = 0  # 0 = off; else EMA samples' FID as eval/fid every K steps.
  config.eval.fid_num_samples = 5000  # Per evaluation (ADM's tables: 50,000, a separate job).
  config.eval.fid_ref = config_dict.placeholder(str)  # A reference .npz (uint8 arr_0).
  config.eval.inception_weights = config_dict.placeholder(str)  # None: ~/.cache/dit_jax/...
  config.eval.fid_seed = 0  # Labels and noise, the same at every evaluation.

  config.lock()
  return config
