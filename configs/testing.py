r"""Tiny testing config: a 2-block DiT on the 8x8 digits, a handful of steps.

Used by the tests (tests/test_train.py, tests/test_main.py, the resume and multi-host tests) and
as a quick smoke run of the whole training path:

  python -m dit_jax.main --config=configs/testing.py --workdir=/tmp/dit_testing

Expected result: finishes in well under a minute on a laptop CPU; the workdir then holds
TensorBoard events (train/loss, ...), `checkpoints/`, `grid_<step>.png`, `samples.npz`
(10 uint8 8x8x1 images in arr_0, labels 0..9 in arr_1) and `samples_grid.png`. The samples are
noise-like: the model is far too small and short-trained to draw digits (see configs/digits.py).
"""
import ml_collections as mc
from ml_collections import config_dict


def get_config(arg=None):
  """Returns the locked testing config; `arg` is unused."""
  del arg
  config = mc.ConfigDict()
  config.seed = 0
  config.total_steps = 4
  config.global_batch_size = 16

  config.data = mc.ConfigDict()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.data_dir = config_dict.placeholder(str)
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.prepare = False  # Built in: nothing to prepare.
  config.data.split = "train"
  config.data.random_flip = False  # Digits are not mirror-symmetric.
  config.data.num_classes = 10
  config.data.shuffle = True
  config.data.num_workers = 2  # Decoding threads (file-based sources).
  config.data.prefetch = 2  # Batches decoded ahead.
  # Cached VAE moments (python -m dit_jax.extract); None: read and encode the images.
  config.data.latent_cache_dir = config_dict.placeholder(str)

  config.latent = mc.ConfigDict()
  config.latent.encoder = "none"  # Pixel space.
  config.latent.scale_factor = 1.0
  config.latent.channels = 4
  config.latent.downsample = 8
  config.latent.vae_dir = config_dict.placeholder(str)  # None: pixel space, no VAE.
  config.latent.dtype = "float32"  # VAE compute dtype (latent configs only).

  config.diffusion = mc.ConfigDict()
  config.diffusion.timestep_respacing = ""
  config.diffusion.noise_schedule = "linear"
  config.diffusion.snr_shift = 1.0  # SNR multiplier of every step (1 = the schedule as named).
  config.diffusion.diffusion_steps = 1000
  config.diffusion.learn_sigma = True
  config.diffusion.sigma_small = False
  config.diffusion.min_snr_gamma = config_dict.placeholder(float)  # None: the official loss.
  config.diffusion.timestep_sampling = "uniform"  # "uniform" (official) | "stratified".
  config.diffusion.timestep_power = 0.0  # Training t density ~ (t / T)^power; 0 = uniform.

  config.model = mc.ConfigDict()
  # A named variant supplies patch_size/hidden_size/depth/num_heads/mlp_ratio; any field set
  # here (not None) overrides it. Here everything is shrunk to a 2-block, width-32 model.
  config.model.variant = "S/2"
  config.model.patch_size = config_dict.placeholder(int)
  config.model.hidden_size = 32
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.mlp_ratio = config_dict.placeholder(float)
  config.model.input_size = config.data.get_ref("image_size")
  config.model.in_channels = 1  # Grey digits.
  config.model.num_classes = config.data.get_ref("num_classes")
  config.model.learn_sigma = config.diffusion.get_ref("learn_sigma")
  config.model.class_dropout_prob = 0.1
  config.model.block_type = "adaLN-Zero"
  config.model.dtype = "float32"
  config.model.param_dtype = "float32"
  config.model.attention_impl = "xla"
  config.model.remat = False
  config.model.remat_policy = config_dict.placeholder(str)  # With remat: "dots_saveable"...
  config.model.scan = False  # True: the blocks as one lax.scan (one block compiled; same values).
  config.model.fused_adaln = False  # True: every block's adaLN modulation in one matmul.
  # None: on for a CPU backend (faster backward on XLA:CPU, same values), off elsewhere.
  config.model.ln_grad_barrier = config_dict.placeholder(bool)

  config.optimizer = mc.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.cosine_decay_steps = 0  # 0 = constant lr after warmup.

  config.ema = mc.ConfigDict()
  config.ema.decay = 0.9

  config.mesh = mc.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.strategy = "fsdp"
  config.mesh.num_cpu_devices = config_dict.placeholder(int)  # CPU only; None: JAX default.

  config.checkpoint = mc.ConfigDict()
  config.checkpoint.save_every_steps = 2
  config.checkpoint.max_to_keep = 2
  config.checkpoint.keep_every_steps = 0
  config.checkpoint.async_save = False
  # A damaged latest checkpoint (unreadable, checksum mismatch) is moved to <workdir>/corrupt/
  # and the previous step resumed; False: stop with exit code 2 instead.
  config.checkpoint.fallback = True
  config.checkpoint.allow_seed_change = False  # Resuming with another seed is refused.
  # One training run per workdir: a lock with a heartbeat lease (0 = no lock); a dead run's
  # lock expires this many seconds after its last heartbeat.
  config.checkpoint.lock_lease_secs = 60.0

  config.logging = mc.ConfigDict()
  config.logging.log_every_steps = 2
  config.logging.sample_every_steps = 4
  config.logging.grid_classes = tuple(range(10))
  config.logging.grid_samples_per_class = 1
  config.logging.grid_seed = 0
  config.logging.grid_scale = 4
  config.logging.peak_flops_per_device = config_dict.placeholder(float)
  config.logging.progress_bar = False

  config.sample = mc.ConfigDict()
  config.sample.sampler = "ddpm"
  config.sample.num_sampling_steps = 4
  config.sample.cfg_scale = 2.0
  config.sample.guidance_mode = "all"
  config.sample.guidance_interval = config_dict.placeholder(tuple)  # (lo, hi): guide lo <= t < hi.
  config.sample.autoguidance_scale = 1.0  # 1 = off; else guided by an earlier EMA snapshot:
  config.sample.autoguidance_step = config_dict.placeholder(int)  # its training step.
  config.sample.noise = "iid"  # Official; "antithetic" | "centered" (diffusion/noise.py).
  config.sample.clip_denoised = False
  config.sample.final_num_samples_per_class = 1
  config.sample.batch_size = 16
  config.sample.seed = 0

  config.eval = mc.ConfigDict()  # FID during training: dit_jax/evaluation/in_training.py.
  config.eval.fid_every_steps = 0  # 0 = off; else EMA samples' FID as eval/fid every K steps.
  config.eval.fid_num_samples = 5000  # Per evaluation (ADM's tables: 50,000, a separate job).
  config.eval.fid_ref = config_dict.placeholder(str)  # e.g. VIRTUAL_imagenet256_labeled.npz.
  config.eval.inception_weights = config_dict.placeholder(str)  # None: ~/.cache/dit_jax/...
  config.eval.fid_seed = 0  # Labels and noise, the same at every evaluation.

  config.lock()
  return config
