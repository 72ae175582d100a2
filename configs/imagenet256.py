r"""The paper's ImageNet 256x256 recipe (Peebles & Xie 2023, Sec. 4 and the official train.py).

  python -m dit_jax.main --config=configs/imagenet256.py:variant=XL/2 --workdir=gs://BUCKET/dit-xl2-256 \
      --config.data.manual_dir=gs://BUCKET/imagenet-manual --config.data.data_dir=gs://BUCKET/tfds \
      --config.latent.vae_dir=/path/to/sd-vae-ft-ema

`variant` is any registered name ("S/8" ... "XL/2", with or without the "DiT-" prefix; also
`:XL/2`). Recipe: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping, no
warmup, global batch 256, EMA 0.9999 updated after every step (EMA starts equal to the
parameters), label dropout 0.1, T = 1000 linear betas, learned sigma (hybrid loss L_simple +
L_vb), random horizontal flip, ADM centre crop, 400K steps, float32, 32x32x4 latents of the
Stable Diffusion VAE ("sd-vae-ft-ema", scaled by 0.18215) from 256x256 images.
Expected result: DiT-XL/2 at 400K steps reaches FID-50K ~19.5 without guidance (paper Table 4;
measured with the official 250-step DDPM sampler).
`config.latent.vae_dir` is required: a local diffusers VAE directory (a copy of Hugging Face's
stabilityai/sd-vae-ft-ema: config.json + diffusion_pytorch_model.safetensors or .bin; nothing
is downloaded); without it a run stops at start-up naming the field. `config.latent.dtype` is
the VAE's compute dtype ("bfloat16" at scale).
Scale options (all off in the recipe): --config.model.dtype=bfloat16, --config.model.remat=True,
--config.optimizer.grad_clip_norm=1.0, --config.optimizer.warmup_steps=N, --config.mesh.fsdp=N.
"""
import ml_collections as mc
from ml_collections import config_dict

IMAGE_SIZE = 256


def _parse_arg(arg):
  """Accepts "variant=XL/2", "XL/2", "DiT-XL/2" or None (XL/2)."""
  if not arg:
    return "XL/2"
  key, sep, value = arg.partition("=")
  if not sep:
    return arg
  if key != "variant":
    raise ValueError(f"Unknown config argument {key!r} in {arg!r}; expected 'variant=XL/2'.")
  return value


def get_config(arg=None):
  """Returns the locked ImageNet-256 config for the variant in `arg`."""
  return make_config(arg, IMAGE_SIZE)


def make_config(arg, image_size: int):
  """The paper's recipe at `image_size` (configs/imagenet512.py reuses it at 512)."""
  config = mc.ConfigDict()
  config.seed = 0
  config.total_steps = 400_000
  config.global_batch_size = 256

  config.data = mc.ConfigDict()
  config.data.name = "imagenet2012"
  config.data.image_size = image_size
  config.data.data_dir = config_dict.placeholder(str)  # tfds data_dir (local or gs://).
  config.data.manual_dir = config_dict.placeholder(str)  # Where ILSVRC2012_img_train.tar lies.
  config.data.split = "train"
  config.data.random_flip = True
  config.data.num_classes = 1000
  config.data.shuffle = True
  config.data.num_workers = 16  # Decoding threads (file-based sources).
  config.data.prefetch = 2  # Batches decoded ahead.
  # Cached VAE moments (python -m dit_jax.extract); None: read and encode the images.
  config.data.latent_cache_dir = config_dict.placeholder(str)
  config.data.prepare = True  # Build the tfds data set from manual_dir if missing.

  config.latent = mc.ConfigDict()
  config.latent.encoder = "sd-vae-ft-ema"  # or "sd-vae-ft-mse"; "none" trains in pixel space.
  config.latent.scale_factor = 0.18215
  config.latent.channels = 4
  config.latent.downsample = 8
  # A local diffusers VAE directory (config.json + diffusion_pytorch_model.safetensors or
  # .bin), e.g. a copy of Hugging Face's stabilityai/sd-vae-ft-ema; set it on the command line.
  config.latent.vae_dir = config_dict.placeholder(str)
  config.latent.dtype = "float32"  # VAE compute dtype; "bfloat16" at scale.

  config.diffusion = mc.ConfigDict()
  config.diffusion.timestep_respacing = ""  # Train on all T steps.
  config.diffusion.noise_schedule = "linear"
  config.diffusion.snr_shift = 1.0  # SNR multiplier of every step (1 = the schedule as named).
  config.diffusion.diffusion_steps = 1000
  config.diffusion.learn_sigma = True
  config.diffusion.sigma_small = False
  config.diffusion.min_snr_gamma = config_dict.placeholder(float)  # None: the official loss.
  config.diffusion.timestep_sampling = "uniform"  # "uniform" (official) | "stratified".
  config.diffusion.timestep_power = 0.0  # Training t density ~ (t / T)^power; 0 = uniform.

  config.model = mc.ConfigDict()
  config.model.variant = _parse_arg(arg)
  # None = take the variant's value; set to override one architecture field.
  config.model.patch_size = config_dict.placeholder(int)
  config.model.hidden_size = config_dict.placeholder(int)
  config.model.depth = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  config.model.mlp_ratio = config_dict.placeholder(float)
  config.model.input_size = config.data.get_ref("image_size") // config.latent.get_ref("downsample")
  config.model.in_channels = config.latent.get_ref("channels")
  config.model.num_classes = config.data.get_ref("num_classes")
  config.model.learn_sigma = config.diffusion.get_ref("learn_sigma")
  config.model.class_dropout_prob = 0.1
  config.model.block_type = "adaLN-Zero"
  config.model.dtype = "float32"  # Compute dtype; "bfloat16" at scale.
  config.model.param_dtype = "float32"
  config.model.attention_impl = "xla"  # "xla" | "cudnn" | "auto".
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
  config.optimizer.grad_clip_norm = 0.0  # 0 = off.
  config.optimizer.warmup_steps = 0
  config.optimizer.cosine_decay_steps = 0  # 0 = constant lr after warmup.

  config.ema = mc.ConfigDict()
  config.ema.decay = 0.9999

  config.mesh = mc.ConfigDict()
  config.mesh.data = -1  # -1 = all devices not used by the other axis.
  config.mesh.fsdp = 1
  config.mesh.strategy = "fsdp"  # "fsdp" | "replicated"; with fsdp=1 both replicate.
  config.mesh.num_cpu_devices = config_dict.placeholder(int)  # CPU only; None: JAX default.

  config.checkpoint = mc.ConfigDict()
  config.checkpoint.save_every_steps = 5_000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.keep_every_steps = 50_000  # Milestones kept forever (official: every 50K).
  config.checkpoint.async_save = True
  # A damaged latest checkpoint (unreadable, checksum mismatch) is moved to <workdir>/corrupt/
  # and the previous step resumed; False: stop with exit code 2 instead.
  config.checkpoint.fallback = True
  config.checkpoint.allow_seed_change = False  # Resuming with another seed is refused.
  # One training run per workdir: a lock with a heartbeat lease (0 = no lock); a dead run's
  # lock expires this many seconds after its last heartbeat.
  config.checkpoint.lock_lease_secs = 60.0

  config.logging = mc.ConfigDict()
  config.logging.log_every_steps = 100
  config.logging.sample_every_steps = 10_000
  config.logging.grid_classes = (207, 360, 387, 974, 88, 979, 417, 279)  # Official sample.py.
  config.logging.grid_samples_per_class = 1
  config.logging.grid_seed = 0
  config.logging.grid_scale = 1
  config.logging.peak_flops_per_device = config_dict.placeholder(float)  # For train/mfu.
  config.logging.progress_bar = True

  config.sample = mc.ConfigDict()
  config.sample.sampler = "ddpm"
  config.sample.num_sampling_steps = 250
  config.sample.cfg_scale = 4.0
  config.sample.guidance_mode = "official"  # Guide eps[..., :3], as the released FIDs.
  config.sample.guidance_interval = config_dict.placeholder(tuple)  # (lo, hi): guide lo <= t < hi.
  config.sample.autoguidance_scale = 1.0  # 1 = off; else guided by an earlier EMA snapshot:
  config.sample.autoguidance_step = config_dict.placeholder(int)  # its training step.
  config.sample.noise = "iid"  # Official; "antithetic" | "centered" (diffusion/noise.py).
  config.sample.clip_denoised = False
  config.sample.final_num_samples_per_class = 0  # FID sampling is a separate job.
  config.sample.batch_size = 64
  config.sample.seed = 0

  config.eval = mc.ConfigDict()  # FID during training: dit_jax/evaluation/in_training.py.
  config.eval.fid_every_steps = 0  # 0 = off; else EMA samples' FID as eval/fid every K steps.
  config.eval.fid_num_samples = 5000  # Per evaluation (ADM's tables: 50,000, a separate job).
  config.eval.fid_ref = config_dict.placeholder(str)  # e.g. VIRTUAL_imagenet256_labeled.npz.
  config.eval.inception_weights = config_dict.placeholder(str)  # None: ~/.cache/dit_jax/...
  config.eval.fid_seed = 0  # Labels and noise, the same at every evaluation.

  config.lock()
  return config
