"""DiT training: the pure train step and the loop that wires data, state, checkpoints and logs.

This module computes nothing itself beyond the step below; the maths lives in `diffusion`, the
network in `models`, the layout in `sharding`, the state in `train_state`, the on-disk format in
`checkpointing`, and sample generation in `sampling`.

One step (official DiT train.py, with per-step randomness from fold_in(seed, step)):

  k_t, k_noise, k_drop, k_enc = split(fold_in(rng, state.step), 4)
  x_0 = encode(vae_params, images, k_enc)  (latent configs, `latent.LatentCodec.encode`;
                                            identity in pixel space; with cached latents
                                            (mean + std * eps) * scale of the cached moments)
  t ~ U{0, ..., T-1} (i.i.d., or stratified over the batch),  eps ~ N(0, I)
  loss = mean_n training_losses(diffusion, model(., ., y; label dropout from k_drop), x_0, t, eps)
  params <- optax update(grad loss);  ema <- decay * ema + (1 - decay) * params

`train_and_evaluate(config, workdir)` builds the mesh, restores or initialises the sharded state,
jits the step once (in/out shardings, the state donated; the VAE parameters of latent configs
are a replicated argument, never a compiled-in constant), and loops: metrics reach the host only
on logging and checkpoint steps; a grid of EMA samples every `logging.sample_every_steps`; a
final checkpoint, and for configs with `sample.final_num_samples_per_class > 0`,
`<workdir>/samples.npz` (`sample_files`: uint8 N x H x W x C in arr_0, labels in arr_1, how
they were drawn in dit_jax_meta) and
`<workdir>/samples_grid.png`. Files and metrics are written by process 0 only.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dit_jax import checkpointing
from dit_jax import diffusion as dd
from dit_jax import errors
from dit_jax import gcs
from dit_jax import images as image_lib
from dit_jax import input_pipeline
from dit_jax import latent
from dit_jax import metrics as metrics_lib
from dit_jax import preemption
from dit_jax import prepare as data_prepare
from dit_jax import sample_files
from dit_jax import sampling
from dit_jax import sharding
from dit_jax import train_state as ts
from dit_jax import workdir_lock
from dit_jax.data import latent_cache
from dit_jax.evaluation import in_training
from dit_jax.models import DiT, variants

PyTree = Any
# (vae_params, images, rng) -> scaled latents; (vae_params, scaled latents) -> images.
EncodeFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]
DecodeFn = Callable[[PyTree, jax.Array], jax.Array]

ARCH_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio")
LATENT_ENCODERS = latent.ENCODERS


def build_model(config_model) -> DiT:
  """The DiT of `config.model`: the variant's architecture, overridden by non-None fields."""
  try:
    kwargs = variants.parse(config_model.variant) if config_model.variant else {}
  except ValueError as e:
    raise errors.UserError(f"config.model.variant={config_model.variant!r}: {e}") from e
  for field in ARCH_FIELDS:
    value = config_model.get(field)
    if value is not None:
      kwargs[field] = value
  missing = [f for f in ARCH_FIELDS if f not in kwargs]
  if missing:
    raise errors.UserError(f"config.model.variant={config_model.variant!r} leaves {missing} unset; "
                     f"name a variant (one of {variants.NAMES}) or set these fields.")
  attention_impl = config_model.attention_impl
  kwargs.update(
      input_size=int(config_model.input_size),
      in_channels=int(config_model.in_channels),
      num_classes=int(config_model.num_classes),
      learn_sigma=bool(config_model.learn_sigma),
      class_dropout_prob=float(config_model.class_dropout_prob),
      block_type=config_model.block_type,
      dtype=config_model.dtype,
      param_dtype=config_model.param_dtype,
      attention_impl=None if attention_impl in (None, "auto") else attention_impl,
      remat=bool(config_model.remat),
      remat_policy=config_model.get("remat_policy"),
      scan=bool(config_model.get("scan", False)),
      fused_adaln=bool(config_model.get("fused_adaln", False)),
      ln_grad_barrier=config_model.get("ln_grad_barrier"))
  try:
    return DiT(**kwargs)
  except ValueError as e:  # DiT's own checks name the field (e.g. "dtype='int8' must be ...").
    raise errors.UserError(f"config.model: {e}") from e


def create_diffusion(config_diffusion) -> dd.GaussianDiffusion:
  """The training diffusion (all T steps unless `timestep_respacing` says otherwise)."""
  return dd.create_diffusion(
      timestep_respacing=config_diffusion.timestep_respacing,
      noise_schedule=config_diffusion.noise_schedule,
      diffusion_steps=int(config_diffusion.diffusion_steps),
      learn_sigma=bool(config_diffusion.learn_sigma),
      sigma_small=bool(config_diffusion.sigma_small),
      snr_shift=float(config_diffusion.get("snr_shift", 1.0)))


def latent_codec(config_latent, encode_fn: EncodeFn | None = None,
                 decode_fn: DecodeFn | None = None, vae_params: PyTree = None
                 ) -> tuple[EncodeFn | None, DecodeFn | None, PyTree]:
  """(encode_fn, decode_fn, vae_params as numpy) of `config.latent`; all None in pixel space.

  By default the Stable Diffusion VAE of `config.latent.vae_dir` (`latent.from_config`):
  `encode_fn(vae_params, images, rng)` returns latents already multiplied by
  `config.latent.scale_factor` (the official `vae.encode(x).sample() * 0.18215`) and
  `decode_fn(vae_params, latents)` divides by it first. Other encoders can be plugged in by
  passing both functions (and their parameters, or None).
  """
  name = config_latent.encoder
  if name not in LATENT_ENCODERS:
    raise errors.UserError(f"config.latent.encoder={name!r}; expected one of {LATENT_ENCODERS}.")
  if name == "none":
    if encode_fn is not None or decode_fn is not None:
      raise errors.UserError("config.latent.encoder='none' (pixel space) but an encode_fn/decode_fn "
                       "was given.")
    return None, None, None
  if encode_fn is not None and decode_fn is not None:
    return encode_fn, decode_fn, vae_params
  codec, vae_params = latent.from_config(config_latent)
  return codec.encode, codec.decode, vae_params


def model_input_shape(config, image_shape, encode_fn: EncodeFn | None,
                      vae_params: PyTree = None) -> tuple[int, int, int]:
  """(H, W, C) the model sees; checks it against config.model.input_size / in_channels."""
  if encode_fn is None:
    shape = tuple(int(s) for s in image_shape)
  else:
    out = jax.eval_shape(encode_fn, vae_params,
                         jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32),
                         jax.random.key(0))
    shape = tuple(int(s) for s in out.shape[1:])
  expected = (int(config.model.input_size),) * 2 + (int(config.model.in_channels),)
  if shape != expected:
    raise errors.UserError(
        f"The model input is {shape} (data images {tuple(image_shape)}, "
        f"config.latent.encoder={config.latent.encoder!r}) but config.model.input_size="
        f"{expected[0]}, config.model.in_channels={expected[2]} expect {expected}.")
  return shape


def train_step(state: ts.TrainState, batch: dict, rng: jax.Array, vae_params: PyTree = None,
               *, model: DiT,
               diffusion: dd.GaussianDiffusion, tx: optax.GradientTransformation,
               ema_decay: float, encode_fn: EncodeFn | None = None,
               lr_schedule: optax.Schedule | None = None,
               min_snr_gamma: float | None = None,
               timestep_sampling: str = "uniform",
               timestep_power: float = 0.0,
               draws: dict | None = None) -> tuple[ts.TrainState, dict]:
  """One optimizer step on `batch` = {"image": (N,H,W,C) in [-1,1], "label": (N,)}; pure.

  vae_params: the parameters of `encode_fn` (None in pixel space): an argument, so that jit
  does not compile them in as constants.

  min_snr_gamma: None (the official loss) or the Min-SNR-gamma weighting of the mse term.
  timestep_sampling: "uniform" (official, i.i.d.) or "stratified" over the global batch.
  timestep_power: training timestep density ~ (t / T)^power (0: uniform, the official).
  draws: None (training: t, noise and the label-drop mask come from `rng` as above), or
    {"t": (N,) int, "noise": like x_0, "drop": (N,) 0/1} used instead of those three draws, so
    that a test can feed the official computation's draws (tests/test_train_official.py).
  """
  k_t, k_noise, k_drop, k_enc = jax.random.split(jax.random.fold_in(rng, state.step), 4)
  # Cached latents (`data.latent_cache`) give the posterior moments of the flipped images.
  x_start = batch["moments" if "moments" in batch else "image"].astype(jnp.float32)
  if encode_fn is not None:
    x_start = encode_fn(vae_params, x_start, k_enc)
  y = batch["label"]
  n = x_start.shape[0]
  if draws is None:
    t = dd.sample_timesteps(k_t, n, diffusion.num_timesteps, timestep_sampling, timestep_power)
    noise = jax.random.normal(k_noise, x_start.shape, jnp.float32)
    drop = None
  else:
    t, noise, drop = draws["t"], draws["noise"], draws["drop"]

  def loss_fn(params):
    def model_fn(x_t, model_t):
      return model.apply({"params": params}, x_t, model_t, y, train=True,
                         force_drop_ids=drop, rngs={"label_dropout": k_drop})
    terms = dd.training_losses(diffusion, model_fn, x_start, t, noise,
                               min_snr_gamma=min_snr_gamma)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                            state.ema_params, params)
  metrics = {
      "train/loss": loss,
      "train/mse": jnp.mean(terms["mse"]),
      "train/vb": jnp.mean(terms["vb"]) if "vb" in terms else jnp.zeros(()),
      "train/grad_norm": optax.tree.norm(grads),
  }
  if lr_schedule is not None:
    metrics["train/lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


def bind_train_step(config, model, diffusion, tx, lr_schedule,
                    encode_fn: EncodeFn | None = None):
  """`train_step` with everything but (state, batch, rng[, vae_params], draws=) bound."""
  return functools.partial(
      train_step, model=model, diffusion=diffusion, tx=tx,
      ema_decay=float(config.ema.decay), encode_fn=encode_fn, lr_schedule=lr_schedule,
      min_snr_gamma=config.diffusion.get("min_snr_gamma"),
      timestep_sampling=config.diffusion.get("timestep_sampling") or "uniform",
      timestep_power=float(config.diffusion.get("timestep_power") or 0.0))


def jit_train_step(config, model, diffusion, tx, lr_schedule, mesh, state_shardings,
                   encode_fn: EncodeFn | None = None):
  """`train_step` bound to the run and jitted once with shardings; the state is donated.

  With an `encode_fn` it is `step_fn(state, batch, rng, vae_params)` (the VAE parameters
  replicated, an argument rather than compiled-in constants); in pixel space
  `step_fn(state, batch, rng)`.
  """
  step_fn = bind_train_step(config, model, diffusion, tx, lr_schedule, encode_fn)
  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)
  in_shardings = (state_shardings, batch_sh, repl)  # batch_sh: every leaf of the batch.
  if encode_fn is not None:
    in_shardings += (repl,)
  return jax.jit(step_fn,
                 in_shardings=in_shardings,
                 out_shardings=(state_shardings, repl),
                 donate_argnums=(0,))


def setup_state(config, model, tx, mesh, input_shape):
  """(init_fn() -> sharded TrainState, abstract state, state shardings)."""
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  init_fn = ts.make_init_fn(model, tx, (1,) + tuple(input_shape))
  abstract, shardings = ts.abstract_state_and_shardings(
      init_fn, init_rng, mesh, config.mesh.strategy)
  return (lambda: ts.init_state(init_fn, init_rng, shardings)), abstract, shardings


def _check_finite(step: int, host_metrics: dict, workdir, manager, config_optimizer=None) -> None:
  """Stops on a non-finite loss or gradient norm, naming the checkpoint a rerun resumes from."""
  bad = {k: v for k, v in host_metrics.items()
         if k in ("train/loss", "train/grad_norm") and not np.isfinite(v)}
  if not bad:
    return
  checkpointing.wait(manager)  # Let a save in flight (of an earlier, finite state) finish.
  latest = checkpointing.latest_step(manager)
  if latest is None:
    kept = f"no checkpoint was saved yet in {checkpointing.checkpoint_directory(str(workdir))}"
  else:
    where = checkpointing.step_directory(manager, latest)
    saved = checkpointing.read_meta(manager, latest).get(checkpointing.INTEGRITY) or {}
    if saved.get("nonfinite"):
      kept = (f"the latest checkpoint, step {latest} ({where}), holds non-finite values "
              f"({', '.join(saved['nonfinite'][:3])}): move it aside to resume from an "
              "earlier step")
    else:
      kept = (f"a rerun resumes from the latest checkpoint, step {latest} ({where}), "
              "finite when saved" + ("" if saved else " (no checksums recorded)"))
  advice = []
  if config_optimizer is not None:
    advice.append("lower config.optimizer.learning_rate")
    if not int(config_optimizer.get("warmup_steps") or 0):
      advice.append("set config.optimizer.warmup_steps")
    if not float(config_optimizer.get("grad_clip_norm") or 0.0):
      advice.append("set config.optimizer.grad_clip_norm")
  raise FloatingPointError(
      f"Non-finite training metrics at step {step}: {bad}. Stopping without saving; {kept}."
      + (f" If it recurs after resuming: {', '.join(advice)}." if advice else ""))


def _restore_guide(manager, guide_step: int, abstract_state, state_shardings):
  """The EMA parameters of checkpoint `guide_step` (the autoguidance guide), sharded."""
  if guide_step not in manager.all_steps():
    raise errors.UserError(
        f"config.sample.autoguidance_step={guide_step}: no such checkpoint in "
        f"{manager.directory} (saved steps: {sorted(manager.all_steps())}). It is kept when the "
        "run trains through that step with autoguidance on; set config.sample.autoguidance_scale"
        "=1 to sample without it.")
  guide_state, _ = checkpointing.restore(manager, guide_step, abstract_state, state_shardings)
  return guide_state.ema_params


def _grid_ncols(num_classes_shown: int, per_class: int) -> int:
  return per_class if per_class > 1 else num_classes_shown


def train_and_evaluate(config, workdir: str, *, encode_fn: EncodeFn | None = None,
                       decode_fn: DecodeFn | None = None,
                       vae_params: PyTree = None) -> ts.TrainState:
  """Trains (resuming from `<workdir>/checkpoints` if present) and writes logs and samples."""
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  global_batch_size = int(config.global_batch_size)
  total_steps = int(config.total_steps)

  # Fail on configuration errors before any expensive work (and before creating the workdir).
  encode_fn, decode_fn, vae_params = latent_codec(config.latent, encode_fn, decode_fn,
                                                  vae_params)
  mesh = sharding.make_mesh(config.mesh)
  if vae_params is not None:  # Replicated; an explicit argument of the step and the samplers.
    vae_params = latent.replicate(vae_params, sharding.replicated(mesh))
  sharding.check_global_batch(global_batch_size, mesh, jax.process_count())
  if total_steps < 0:
    raise errors.UserError(f"config.total_steps={total_steps} must be >= 0.")
  guide_step = sampling.autoguidance_step(config.sample, total_steps,
                                          int(config.checkpoint.save_every_steps))
  sampling.grid_labels(config.logging.grid_classes, int(config.logging.grid_samples_per_class),
                       num_classes=int(config.model.num_classes))  # Checks the classes.
  gcs.check_paths({"--workdir": str(workdir), "config.data.data_dir": config.data.data_dir,
                   "config.data.manual_dir": config.data.get("manual_dir")})
  if workdir.exists() and not workdir.is_dir():
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory.")
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  # One training run per workdir (process 0 holds the lease; readers never take it).
  # The writer is closed however the run ends, so a failed run keeps the metrics it logged.
  with workdir_lock.hold(workdir, config.checkpoint.get("lock_lease_secs", 0.0)) as lock, \
      metrics_lib.MetricWriter(workdir, enabled=is_main) as writer:
    return _train(config, workdir, mesh, guide_step, encode_fn, decode_fn, vae_params, lock,
                  writer)


def _train(config, workdir: epath.Path, mesh, guide_step: int | None,
           encode_fn: EncodeFn | None, decode_fn: DecodeFn | None, vae_params: PyTree,
           lock: workdir_lock.WorkdirLock | None,
           writer: metrics_lib.MetricWriter) -> ts.TrainState:
  """The body of `train_and_evaluate`, run while this run holds the workdir's lock."""
  is_main = jax.process_index() == 0
  global_batch_size = int(config.global_batch_size)
  total_steps = int(config.total_steps)
  logging.info("Mesh %s on %d processes (%s).", dict(mesh.shape), jax.process_count(),
               mesh.devices.flat[0].device_kind)

  source = data_prepare.source_for_training(config.data, config.data.split,
                                            jax.process_index(), jax.process_count())
  if isinstance(source, latent_cache.LatentCacheSource):  # Sample the posterior, no encoder.
    if encode_fn is None:
      raise errors.UserError("config.data.latent_cache_dir holds VAE latents but "
                             "config.latent.encoder='none' (pixel space)")
    encode_fn = functools.partial(latent_cache.encode_cached,
                                  scale_factor=float(config.latent.scale_factor))
    input_shape = model_input_shape(config, source.latent_shape, None)
  else:
    input_shape = model_input_shape(config, source.image_shape, encode_fn, vae_params)
  model = build_model(config.model)
  diffusion = create_diffusion(config.diffusion)
  tx, lr_schedule = ts.create_optimizer(config.optimizer)

  init_fn, abstract_state, state_shardings = setup_state(config, model, tx, mesh, input_shape)
  manager = checkpointing.create_manager(workdir, config.checkpoint,
                                         keep_steps=() if guide_step is None else (guide_step,))
  state, meta = checkpointing.restore_or_init(manager, abstract_state, state_shardings, init_fn,
                                              config)
  step = int(jax.device_get(state.step))
  logging.info("%s at step %d; %d parameters.", "Resumed" if step else "Initialised", step,
               ts.param_count(abstract_state.params))
  start_step = int(meta.get("data_position", 0)) // global_batch_size
  if start_step != step:
    raise errors.UserError(f"Checkpoint meta data_position={meta.get('data_position')} is not step "
                     f"{step} x config.global_batch_size={global_batch_size}; was the global "
                     "batch size changed? Resume with the original value.")

  it = input_pipeline.make_iterator(
      source, config.data, global_batch_size=global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
      start_step=start_step)
  batch_sh = sharding.batch_sharding(mesh)
  # Made under jit: device_put of a host value cannot target a multi-process sharding.
  train_rng = jax.jit(lambda: jax.random.fold_in(jax.random.key(config.seed), 1),
                      out_shardings=sharding.replicated(mesh))()
  step_fn = jit_train_step(config, model, diffusion, tx, lr_schedule, mesh, state_shardings,
                           encode_fn)

  flops = metrics_lib.dit_train_flops(model, global_batch_size)
  peak = config.logging.peak_flops_per_device or metrics_lib.peak_flops(
      mesh.devices.flat[0].device_kind)
  peak_total = peak * mesh.devices.size if peak else None
  samplers = {}

  def get_sampler(batch_size, autoguided=False):
    # One compile per batch size; grids use their exact size and the EMA model alone (the
    # autoguidance guide is an earlier checkpoint), the final samples use the sampling config.
    # Without autoguidance both are the same function: the final samples reuse a grid's compile.
    autoguided = autoguided and guide_step is not None
    if (batch_size, autoguided) not in samplers:
      samplers[batch_size, autoguided] = sampling.Sampler(
          model, config, mesh, input_shape, decode_fn, batch_size=batch_size,
          autoguided=autoguided)
    return samplers[batch_size, autoguided]

  fid_eval = in_training.create(config, mesh, model.num_classes, log=logging.info)

  grid_classes = tuple(config.logging.grid_classes)
  per_class = int(config.logging.grid_samples_per_class)
  grid_labels = sampling.grid_labels(grid_classes, per_class)
  grid_seed = int(config.logging.grid_seed)

  def write_grid(step):
    images = get_sampler(len(grid_labels))(state.ema_params, grid_labels, grid_seed,
                                           vae_params=vae_params)
    if is_main:
      grid = image_lib.make_grid(images, _grid_ncols(len(grid_classes), per_class),
                                 scale=int(config.logging.grid_scale))
      writer.write_images(step, {"samples/ema_grid": grid})
      image_lib.save_png(workdir / f"grid_{step:07d}.png", grid)

  def make_meta(step):
    return {"step": step,
            "data_position": input_pipeline.examples_seen(step, global_batch_size),
            "config": checkpointing.config_to_json(config)}

  log_every = int(config.logging.log_every_steps)
  sample_every = int(config.logging.sample_every_steps)
  bar = metrics_lib.ProgressBar(total_steps, initial=step,
                                enabled=is_main and bool(config.logging.progress_bar))
  compiled = None
  throughput = None
  vae_args = () if encode_fn is None else (vae_params,)
  host_metrics = {}
  stop_request = preemption.StopRequest.install()  # SIGTERM / preemption notice.
  stopped = False
  while step < total_steps:
    batch = sharding.global_batch(next(it), batch_sh)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = step_fn.lower(state, batch, train_rng, *vae_args).compile()
      logging.info("Compiled the train step in %.1fs; %.3g model FLOPs per step.",
                   time.perf_counter() - t0, flops)
      if jax.process_count() > 1:
        # CPU collectives (gloo) fail when a peer's first call comes over 30 s later, as after
        # a slower compile on a loaded host: start stepping together.
        data_prepare.wait_for_all_processes("dit_jax_train_step_compiled")
      throughput = metrics_lib.Throughput(step, global_batch_size, flops, peak_total)
    state, step_metrics = compiled(state, batch, train_rng, *vae_args)
    step += 1
    bar.update()

    stopped = stop_request.reached(step)  # The same step on every process.
    should_save = manager.should_save(step) or stopped
    if step % log_every == 0 or step == total_steps or should_save:
      host_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      _check_finite(step, host_metrics, workdir, manager, config.optimizer)
    if step % log_every == 0 or step == total_steps:
      host_metrics.update(throughput.measure(step))
      if is_main:
        writer.write_scalars(step, host_metrics)
        bar.set_postfix(loss=f"{host_metrics['train/loss']:.4f}")
        metrics_lib.log_scalars(step, host_metrics)
    with throughput.pause():
      if should_save:
        if lock is not None:
          lock.check()  # Never write a workdir another run has taken over.
        checkpointing.save(manager, step, state, make_meta(step), force=stopped)
      if sample_every and step % sample_every == 0 and not stopped:
        write_grid(step)
      if fid_eval is not None and fid_eval.due(step) and not stopped:
        sampler = get_sampler(int(config.sample.batch_size))
        fid = fid_eval(lambda labels, seed: sampler(state.ema_params, labels, seed,
                                                    vae_params=vae_params))
        if is_main:
          writer.write_scalars(step, {"eval/fid": fid})
          logging.info("Step %d: eval/fid %.4f (%d EMA samples).", step, fid,
                       fid_eval.num_samples)
    if stopped:
      break
  bar.close()
  stop_request.close()

  if step > 0:
    checkpointing.save(manager, step, state, make_meta(step), force=True)
  checkpointing.wait(manager)
  if stopped:
    logging.warning("Stopped at step %d (%s) with its checkpoint saved in %s; the same "
                    "command resumes from it.", step, stop_request.reason,
                    manager.directory / str(step))
    writer.close()
    manager.close()
    return state

  n_final = int(config.sample.final_num_samples_per_class)
  # Every process runs the sampler (a collective), so the decision must not depend on files.
  if n_final > 0:
    labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), n_final)
    guide_params = None
    if guide_step is not None:
      guide_params = _restore_guide(manager, guide_step, abstract_state, state_shardings)
    logging.info("Generating %d final samples with the EMA parameters%s.", len(labels),
                 "" if guide_step is None else
                 f", autoguided (scale {config.sample.autoguidance_scale}) by those of step "
                 f"{guide_step}")
    batch_size = min(int(config.sample.batch_size), len(labels))
    images = get_sampler(batch_size, autoguided=True)(state.ema_params, labels,
                                                      int(config.sample.seed), guide_params,
                                                      vae_params=vae_params)
    if is_main:
      sample_files.save(workdir / "samples.npz", images, labels, sampling.file_meta(
          config, checkpoint=str(workdir), step=step, num_samples=len(labels)))
      shown = min(n_final, 10)
      idx = (np.arange(model.num_classes)[:, None] * n_final + np.arange(shown)).ravel()
      grid = image_lib.make_grid(images[idx], shown, scale=int(config.logging.grid_scale))
      image_lib.save_png(workdir / "samples_grid.png", grid)
      writer.write_images(step, {"samples/final_grid": grid})
  writer.close()
  manager.close()
  return state
