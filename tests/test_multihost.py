"""Multi-host works: two local processes train the testing config like one process does.

Two processes, each with 2 simulated CPU devices, join one JAX cluster through
`jax.distributed.initialize` on 127.0.0.1 (`python -m dit_jax.main --coordinator_address=...
--num_processes=2 --process_id=i`; CPU collectives go through gloo, JAX's default CPU
implementation, so nothing needs configuring). Each process reads its own half of every global
batch; parameters and optimizer state are FSDP-sharded 4 ways over a (data 1, fsdp 4) mesh that
spans both processes, so each process writes its own shards of every checkpoint into the shared
workdir. The reference is one process with 4 simulated devices, the same global batch and the
same mesh shape.

Checks: both runs save the same steps; the multi-process final checkpoint (read here, in one
process with 8 devices, i.e. restored on another topology) matches the single-process one to
float32 rounding: params, EMA params and optimizer state; step and data position exactly.
"""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from dit_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 4
OVERRIDES = [
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=4",
    "--config.checkpoint.save_every_steps=2",
    "--config.checkpoint.max_to_keep=10",
    "--config.logging.sample_every_steps=4",
    "--config.sample.final_num_samples_per_class=1",
]
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = dict(os.environ)  # JAX_PLATFORMS etc. from conftest.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "dit_jax.main", f"--config={REPO / 'configs' / 'testing.py'}",
          f"--workdir={workdir}", *OVERRIDES, *extra]


def _check(proc: subprocess.Popen, name: str) -> None:
  try:
    _, err = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, err = proc.communicate()
  assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{err[-5000:]}"


def test_two_processes_match_one(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  workers = [
      subprocess.Popen(_cmd(multi, f"--coordinator_address={address}", "--num_processes=2",
                            f"--process_id={i}"),
                       cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
      for i in range(2)
  ]
  reference = subprocess.Popen(_cmd(single), cwd=REPO, env=_env(4),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for i, worker in enumerate(workers):
    _check(worker, f"process {i}")
  _check(reference, "single process")

  steps = lambda w: sorted(int(p.name) for p in (w / "checkpoints").iterdir())
  assert steps(multi) == steps(single) == [2, 4]
  # Each process wrote its own shards of the FSDP-sharded state.
  assert {p.name for p in (multi / "checkpoints" / "4" / "state").glob("ocdbt.process_*")} == {
      "ocdbt.process_0", "ocdbt.process_1"}

  state_m, meta_m = checkpointing.load_on_host(str(multi))
  state_s, meta_s = checkpointing.load_on_host(str(single))
  assert meta_m["step"] == meta_s["step"] == TOTAL_STEPS
  assert meta_m["data_position"] == meta_s["data_position"]
  flat_m = jax.tree_util.tree_flatten_with_path(state_m)[0]
  flat_s = jax.tree_util.tree_flatten_with_path(state_s)[0]
  assert [p for p, _ in flat_m] == [p for p, _ in flat_s]
  for (path, m), (_, s) in zip(flat_m, flat_s):
    name = jax.tree_util.keystr(path)
    assert m.dtype == s.dtype and m.shape == s.shape, name
    if np.issubdtype(m.dtype, np.floating):
      np.testing.assert_allclose(m, s, rtol=1e-5, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(m, s, err_msg=name)
  # The runs actually trained (parameters moved away from their initialisation).
  assert int(state_m["step"]) == TOTAL_STEPS
