"""host_memory: glibc keeps XLA's freed temporary buffer, so a repeated step stops page-faulting."""
import importlib
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from conftest import load_config
from dit_jax import errors
from dit_jax import host_memory
from dit_jax import metrics
from dit_jax import shutdown
from dit_jax import train

REPO = pathlib.Path(__file__).resolve().parent.parent

# A jitted function whose temporary buffer (the cumulative sum, read backwards) is 64 MB,
# over glibc's largest mmap threshold (32 MB); prints the page faults of its eighth call. (The
# first calls may still take a new block while a freed one is split by small allocations.)
_FAULTS = """
import resource, sys
from dit_jax import host_memory
if sys.argv[1] == "keep":
  assert host_memory.for_cpu_runs(host_memory.MIN_STEP_FLOPS), "settings not applied"
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x) * jnp.cumsum(x)[::-1]))
x = jnp.ones((1 << 24,), jnp.float32)
for i in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _eighth_call_faults(mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # Compiled as a user's run (conftest's not).
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _FAULTS, mode], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the C library is not glibc")
def test_kept_memory_removes_the_per_call_page_faults():
  # 64 MB is 16384 pages of 4 KB: without the settings each call maps its buffer afresh.
  default, kept = _eighth_call_faults("default"), _eighth_call_faults("keep")
  assert default > 16384, default
  assert kept < 1000, kept


def test_which_runs_count_as_cpu_runs(monkeypatch):
  assert host_memory.computes_on_cpu("cpu")
  assert host_memory.computes_on_cpu(" CPU ,cuda")
  assert not host_memory.computes_on_cpu("cuda,cpu")
  assert not host_memory.computes_on_cpu("tpu")
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: True)
  assert not host_memory.computes_on_cpu("")
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: False)
  assert host_memory.computes_on_cpu("")
  assert host_memory.configured_platforms() == "cpu"  # conftest's JAX_PLATFORMS.
  monkeypatch.setattr(host_memory, "configured_platforms", lambda: "cuda")
  assert not host_memory.computes_on_cpu()


def test_nothing_changes_once_a_backend_exists_or_for_a_small_step(monkeypatch):
  jax.devices()  # This process computes already (as when a test calls a command line).
  calls = []
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
  assert not host_memory.for_cpu_runs(1e15)
  assert not calls
  monkeypatch.setattr(host_memory, "_backends_started", lambda: False)
  monkeypatch.setattr(host_memory, "computes_on_cpu", lambda: True)
  assert not host_memory.for_cpu_runs(0.99 * host_memory.MIN_STEP_FLOPS)  # e.g. the digits demo
  assert not calls
  assert host_memory.for_cpu_runs(host_memory.MIN_STEP_FLOPS)
  assert calls == [1]


@pytest.mark.parametrize("cli", ["main", "bench"])
def test_the_training_command_lines_apply_it(monkeypatch, tmp_path, cli):
  """main and bench call `for_cpu_runs` with the step's training FLOPs (it acts only before a
  backend exists, for a large step)."""
  config = REPO / "configs" / "testing.py"
  argv = {"main": [f"--config={config}", f"--workdir={tmp_path}"],
          "bench": [f"--config={config}", "--config.global_batch_size=8"]}[cli]
  calls = []

  def stop(step_flops):
    calls.append(step_flops)
    raise errors.UserError("stopped at host_memory.for_cpu_runs")

  monkeypatch.setattr(host_memory, "for_cpu_runs", stop)
  monkeypatch.setattr(shutdown, "install", lambda **kw: None)  # main's log routing: not here.
  assert importlib.import_module(f"dit_jax.{cli}").main(argv) == errors.EXIT_USER_ERROR
  cfg = load_config()
  batch = 8 if cli == "bench" else cfg.global_batch_size
  assert calls == [metrics.dit_train_flops(train.build_model(cfg.model), batch)]
