"""Test set-up shared by every test file.

Runs on CPU with 8 simulated devices (so sharding tests see a real mesh) and with most XLA
optimisations disabled: the test models are tiny, so compile time dominates and this roughly
halves the suite's wall time. Both are environment variables so that subprocesses started by
tests (resume, multi-host, demo smoke runs) inherit them. They must be set before jax is
imported, which is why this file sets them at import time.
"""
import importlib.util
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache for the whole run: the subprocess tests (resume, multi-host,
# the main smoke run) compile the same train step again and again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"dit_jax_test_cache_{os.getuid()}"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA_DIR = pathlib.Path(__file__).parent / "data"
CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name="testing", arg=None, **overrides):
  """`configs/<name>.py`'s get_config(arg), with `section__field=value` overrides."""
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for path, value in overrides.items():
    section, field = path.split("__")
    config[section][field] = value
  return config


def perturbed_params(model, seed: int, image_shape=(8, 8, 1)):
  """The model's init(seed) parameters plus 0.05 N(0, 1) noise (key seed + 1) on every leaf:
  adaLN-Zero starts with a zero output layer, so unperturbed models all output zeros."""
  label = jnp.zeros((1,), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(image_shape)), label,
                      label)["params"]
  return jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), a.shape), params)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return DATA_DIR


def _load(name):
  with np.load(DATA_DIR / name) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def ref_a():
  """Reference vectors of config A (patch 2, learn_sigma=True); see tests/data/README.md."""
  return _load("model_tiny.npz")


@pytest.fixture(scope="session")
def ref_b():
  """Reference vectors of config B (patch 4, learn_sigma=False, depth 3)."""
  return _load("model_tiny_p4.npz")


@pytest.fixture(scope="session")
def ref_diffusion():
  """Diffusion tables and one-step functions of the official code."""
  return _load("diffusion.npz")


def official_tree(ref, prefix="param/"):
  """The official arrays of `ref` under `prefix` (`param/`, `grad/`, `adamw1/`, ...) in our
  parameter layout (`convert.official.state_dict_to_params`), as jax arrays."""
  from dit_jax.convert import official  # pylint: disable=import-outside-toplevel
  sd = {k[len(prefix):]: ref[k] for k in ref if k.startswith(prefix)}
  return jax.tree.map(jnp.asarray, official.state_dict_to_params(sd))


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref|, the parity measure used throughout the tests."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
