r"""Speed of the real training step and the real samplers: a table and JSON.

  python -m dit_jax.bench --config=configs/imagenet256.py:variant=S/2 \
      --config.global_batch_size=8 --steps=5
  python -m dit_jax.bench --mode=sample --config=configs/imagenet256.py:variant=S/2 \
      --config.sample.batch_size=8 --config.sample.num_sampling_steps=50 \
      --config.sample.cfg_scale=1 --steps=3
  python -m dit_jax.bench --config=configs/imagenet256.py:variant=XL/2 \
      --config.global_batch_size=128 --config.model.dtype=bfloat16 \
      --config.model.attention_impl=cudnn --json=xl2.json

Any config and override of the training command works (variant, resolution, batch, dtype,
attention implementation, remat, scan, mesh). Train mode times `train.train_step` jitted by
`train.jit_train_step` exactly as training does (state donated); sample mode times
`sampling.sample` (the DDPM or DDIM `lax.scan` loop of `config.sample`, guidance included)
jitted as `sampling.Sampler` does. The inputs are synthetic latents (the model's input shape):
the VAE is not timed, as with cached latents. Each is lowered and compiled once (both times
reported), run `--warmup` times, then timed `--steps` times, one call at a time; the figures
are medians over the timed calls:

  images/s  = batch / step time                       (sample mode: batch / loop time)
  TFLOP/s   = FLOPs per call / step time, FLOPs per call = metrics.dit_train_flops(model, batch)
              (train), or forward FLOPs (= dit_train_flops / 3) x model batch x sampling steps,
              the model batch doubled by classifier-free guidance and by autoguidance (sample)
  MFU       = TFLOP/s / peak, against the data-sheet peak (`metrics.peak_flops`, bf16) x devices
              and against a measured matmul peak: on a CPU numpy's float32 2048 x 2048 product,
              timed in the same process before and after the timed steps (the median of both;
              on a loaded machine the ratio is steadier than either time); elsewhere a jitted
              8192 x 8192 product in the step's dtype on each device, x devices.

Peak device memory is the backend's `peak_bytes_in_use` ("n/a" where it reports none, e.g.
on a CPU). The command prints a table and then one line of JSON (also written to `--json`).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from dit_jax import errors
from dit_jax import host_memory
from dit_jax import metrics as metrics_lib
from dit_jax import sampling
from dit_jax import sharding
from dit_jax import train
from dit_jax import train_state as ts
from dit_jax import diffusion as dd
from dit_jax.diffusion import noise as noise_lib

MODES = ("train", "sample")
PROG = "python -m dit_jax.bench"


def cpu_matmul_flops(n: int = 2048, reps: int = 3) -> float:
  """numpy's float32 (n x n) @ (n x n) FLOP/s on this host: the best of `reps` products."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  a @ b  # Warm up (threads, caches).
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def device_matmul_flops(device: jax.Device, dtype: str, n: int = 8192, reps: int = 5) -> float:
  """FLOP/s of a jitted (n x n) @ (n x n) product in `dtype` on `device`: the best of `reps`."""
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_memory_bytes(devices: Sequence[jax.Device]) -> int | None:
  """The largest `peak_bytes_in_use` over `devices`, or None where the backend reports none."""
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _timed(fn: Callable[[], Any], steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _synthetic_batch(config, batch_size: int, input_shape, mesh) -> dict:
  rng = np.random.default_rng(0)
  local = {"image": rng.standard_normal((batch_size,) + tuple(input_shape)).astype(np.float32),
           "label": rng.integers(0, int(config.model.num_classes), batch_size).astype(np.int32)}
  return sharding.global_batch(local, sharding.batch_sharding(mesh))


def _model_input_shape(config) -> tuple[int, int, int]:
  return (int(config.model.input_size),) * 2 + (int(config.model.in_channels),)


class _Peak:
  """The measured matmul peak; on a CPU timed around the steps (see the module docstring)."""

  def __init__(self, mesh, dtype: str, size: int | None = None):
    self.size = size or (2048 if mesh.devices.flat[0].platform == "cpu" else 8192)
    self.devices = list(mesh.devices.flat)
    self.cpu = self.devices[0].platform == "cpu"
    self.dtype = dtype
    self.samples = []
    self.measure()

  def measure(self):
    if self.cpu:
      self.samples.append(cpu_matmul_flops(self.size))
    elif not self.samples:
      self.samples.append(device_matmul_flops(self.devices[0], self.dtype, self.size)
                          * len(self.devices))

  def result(self) -> dict:
    n = self.size
    desc = (f"numpy float32 {n}x{n} on the host" if self.cpu else
            f"jitted {self.dtype} {n}x{n} x {len(self.devices)} device(s)")
    return {"matmul_peak_flops": statistics.median(self.samples),
            "matmul_peak_samples": self.samples, "matmul_peak": desc}


def _figures(mode, times, flops_per_call, batch_size, compile_s, lower_s, peak: _Peak, mesh,
             extra: dict) -> dict:
  devices = list(mesh.devices.flat)
  step_s = statistics.median(times)
  achieved = flops_per_call / step_s
  sheet = metrics_lib.peak_flops(devices[0].device_kind)
  sheet_total = sheet * len(devices) if sheet else None
  out = {
      "mode": mode,
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "batch": batch_size,
      "steps_timed": len(times),
      "step_s": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "step_times_s": times,
      "images_per_s": batch_size / step_s,
      "flops_per_step": flops_per_call,
      "tflops_per_s": achieved / 1e12,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "datasheet_peak_flops": sheet_total,
      "mfu_datasheet": achieved / sheet_total if sheet_total else None,
      "peak_memory_bytes": peak_memory_bytes(devices),
  }
  out.update(peak.result())
  out["mfu_measured"] = achieved / out["matmul_peak_flops"]
  out.update(extra)
  return out


def bench_train(config, *, steps: int = 5, warmup: int = 1, mesh=None,
                matmul_size: int | None = None) -> dict:
  """Times `steps` calls of the jitted `train.train_step` after `warmup` calls; a dict.

  mesh: default `sharding.make_mesh(config.mesh)`; matmul_size: n of the measured matmul
  peak (default 2048 on a CPU, 8192 elsewhere).
  """
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  batch_size = int(config.global_batch_size)
  sharding.check_global_batch(batch_size, mesh)
  input_shape = _model_input_shape(config)
  model = train.build_model(config.model)
  diffusion = train.create_diffusion(config.diffusion)
  tx, lr_schedule = ts.create_optimizer(config.optimizer)
  init_fn, _, state_shardings = train.setup_state(config, model, tx, mesh, input_shape)
  state = init_fn()
  batch = _synthetic_batch(config, batch_size, input_shape, mesh)
  rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=sharding.replicated(mesh))()
  step_fn = train.jit_train_step(config, model, diffusion, tx, lr_schedule, mesh,
                                 state_shardings)
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch, rng)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  step0 = int(jax.device_get(state.step))

  def run():
    nonlocal state
    state, step_metrics = compiled(state, batch, rng)
    return state, step_metrics

  peak = _Peak(mesh, config.model.dtype, matmul_size)
  _timed(run, warmup)
  times = _timed(run, steps)
  peak.measure()
  flops = metrics_lib.dit_train_flops(model, batch_size)
  return _figures("train", times, flops, batch_size, compile_s, lower_s, peak, mesh, {
      "variant": config.model.variant, "dtype": config.model.dtype,
      "state_step_before": step0, "state_step_after": int(jax.device_get(state.step)),
      "warmup": warmup})


def sample_fn(config, model, input_shape, decode_fn=None) -> tuple[Callable, int]:
  """(`sampling.sample` bound to `config.sample` as `sampling.Sampler` binds it, model calls
  per sample per step: 1, x2 with classifier-free guidance, x2 with autoguidance)."""
  diff = sampling.create_sampling_diffusion(config.diffusion, config.sample)
  cfg_scale = float(config.sample.cfg_scale)
  ag_scale = sampling.autoguidance_scale(config.sample)
  fn = lambda params, labels, key, guide_params: sampling.sample(  # noqa: E731
      params, labels, key, model=model, diff=diff, cfg_scale=cfg_scale,
      guidance_mode=config.sample.guidance_mode, sampler=config.sample.sampler,
      clip_denoised=bool(config.sample.clip_denoised), latent_shape=tuple(input_shape),
      decode_fn=decode_fn,
      guidance_interval=dd.guidance.check_interval(config.sample.get("guidance_interval"),
                                                   "config.sample.guidance_interval"),
      guide_params=guide_params, autoguidance_scale=ag_scale,
      noise_design=noise_lib.check(config.sample.get("noise", "iid"), "config.sample.noise"))
  calls = (2 if cfg_scale != 1.0 else 1) * (2 if ag_scale != 1.0 else 1)
  return fn, calls


def bench_sample(config, *, steps: int = 3, warmup: int = 1, mesh=None,
                 matmul_size: int | None = None) -> dict:
  """Times `steps` runs of the jitted sampling loop of `config.sample` (batch
  `config.sample.batch_size`, random parameters: the speed does not depend on them);
  mesh and matmul_size as `bench_train`."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  batch_size = int(config.sample.batch_size)
  sharding.check_global_batch(batch_size, mesh)
  input_shape = _model_input_shape(config)
  model = train.build_model(config.model)
  tx, _ = ts.create_optimizer(config.optimizer)
  init_fn, _, _ = train.setup_state(config, model, tx, mesh, input_shape)
  params = init_fn().ema_params
  guide = params if sampling.autoguidance_scale(config.sample) != 1.0 else None
  labels = jax.device_put(
      np.arange(batch_size, dtype=np.int32) % int(config.model.num_classes),
      sharding.batch_sharding(mesh))
  fn, calls = sample_fn(config, model, input_shape)
  jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))
  key = jax.random.key(int(config.sample.seed))
  t0 = time.perf_counter()
  lowered = jitted.lower(params, labels, key, guide)
  lower_s = time.perf_counter() - t0
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  run = lambda: compiled(params, labels, key, guide)  # noqa: E731
  peak = _Peak(mesh, config.model.dtype, matmul_size)
  _timed(run, warmup)
  times = _timed(run, steps)
  peak.measure()
  k = int(config.sample.num_sampling_steps)
  flops = metrics_lib.dit_train_flops(model, batch_size * calls) / 3.0 * k
  return _figures("sample", times, flops, batch_size, compile_s, lower_s, peak, mesh, {
      "variant": config.model.variant, "dtype": config.model.dtype,
      "sampler": config.sample.sampler, "num_sampling_steps": k,
      "cfg_scale": float(config.sample.cfg_scale), "model_calls_per_sample_step": calls,
      "sampling_step_s": statistics.median(times) / k, "warmup": warmup})


def _fmt(value, unit="", scale=1.0, digits=3):
  if value is None:
    return "n/a"
  return f"{value / scale:.{digits}g}{unit}"


def format_table(r: dict) -> str:
  """The human-readable table of a `bench_train` / `bench_sample` result."""
  mem = r["peak_memory_bytes"]
  rows = [
      ("mode", f"{r['mode']} {r['variant']} {r['dtype']}, batch {r['batch']}"
               + (f", {r['sampler']} {r['num_sampling_steps']} steps, cfg {r['cfg_scale']}"
                  if r["mode"] == "sample" else "")),
      ("device", f"{r['num_devices']} x {r['device_kind']}"),
      ("lowering / compile", f"{r['lower_s']:.1f} s / {r['compile_s']:.1f} s"),
      ("step time (median)", f"{r['step_s']:.4g} s  (min {r['step_s_min']:.4g}, max "
                             f"{r['step_s_max']:.4g}; {r['steps_timed']} timed)"),
      ("images/s", _fmt(r["images_per_s"], digits=4)),
      ("TFLOP/s", _fmt(r["tflops_per_s"], digits=4)),
      ("MFU (data sheet)", _fmt(r["mfu_datasheet"] and 100 * r["mfu_datasheet"], "%")),
      ("matmul peak", f"{r['matmul_peak_flops'] / 1e12:.4g} TFLOP/s ({r['matmul_peak']})"),
      ("MFU (measured peak)", f"{100 * r['mfu_measured']:.3g}%"),
      ("peak memory", "n/a" if mem is None else f"{mem / 2**30:.2f} GiB"),
  ]
  if "host_memory_kept" in r:
    rows.append(("host memory", "kept between steps (host_memory)" if r["host_memory_kept"]
                 else "glibc's defaults"))
  if r["mode"] == "sample":
    rows.insert(4, ("sampling step", f"{r['sampling_step_s']:.4g} s "
                                     f"({r['model_calls_per_sample_step']} model batch(es))"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _define_flags(fv: flags.FlagValues, argv: list[str]):
  config_flags.DEFINE_config_file("config", "configs/imagenet256.py:variant=S/2",
                                  "Config file (configs/*.py[:arg]) and --config.* overrides.",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_enum("mode", "train", MODES, "What to time.", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "Timed calls (train steps or sampling loops).",
                       flag_values=fv)
  flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.", flag_values=fv)
  flags.DEFINE_integer("num_devices", None, "Use only the first N devices (default: all).",
                       flag_values=fv)
  flags.DEFINE_integer("matmul_size", None, "n of the measured n x n matmul peak (default "
                       "2048 on a CPU, 8192 elsewhere).", flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the JSON result to this file.", flag_values=fv)


def _main(argv: list[str]) -> int:
  argv = [PROG] + list(argv)
  fv = flags.FlagValues()
  _define_flags(fv, argv)
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(f"{__doc__}\n{fv.get_help()}")
    return 0
  try:
    fv(argv)
    config = fv["config"].value
  except (AttributeError, KeyError) as e:  # An override naming no config field.
    raise errors.UserError(errors.config_override_error(argv, e)) from e
  except (flags.Error, ValueError, FileNotFoundError) as e:
    raise errors.UserError(str(e)) from e
  try:
    config.mesh  # pylint: disable=pointless-statement  (config_flags defers a load failure)
  except OSError as e:
    raise errors.UserError(f"--config={fv['config'].config_filename}: cannot load it "
                           f"({errors.one_line(str(e).splitlines()[-1])}).") from e
  if fv["steps"].value < 1 or fv["warmup"].value < 0:
    raise errors.UserError(f"--steps={fv['steps'].value} must be >= 1 and "
                           f"--warmup={fv['warmup'].value} >= 0")
  kept = fv["mode"].value == "train" and host_memory.for_cpu_runs(  # Before any backend exists.
      metrics_lib.dit_train_flops(train.build_model(config.model), config.global_batch_size))
  try:
    sharding.set_num_cpu_devices(config.mesh)
  except ValueError as e:
    raise errors.UserError(str(e)) from e
  devices = jax.devices()
  n = fv["num_devices"].value
  if n is not None and not 1 <= n <= len(devices):
    raise errors.UserError(f"--num_devices={n}: expected 1..{len(devices)} (the devices here)")
  mesh = sharding.make_mesh(config.mesh, devices[:n] if n else devices)
  bench = bench_train if fv["mode"].value == "train" else bench_sample
  result = bench(config, steps=fv["steps"].value, warmup=fv["warmup"].value, mesh=mesh,
                 matmul_size=fv["matmul_size"].value)
  result["host_memory_kept"] = kept
  print(format_table(result))
  line = json.dumps(result)
  print(line)
  if fv["json"].value:
    with open(fv["json"].value, "w") as f:
      f.write(line + "\n")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return errors.run_cli(PROG, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
