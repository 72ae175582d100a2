"""CPU runs: keep the memory XLA frees at the end of a step for the next step (glibc malloc).

XLA:CPU allocates each execution's temporary buffer with `malloc` and frees it when the
execution ends. For a training step that buffer holds the activations the backward pass reads:
0.99 GB for DiT-S/2 at batch 8. glibc's malloc serves an allocation that large with a fresh
`mmap` and returns it with `munmap` on free, so every step page-faults its whole temporary
buffer back in and the kernel zeroes it again. On the project's 2-core VM that is about 265,000
page faults and 0.6-0.8 s of kernel time per S/2 step, 12-15% of the step (docs/performance.md).

`keep_freed_memory()` makes large blocks come from the heap and stay there once freed: no
`mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming of the heap's free top
(`M_TRIM_THRESHOLD` -1), and JAX's CPU client runs each computation in the calling thread
(`jax_cpu_enable_async_dispatch` off). The calling thread is the main one, and only the main
thread's malloc arena can hold a block this large without `mmap` (a worker thread's arena is
at most 64 MB and falls back to `mmap`); with asynchronous dispatch XLA's worker threads
allocate the buffer. The next step's buffer is then the one just freed: no page faults after
the first steps, S/2's step 2.95 -> 2.5 s, and the process's memory stays flat (measured: 40
S/2 steps, 2.29-2.31 GB resident, against 2.18 GB with glibc's defaults). The cost: Python waits
for each step instead of queueing the next one (on a CPU both compete for the same cores), and
the heap keeps its peak size for the process's lifetime (it is needed again every step).

Waiting costs little only for a large step. On the digits demo (a 329K-parameter model, about
8 ms per step) it took training from ~125 to ~70 steps per second, since Python's few
milliseconds per step no longer overlap the computation. So `for_cpu_runs(step_flops)` acts
only for a training step of at least `MIN_STEP_FLOPS` (`metrics.dit_train_flops`). Such a step
takes 0.4 s or more on the 2-core VM, and its buffer runs to hundreds of MB. A
sampling loop allocates its buffer once per call, not once per step, and is left alone.

It changes process-wide settings, so only the command lines call it, once, before JAX creates
its CPU client, and only when the run computes on the CPU (`computes_on_cpu`): an accelerator
run's host does little large allocation and keeps the defaults.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

# Training FLOPs per step from which a CPU run keeps freed memory (DiT-S/2 at batch 8: 291e9;
# the digits demo: 0.33e9).
MIN_STEP_FLOPS = 50e9


def _glibc():
  """The process's C library if it is glibc (has `gnu_get_libc_version`), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None  # e.g. musl: its malloc has no such options.
  return libc


def accelerator_plugin_installed() -> bool:
  """Whether JAX could pick a GPU or TPU here: a `jax_plugins` entry point (jax[cuda], ...)
  or a `jax_plugins.*` module, or libtpu."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return importlib.util.find_spec("jax_plugins") is not None


def configured_platforms() -> str:
  """JAX's `jax_platforms` setting ("" when unset: JAX picks the best backend it has)."""
  import jax  # pylint: disable=import-outside-toplevel  (only its config; no backend starts)
  return jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")


def computes_on_cpu(platforms: str | None = None) -> bool:
  """Whether this process's JAX will compute on the CPU: `platforms` (default JAX's
  `jax_platforms` setting, from `JAX_PLATFORMS` or `--jax_platforms`) names "cpu" first, or it
  is unset and no accelerator plugin is installed (JAX then has only its CPU backend)."""
  if platforms is None:
    platforms = configured_platforms()
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_plugin_installed()


def keep_freed_memory() -> bool:
  """Applies `SETTINGS` with `mallopt` and turns JAX's asynchronous CPU dispatch off; True if
  glibc accepted both settings, False where the C library is not glibc (nothing changes)."""
  libc = _glibc()
  if libc is None:
    return False
  if not all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
             for param, value in SETTINGS):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def for_cpu_runs(step_flops: float) -> bool:
  """`keep_freed_memory()` for a training run whose step costs `step_flops` (at least
  `MIN_STEP_FLOPS`), if `computes_on_cpu()` and no JAX backend exists yet (a command line
  called from a process that already computes, e.g. a test, changes nothing); what the
  training command lines call first. True if the settings were applied."""
  return (step_flops >= MIN_STEP_FLOPS and not _backends_started() and computes_on_cpu()
          and keep_freed_memory())
