"""`python -m dit_jax.bench`: it runs the real train step and sampler, and its figures agree with
each other (images/s, TFLOP/s, MFU from the step times; the state advanced by every step)."""
import json
import statistics

import jax
import numpy as np
import pytest

from conftest import CONFIGS, load_config
from dit_jax import bench
from dit_jax import metrics
from dit_jax import sharding
from dit_jax import train


def test_train_bench_cli_figures_agree(tmp_path, capsys):
  jax.devices()  # A backend exists (whichever test runs first), so host_memory stays off.
  out = tmp_path / "bench.json"
  code = bench.main([f"--config={CONFIGS / 'testing.py'}", "--config.global_batch_size=8",
                     "--steps=3", "--warmup=1", "--num_devices=1", "--matmul_size=256",
                     f"--json={out}"])
  assert code == 0
  printed = capsys.readouterr().out.strip().splitlines()
  r = json.loads(out.read_text())
  assert json.loads(printed[-1]) == r
  assert any(line.startswith("images/s") for line in printed)
  assert r["mode"] == "train" and r["batch"] == 8 and r["steps_timed"] == 3
  # The real, donated state advanced once per call: the warm-up and the timed steps.
  assert r["state_step_after"] - r["state_step_before"] == r["warmup"] + r["steps_timed"] == 4
  assert r["step_s"] == statistics.median(r["step_times_s"])
  assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
  np.testing.assert_allclose(r["images_per_s"], 8 / r["step_s"], rtol=1e-12)
  config = load_config()
  model = train.build_model(config.model)
  flops = metrics.dit_train_flops(model, 8)
  assert r["flops_per_step"] == flops
  np.testing.assert_allclose(r["tflops_per_s"] * 1e12, flops / r["step_s"], rtol=1e-12)
  np.testing.assert_allclose(r["mfu_measured"],
                             r["tflops_per_s"] * 1e12 / r["matmul_peak_flops"], rtol=1e-12)
  assert r["matmul_peak_flops"] == statistics.median(r["matmul_peak_samples"])
  assert len(r["matmul_peak_samples"]) == 2  # CPU: before and after the timed steps.
  # CPU: no data-sheet peak and no memory statistics.
  assert r["mfu_datasheet"] is None and r["peak_memory_bytes"] is None
  assert r["compile_s"] > 0 and r["lower_s"] > 0
  # In-process (a backend exists already) host_memory changes nothing, and the result says so.
  assert r["host_memory_kept"] is False
  assert any(line.startswith("host memory") and "glibc's defaults" in line for line in printed)


def test_sample_bench_counts_guided_model_calls():
  config = load_config()
  config.sample.batch_size = 4
  config.sample.num_sampling_steps = 3
  config.sample.cfg_scale = 2.0  # Classifier-free guidance: the model sees 2 x 4 per step.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  r = bench.bench_sample(config, steps=2, warmup=1, mesh=mesh, matmul_size=256)
  model = train.build_model(config.model)
  assert r["model_calls_per_sample_step"] == 2
  fwd = metrics.dit_train_flops(model, 8) / 3
  np.testing.assert_allclose(r["flops_per_step"], fwd * 3, rtol=1e-12)
  np.testing.assert_allclose(r["images_per_s"], 4 / r["step_s"], rtol=1e-12)
  np.testing.assert_allclose(r["sampling_step_s"], r["step_s"] / 3, rtol=1e-12)
  np.testing.assert_allclose(r["tflops_per_s"] * 1e12, fwd * 3 / r["step_s"], rtol=1e-12)
  assert "sample" in bench.format_table(r)


@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "--steps=0"),
    (["--config.model.no_such_field=1"], "no_such_field"),
    (["--mode=fly"], "--mode"),
    (["--config.model.num_heads=5"], "config.model: hidden_size=32 is not divisible by "
                                     "num_heads=5"),
])
def test_bench_user_errors_are_one_line(args, message, capsys):
  code = bench.main([f"--config={CONFIGS / 'testing.py'}"] + args)
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.startswith("python -m dit_jax.bench: error:") and message in err
  assert len(err.splitlines()) == 1
